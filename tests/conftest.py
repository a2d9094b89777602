"""Test settings shared by the whole suite.

* Hypothesis profiles, picked by MINIDENSE_HYPOTHESIS_PROFILE: ``ci`` (default: quick,
  the whole suite well under 10 minutes on 2 cores) and ``thorough`` (many more examples).
* MINIDENSE_TEST_DEVICE=cuda runs the device-aware tests on CuPy (fixture ``device``).
* Tests marked ``slow`` run only with ``--runslow`` or MINIDENSE_RUN_SLOW=1; tests
  marked ``gpu`` only when MINIDENSE_TEST_DEVICE=cuda.
* Under CI=true, those are the only tests that may skip: any other skip (a missing
  package, a missing program, missing data) fails the run, so that a green CI means the
  test install is complete.
* The real-data tests read CIFAR-10 from MINIDENSE_CIFAR10; when it is unset, this file
  sets it to the development checkout's ``../shared/data/cifar10-jpeg.zip`` if there is one
  (the package itself never looks there).
"""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import minidense as md

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("MINIDENSE_HYPOTHESIS_PROFILE", "ci"))

TEST_DEVICE = os.environ.get("MINIDENSE_TEST_DEVICE", "cpu")
REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
MAY_SKIP = ("slow", "gpu")   # the markers whose tests may be skipped under CI=true

_shared_zip = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
if not os.environ.get("MINIDENSE_CIFAR10") and _shared_zip.is_file():
    os.environ["MINIDENSE_CIFAR10"] = str(_shared_zip)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_report_header(config):
    return (f"minidense: device={TEST_DEVICE}, hypothesis profile="
            f"{os.environ.get('MINIDENSE_HYPOTHESIS_PROFILE', 'ci')}")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("MINIDENSE_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or MINIDENSE_RUN_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="gpu: run with MINIDENSE_TEST_DEVICE=cuda on a machine with CuPy")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and TEST_DEVICE != "cuda":
            item.add_marker(skip_gpu)
        if any(marker in item.keywords for marker in MAY_SKIP):
            _skippable.add(item.nodeid)


_skippable: set = set()        # node ids of the tests marked slow or gpu
_unexpected_skips: list = []   # (node id, reason) of other skipped tests


def pytest_runtest_logreport(report):
    if IN_CI and report.skipped and report.nodeid not in _skippable:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skip outside ``MAY_SKIP`` fails the run, whatever skipped it."""
    if _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skipped under CI=true (only slow and gpu tests may skip)",
                                 red=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"{nodeid}: {reason}")


@pytest.fixture(scope="session")
def device():
    """The device the suite runs on (MINIDENSE_TEST_DEVICE, default cpu)."""
    if TEST_DEVICE == "cuda" and not md.cuda_available():
        pytest.fail("MINIDENSE_TEST_DEVICE=cuda but CuPy sees no GPU")
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same generator state."""
    md.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for the test (then as before), for deep PyTorch twins: on a
    machine whose cores other programs hold, its OpenMP threads wait for each other at
    every op (MobileNetV2's twin: 0.9 s on one thread, 11 to 28 s on two at load 6)."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


def cifar10_zip():
    """Path of the CIFAR-10 JPEG zip named by MINIDENSE_CIFAR10, or None."""
    value = os.environ.get("MINIDENSE_CIFAR10")
    return Path(value) if value and Path(value).is_file() else None
