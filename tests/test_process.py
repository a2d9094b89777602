"""Process-wide settings: importing minidense changes nothing outside minidense; the
program asks with md.tune_process(); the commands get OpenBLAS's short spin by
re-executing themselves, and tune malloc (minidense/process.py)."""
import ast
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import minidense as md
from minidense import process, workspace
from conftest import REPO_ROOT

# Run in a fresh process: import minidense (after NumPy, or before it) with the ways it
# could change the process watched, and print what changed.
IMPORT_PROBE = textwrap.dedent("""
    import ctypes, json, os, sys

    def umask_from_status():   # read without setting it (Linux; None elsewhere)
        try:
            with open("/proc/self/status") as f:
                return next((line.split()[1] for line in f if line.startswith("Umask:")), None)
        except OSError:
            return None

    umask_calls, looked_up = [], []
    real_umask, real_getattr = os.umask, ctypes.CDLL.__getattr__
    os.umask = lambda mask: umask_calls.append(mask) or real_umask(mask)
    def spy(self, name):   # the C library's allocator settings (other libraries may use ctypes)
        if name.startswith(("mallopt", "malloc_trim")):
            looked_up.append(name)
        return real_getattr(self, name)
    ctypes.CDLL.__getattr__ = spy
    environ, umask = dict(os.environ), umask_from_status()
    if sys.argv[1] == "numpy-first":
        import numpy
    import minidense as md
    print(json.dumps({"environ_changes": sorted(set(os.environ.items()) ^ set(environ.items())),
                      "umask_same": umask_from_status() == umask, "umask_calls": umask_calls,
                      "malloc_functions_looked_up": looked_up,
                      "freed_memory_kept": md.workspace.freed_memory_kept}))
""")


def test_importing_minidense_changes_nothing_process_wide():
    """Neither the environment, nor the umask (not even set and restored), nor malloc
    (minidense never even looks up mallopt), whether NumPy was imported first or not."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    probes = [subprocess.Popen([sys.executable, "-c", IMPORT_PROBE, order], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for order in ("numpy-first", "minidense-first")]
    results = []
    for probe in probes:
        out, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert results[0] == {"environ_changes": [], "umask_same": True, "umask_calls": [],
                          "malloc_functions_looked_up": [], "freed_memory_kept": False}


def test_atomic_write_imports_nothing_from_minidense():
    """So that any module may write files without an import cycle (profiling, imported
    by the engine, once imported io, which imports the engine)."""
    tree = ast.parse((REPO_ROOT / "minidense" / "files.py").read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in imports if isinstance(node, ast.ImportFrom) and node.level]
    assert not [alias.name for node in imports for alias in node.names if "minidense" in alias.name]
    assert not [node for node in imports if getattr(node, "module", None) and "minidense" in node.module]
    assert md.io.atomic_write is md.files.atomic_write


# ---------------------------------------------------------------------------
# md.tune_process(), in this process with a stand-in for glibc's mallopt
# ---------------------------------------------------------------------------
class FakeMallopt:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def __call__(self, parameter, value):
        self.calls.append((parameter, value))
        return self.answer


@pytest.fixture
def fresh(monkeypatch):
    """A process whose malloc was never tuned and whose environment has no say; glibc's
    mallopt replaced by a FakeMallopt (so that the test process's malloc stays as is)."""
    monkeypatch.setattr(workspace, "freed_memory_kept", False)
    for name in ("MINIDENSE_KEEP_FREED_MEMORY", "GLIBC_TUNABLES") + process._USER_MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    mallopt = FakeMallopt()
    monkeypatch.setattr(process, "_glibc_mallopt", lambda: mallopt)
    return mallopt


def test_tune_process_asks_malloc_once_and_records_it(fresh):
    assert md.tune_process() is True
    assert fresh.calls == [(-1, 2 ** 30), (-3, 32 * 2 ** 20)]   # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    assert workspace.freed_memory_kept is True
    assert md.tune_process() is True
    assert len(fresh.calls) == 2                                 # not asked again


@pytest.mark.parametrize("name, value", [
    ("MINIDENSE_KEEP_FREED_MEMORY", "0"),
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_MMAP_THRESHOLD_", "65536"),
    ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"),
])
def test_tune_process_leaves_the_users_malloc_settings_alone(fresh, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert md.tune_process() is False
    assert fresh.calls == [] and workspace.freed_memory_kept is False


def test_tune_process_without_glibc_or_when_malloc_refuses(fresh, monkeypatch):
    monkeypatch.setattr(process, "_glibc_mallopt", lambda: None)   # macOS, musl, Windows
    assert md.tune_process() is False and workspace.freed_memory_kept is False
    refusing = FakeMallopt(answer=0)
    monkeypatch.setattr(process, "_glibc_mallopt", lambda: refusing)
    assert md.tune_process() is False and workspace.freed_memory_kept is False
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")   # another tunable: no matter
    monkeypatch.setattr(process, "_glibc_mallopt", lambda: fresh)
    assert md.tune_process() is True


def test_glibc_is_found_where_there_is_one():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert (process._glibc_mallopt() is not None) == glibc


# ---------------------------------------------------------------------------
# The commands, as a user runs them
# ---------------------------------------------------------------------------
# A sitecustomize that reports each start of Python, and at exit what OpenBLAS saw
# (the environment the process was started with) and whether malloc was tuned.
WATCH = textwrap.dedent("""
    import atexit, os, sys

    def started_with():
        try:
            with open("/proc/self/environ", "rb") as f:
                pairs = [p.split(b"=", 1) for p in f.read().split(b"\\0") if b"=" in p]
            return {k.decode(): v.decode() for k, v in pairs}
        except OSError:   # not Linux: the environment as Python saw it at start
            return dict(os.environ)

    print("start", os.getpid(), os.environ.get("OPENBLAS_THREAD_TIMEOUT"), flush=True)

    def report():
        workspace = sys.modules.get("minidense.workspace")
        print("exit", os.getpid(), started_with().get("OPENBLAS_THREAD_TIMEOUT"),
              workspace and workspace.freed_memory_kept, repr(sys.stdin.read()), flush=True)

    atexit.register(report)
""")


def run_watched(tmp_path, args, **env):
    """(exit status, the sitecustomize's reports as tuples, standard error)."""
    (tmp_path / "watch").mkdir(exist_ok=True)
    (tmp_path / "watch" / "sitecustomize.py").write_text(WATCH)
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OPENBLAS_THREAD_TIMEOUT", "MINIDENSE_KEEP_FREED_MEMORY")
                   and not k.startswith("MALLOC_")}
    environment.update(env, PYTHONPATH=os.pathsep.join([str(tmp_path / "watch"), str(REPO_ROOT)]))
    done = subprocess.run([sys.executable] + args, cwd=tmp_path, env=environment, text=True,
                          input="given on standard input", capture_output=True, timeout=120)
    reports = [tuple(line.split(" ", 4)) for line in done.stdout.splitlines()
               if line.startswith(("start ", "exit "))]
    return done.returncode, reports, done.stderr


def test_the_training_command_restarts_with_openblas_spin_set_and_tunes_malloc(tmp_path):
    """One re-execution, in the same process, which OpenBLAS starts in with the variable;
    the exit status, the one error line, standard input and output as without it."""
    missing = tmp_path / "no-such-folder"
    status, reports, stderr = run_watched(tmp_path, ["-m", "minidense.train", "--data", str(missing),
                                                     "--no-plot"])
    assert status == 1, stderr   # a data error, found after the re-execution
    assert stderr.strip().splitlines() == [
        f"minidense-train: data error: ImageFolder: {missing} does not exist"]
    pid = reports[0][1]
    glibc = str(process._glibc_mallopt() is not None)
    assert reports == [("start", pid, "None"), ("start", pid, "4"),
                       ("exit", pid, "4", glibc, "'given on standard input'")]


def test_a_bad_option_is_refused_before_any_restart_and_the_users_spin_wins(tmp_path):
    status, reports, stderr = run_watched(tmp_path, ["-m", "minidense.train", "--epochs", "0"])
    assert status == 2 and stderr.strip().splitlines()[-1] == \
        "minidense-train: error: --epochs must be at least 1, got 0"
    pid = reports[0][1]
    assert reports == [("start", pid, "None"),   # options refused: malloc left alone too
                       ("exit", pid, "None", "False", "'given on standard input'")]
    status, reports, stderr = run_watched(tmp_path, ["-m", "minidense.evaluate", "--checkpoint",
                                                     "missing.npz"], OPENBLAS_THREAD_TIMEOUT="1")
    assert status == 2 and stderr.strip().splitlines()[-1].endswith("no checkpoint at missing.npz: no such file")
    assert [(report[0], report[2]) for report in reports] == [("start", "1"), ("exit", "1")]
