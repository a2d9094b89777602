"""Test settings shared by the whole suite.

* Hypothesis profiles, picked by MINIDENSE_HYPOTHESIS_PROFILE: ``ci`` (default: quick,
  the whole suite well under 10 minutes on 2 cores) and ``thorough`` (many more examples).
* MINIDENSE_TEST_DEVICE=cuda runs the device-aware tests on CuPy (fixture ``device``).
* Tests marked ``slow`` run only with ``--runslow`` or MINIDENSE_RUN_SLOW=1; tests
  marked ``gpu`` only when MINIDENSE_TEST_DEVICE=cuda.
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


def cifar10_zip():
    """Path of the shared CIFAR-10 JPEG zip, or None (MINIDENSE_CIFAR10 overrides)."""
    path = Path(os.environ.get("MINIDENSE_CIFAR10", REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"))
    return path if path.is_file() else None
