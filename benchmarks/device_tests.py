"""A pytest plugin for the device run's tests stage (benchmarks/gpu_run.py):

    python -m pytest -p device_tests --device-aware --deadline-at EPOCH --progress-json PATH ...

* ``--device-aware``: keeps the tests that run on MINIDENSE_TEST_DEVICE (those of a module
  that imports ``TEST_DEVICE`` from conftest, or that take the ``device`` fixture) and the
  tests marked gpu, the gpu-marked ones first; deselects the rest.
* ``--deadline-at``: a time (``time.time()``) after which no new test starts: the session
  stops itself (``session.shouldstop``), so that it ends normally and writes its JUnit XML,
  rather than being killed with nothing written.  Stopping there is not a failure: the exit
  status is 0 when nothing failed.
* ``--progress-json``: after every test (and collection error), the counts, the failures
  with their short tracebacks and what has not run yet, written atomically: what is left
  even if the process is killed.

(``benchmarks/`` must be on PYTHONPATH for ``-p device_tests``; gpu_run.py puts it there.)
"""
from __future__ import annotations

import json
import os
import time

import pytest

_LONGREPR_CHARS = 3000   # of each failure's short traceback kept in the progress file


def pytest_addoption(parser):
    group = parser.getgroup("device_tests", "the device run's tests stage")
    group.addoption("--device-aware", action="store_true", default=False,
                    help="run only the device-aware and gpu-marked tests, gpu-marked first")
    group.addoption("--deadline-at", type=float, default=None,
                    help="start no test after this time.time(); stop cleanly instead")
    group.addoption("--progress-json", default=None,
                    help="write the counts and failures here after every test")


def is_device_aware(item) -> bool:
    module = getattr(item, "module", None)
    return ("gpu" in item.keywords or "device" in getattr(item, "fixturenames", ())
            or getattr(module, "TEST_DEVICE", None) is not None)


class _Progress:
    def __init__(self, config):
        self.config = config
        self.path = config.getoption("--progress-json")
        self.deadline = config.getoption("--deadline-at")
        self.started = time.time()
        self.session = None
        self.selected = self.gpu_marked = 0
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        self.failures, self.collection_errors = [], []
        self.stopped_at_deadline = False
        self.progress = "collecting"

    # -- hooks ----------------------------------------------------------------------
    def pytest_sessionstart(self, session):
        self.session = session
        self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        if config.getoption("--device-aware"):
            kept = [item for item in items if is_device_aware(item)]
            dropped = [item for item in items if not is_device_aware(item)]
            gpu = [item for item in kept if "gpu" in item.keywords]
            items[:] = gpu + [item for item in kept if "gpu" not in item.keywords]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
        self.selected = len(items)
        self.gpu_marked = sum("gpu" in item.keywords for item in items)
        self.progress = "running"
        self.write()

    def pytest_collectreport(self, report):
        if report.failed:
            self.collection_errors.append({"nodeid": report.nodeid,
                                           "longrepr": str(report.longrepr)[-_LONGREPR_CHARS:]})
            self.write()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            outcome = ("error" if report.failed and report.when != "call" else report.outcome)
            self.counts[outcome] += 1
            if report.failed:
                self.failures.append({"nodeid": report.nodeid, "when": report.when,
                                      "longrepr": str(report.longrepr)[-_LONGREPR_CHARS:]})

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.deadline is not None and time.time() >= self.deadline and self.session is not None:
            self.stopped_at_deadline = True
            self.session.shouldstop = (f"the tests stage's deadline: stopped after "
                                       f"{self.ran()} of {self.selected} tests")
        self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        nothing_failed = not (self.counts["failed"] or self.counts["error"] or self.collection_errors)
        if self.stopped_at_deadline and nothing_failed:
            session.exitstatus = 0     # the deadline is the plan, not a failure
        self.progress = "stopped at the deadline" if self.stopped_at_deadline else "finished"
        self.write()

    # -- the progress file ------------------------------------------------------------
    def ran(self) -> int:
        return sum(self.counts.values())

    def write(self):
        if not self.path:
            return
        report = {"progress": self.progress, "selected": self.selected, "gpu_marked": self.gpu_marked,
                  "counts": self.counts, "not_run": max(0, self.selected - self.ran()),
                  "stopped_at_deadline": self.stopped_at_deadline,
                  "seconds": round(time.time() - self.started, 1),
                  "collection_errors": self.collection_errors, "failures": self.failures}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, self.path)


def pytest_configure(config):
    config.pluginmanager.register(_Progress(config), "device_tests_progress")
