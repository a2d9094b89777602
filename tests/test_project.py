"""The project as a user gets it: the README's commands, the wheel, the repository's size."""
import os
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT

# The GPU machine receives at most 64 MiB; the 59.3 MiB CIFAR-10 zip must fit beside the code.
MAX_TRACKED_BYTES = 3 * 1024 * 1024


def readme_commands():
    """The shell commands of the README's first code block."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [REPO_ROOT / name for name in out.decode().split("\0") if name]


def test_ci_runs_the_readmes_test_command():
    train_command, test_command = readme_commands()
    assert "minidense.train" in train_command and "pytest" in test_command
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command, "the last line of .ci/run must be the README's test command"
    assert any("python3 -m venv" in line for line in ci), ".ci/run must make a fresh venv"


def test_tracked_files_stay_small():
    files = [path for path in tracked_files() if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    largest = sorted(files, key=lambda p: p.stat().st_size)[-3:]
    assert total < MAX_TRACKED_BYTES, (
        f"tracked files take {total / 2**20:.2f} MiB, over {MAX_TRACKED_BYTES / 2**20:.0f} MiB; "
        f"largest: {[(str(p.relative_to(REPO_ROOT)), p.stat().st_size) for p in largest]}")


def test_the_wheel_holds_every_file_the_package_reads(tmp_path):
    """Build a wheel from the tracked files alone, install it into an empty folder, and use
    it from a process that cannot see the checkout: every module imports, and every data
    file of the package (anything under minidense/ that is not Python) is inside."""
    source = tmp_path / "source"
    package_files = []
    for path in tracked_files():
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] in ("minidense",) or relative.name in ("pyproject.toml", "README.md"):
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            (source / relative).write_bytes(path.read_bytes())
            if relative.parts[0] == "minidense":
                package_files.append(relative.as_posix())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("minidense-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
        missing = [name for name in package_files if name not in inside]
        assert not missing, f"the wheel lacks {missing}"
        archive.extractall(tmp_path / "site")

    program = (
        "import importlib, pkgutil, minidense as md\n"
        "assert md.__file__.startswith(%r), md.__file__\n"
        "for info in pkgutil.walk_packages(md.__path__, 'minidense.'):\n"
        "    if info.name not in ('minidense.train', 'minidense.evaluate'):\n"
        "        importlib.import_module(info.name)\n"
        "import minidense.train, minidense.evaluate\n"
        "model = md.models.get('resnet20')\n"
        "print('ok', sum(1 for _ in model.parameters()))\n") % str(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
