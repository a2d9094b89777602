"""The commands as a user runs them, each in its own process: a bad option gets the
usage line, one error line and exit status 2 before any data is read; a data error one
line and status 1; a diverged run one line and status 3 with the last good checkpoint
kept; a second Ctrl-C during a save leaves the previous checkpoint intact.  None of them
prints a traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest

import minidense as md
from conftest import REPO_ROOT

HARNESS = REPO_ROOT / "tests" / "cli_harness.py"
TINY = ["--data", "digits", "--model", "densenet_cifar",
        "--model-args", "depth=10,growth_rate=4,bottleneck=true,compression=0.5",
        "--subset", "96", "--test-subset", "60", "--batch-size", "16", "--epochs", "2",
        "--lr", "0.05", "--no-plot"]


def run(args, cwd, module="minidense.train", harness=None, timeout=180):
    """Run a command of the checkout in a fresh process; return (status, stdout, stderr)."""
    # OPENBLAS_THREAD_TIMEOUT set, as by a user who chose it: the commands then start once,
    # not twice (tests/test_process.py checks the re-execution, test_distributed.py runs it
    # under mpiexec).
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MINIDENSE_DATA=str(cwd / "cache"),
               OPENBLAS_THREAD_TIMEOUT="4")
    env.pop("MINIDENSE_CIFAR10", None)
    command = [sys.executable] + ([str(HARNESS), harness] if harness else ["-m", module])
    done = subprocess.run(command + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def error_line(stderr):
    """The one message line (the last line of standard error)."""
    return stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------
# Bad options: exit 2, before any data.  Every case names a data folder that does not
# exist, so reading data first would fail differently (exit 1).
# ---------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--model", "resnet21"], "unknown model 'resnet21'; the closest names: resnet"),
    (["--model", "resnet20x"], "resnet20"),
    (["--epochs", "-3"], "--epochs must be at least 1, got -3"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--subset", "0"], "--subset must be at least 1, got 0"),
    (["--test-subset", "0"], "--test-subset must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--stop-after", "0"], "--stop-after must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number above 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number above 0"),
    (["--lr", "-0.1"], "--lr must be a finite number above 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--wd=-1e-4"], "--wd must be a finite number of at least 0"),
    (["--warmup", "5", "--epochs", "5"], "--warmup must be at least 0 and less than the 5 epochs"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--milestones", "0.75,0.5"], "--milestones must be increasing fractions"),
    (["--milestones", "0.5,1.5"], "--milestones must be increasing fractions"),
    (["--milestones", "half"], "--milestones: expected fractions such as 0.5,0.75"),
    (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--model-args", "depth=7"], "resnet20 already fixes depth; use --model resnet_cifar"),
    (["--model-args", "colour=3"], "resnet20 has no parameter 'colour'"),
    (["--model-args", "num_classes=3"], "num_classes comes from the data"),
    (["--model-args", "depth"], "--model-args: expected key=value, got 'depth'"),
    (["--model", "resnet_cifar", "--model-args", "depth=7"], "depth 6n + 2"),
    (["--subset", "10", "--batch-size", "16"], "--subset 10 is smaller than one batch"),
    (["--resume", "garbage.npz"], "--resume: there is no checkpoint at garbage.npz"),
    (["--profile", "0"], "--profile must be at least 1, got 0"),
] + ([] if md.cuda_available() else [
    (["--device", "cuda"], "--device cuda: device 'cuda' was requested but"),
])


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_status_2_before_any_data(args, message, tmp_path):
    status, _, stderr = run(["--data", tmp_path / "no-such-data"] + args, tmp_path)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("usage: minidense-train")
    assert error_line(stderr).startswith("minidense-train: error: ")
    assert message in error_line(stderr)
    assert not (tmp_path / "cache").exists(), "the data was touched"


def test_an_unwritable_out_is_refused_at_the_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, stderr = run(["--data", tmp_path / "no-such-data", "--out", blocker / "run"],
                            tmp_path)
    assert status == 2
    assert f"--out {blocker / 'run'}: cannot write there" in error_line(stderr)


def test_a_damaged_checkpoint_cannot_be_resumed(tmp_path):
    damaged = tmp_path / "last.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    status, _, stderr = run(["--resume", damaged], tmp_path)
    assert status == 2 and "is not a readable .npz file" in error_line(stderr)
    md.save({"weights": np.zeros(3)}, tmp_path / "other.npz")
    status, _, stderr = run(["--resume", tmp_path / "other.npz"], tmp_path)
    assert status == 2 and "not a checkpoint of minidense.train" in error_line(stderr)


def test_data_smaller_than_a_batch_is_refused_once_read(tmp_path):
    """Without --subset only the data knows its size: the digits' 1,442 training images
    cannot fill one batch of 5,000."""
    status, _, stderr = run(["--data", "digits", "--batch-size", "5000", "--epochs", "1",
                             "--out", tmp_path / "run"], tmp_path)
    assert status == 2
    assert "the training set has 1442 images, fewer than one batch (--batch-size 5000)" \
        in error_line(stderr)


# ---------------------------------------------------------------------------
# Data errors: exit 1, one line naming the path
# ---------------------------------------------------------------------------
def image_tree(root, classes, splits=("train", "test")):
    from PIL import Image
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


def data_error(tmp_path, folder):
    status, _, stderr = run(["--data", folder, "--model", "resnet20", "--batch-size", "2",
                             "--epochs", "1", "--out", tmp_path / "out"], tmp_path)
    assert status == 1, stderr
    assert error_line(stderr).startswith("minidense-train: data error: ")
    return error_line(stderr)


def test_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    line = data_error(tmp_path, tmp_path / "empty")
    assert "no train/<class>/*.png|jpg images in" in line and str(tmp_path / "empty") in line


def test_a_zip_without_images(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "nothing.zip", "w") as archive:
        archive.writestr("readme.txt", "no images here")
    line = data_error(tmp_path, tmp_path / "nothing.zip")
    assert "no train/<class>/*.png|jpg images in" in line and "nothing.zip" in line


def test_a_class_missing_from_test(tmp_path):
    root = image_tree(tmp_path / "images", ["cat", "dog"])
    for image in (root / "test" / "dog").iterdir():
        image.unlink()
    (root / "test" / "dog").rmdir()
    line = data_error(tmp_path, root)
    assert "test/ has no images of the class(es) dog" in line and str(root) in line


def test_an_image_that_does_not_decode(tmp_path):
    root = image_tree(tmp_path / "images", ["cat", "dog"])
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG but broken")
    line = data_error(tmp_path, root)
    assert "train/dog/1.png is not a readable image" in line and str(root) in line


def test_a_missing_data_path(tmp_path):
    line = data_error(tmp_path, tmp_path / "absent.zip")
    assert f"{tmp_path / 'absent.zip'} does not exist" in line


# ---------------------------------------------------------------------------
# Divergence: exit 3; the last good checkpoint stays and resumes
# ---------------------------------------------------------------------------
def test_a_huge_learning_rate_stops_the_run_without_a_checkpoint(tmp_path):
    """lr 1000: the loss reaches ~1e16 in the first epoch and BN running variances
    overflow; nothing may be saved."""
    status, _, stderr = run(TINY + ["--lr", "1000", "--out", tmp_path / "run"], tmp_path)
    assert status == 3, stderr
    line = error_line(stderr)
    assert line.startswith("minidense-train: the run diverged at epoch 1, batch ")
    assert "running_var" in line and "Try a lower --lr (this run: 1000)" in line
    assert "no checkpoint was written" in line
    assert not (tmp_path / "run" / "last.npz").exists()
    assert not (tmp_path / "run" / "best.npz").exists()


@pytest.mark.parametrize("planted,expected", [
    ("nan-weight", "the run diverged at epoch 2, batch 3 of 6: the loss is nan; the last "
                   "finite training loss was "),
    ("inf-statistic", "the run diverged at epoch 2, batch 6 of 6: non-finite values in "
                      "block1.layer1.norm1.running_var (1 of the model's arrays)"),
])
def test_divergence_keeps_the_last_good_checkpoint(planted, expected, tmp_path):
    out = tmp_path / "run"
    status, _, stderr = run(TINY + ["--out", out], tmp_path, harness=planted)
    assert status == 3, stderr
    assert expected in error_line(stderr)
    assert f"{out / 'last.npz'} still holds the last good checkpoint" in error_line(stderr)
    for name in ("last.npz", "best.npz"):
        checkpoint = md.load(out / name)
        assert checkpoint["progress"]["epoch"] == 1
        assert all(np.isfinite(v).all() for v in checkpoint["model"].values())
    status, _, stderr = run(["--resume", "--out", out], tmp_path)
    assert status == 0, stderr
    assert md.load(out / "last.npz")["progress"]["epoch"] == 2


# ---------------------------------------------------------------------------
# Ctrl-C twice: the second one, during the save, exits at once and loses nothing
# ---------------------------------------------------------------------------
def test_second_ctrl_c_during_the_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    status, stdout, stderr = run(TINY + ["--out", out], tmp_path, harness="ctrl-c-twice")
    assert status == 130, stderr
    assert "Ctrl-C: stopping after this batch" in stdout
    assert "interrupted without saving" in error_line(stderr)
    checkpoint = md.load(out / "last.npz")          # intact, and still epoch 1's
    assert (checkpoint["progress"]["epoch"], checkpoint["progress"]["step"]) == (1, 0)
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    status, _, stderr = run(["--resume", "--out", out], tmp_path)
    assert status == 0, stderr


def test_sigterm_twice_still_saves(tmp_path):
    """A job's SIGTERM can reach a process twice (from the scheduler and from mpiexec):
    the run still stops after the batch and saves."""
    out = tmp_path / "run"
    status, stdout, stderr = run(TINY + ["--out", out], tmp_path, harness="sigterm-twice")
    assert status == 130, stderr
    assert "SIGTERM: stopping after this batch" in stdout
    progress = md.load(out / "last.npz")["progress"]
    assert (progress["epoch"], progress["step"]) == (1, 3)   # sent before batch 3: after it


# ---------------------------------------------------------------------------
# minidense.evaluate
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a 1-epoch tiny run on the digits."""
    folder = tmp_path_factory.mktemp("trained")
    status, _, stderr = run(TINY + ["--epochs", "1", "--out", folder / "run"], folder)
    assert status == 0, stderr
    return folder / "run" / "last.npz"


def evaluate_error(args, cwd, message):
    status, _, stderr = run(args, cwd, module="minidense.evaluate")
    assert status == 2, stderr
    assert stderr.strip().splitlines()[0].startswith("usage: minidense-evaluate")
    assert error_line(stderr).startswith("minidense-evaluate: error: ")
    assert message in error_line(stderr)


def test_evaluate_refuses_a_missing_or_damaged_checkpoint(tmp_path):
    evaluate_error(["--checkpoint", tmp_path / "none.npz"], tmp_path, "none.npz: no such file")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    evaluate_error(["--checkpoint", tmp_path / "bad.npz"], tmp_path, "is not a readable .npz")
    md.save({"weights": np.zeros(3)}, tmp_path / "other.npz")
    evaluate_error(["--checkpoint", tmp_path / "other.npz"], tmp_path,
                   "not a checkpoint of minidense.train")


def test_evaluate_refuses_a_checkpoint_of_another_model_or_class_count(trained, tmp_path):
    checkpoint = md.load(trained)
    checkpoint["classes"] = checkpoint["classes"][:3]          # 3 classes, a 10-class head
    md.save(checkpoint, tmp_path / "three.npz")
    evaluate_error(["--checkpoint", tmp_path / "three.npz"], tmp_path,
                   "its weights do not fit 'densenet_cifar' with 3 classes")
    checkpoint = md.load(trained)
    checkpoint["settings"]["model"], checkpoint["settings"]["model_args"] = "resnet20", ""
    md.save(checkpoint, tmp_path / "other-model.npz")
    evaluate_error(["--checkpoint", tmp_path / "other-model.npz"], tmp_path,
                   "its weights do not fit 'resnet20' with 10 classes")


def test_evaluate_refuses_data_without_a_test_split(trained, tmp_path):
    image_tree(tmp_path / "train-only", [str(d) for d in range(10)], splits=("train",))
    evaluate_error(["--checkpoint", trained, "--data", tmp_path / "train-only"], tmp_path,
                   "no test/<class>/*.png|jpg images in")


@pytest.mark.skipif(md.cuda_available(), reason="this machine has a GPU")
def test_evaluate_refuses_a_missing_gpu(trained, tmp_path):
    evaluate_error(["--checkpoint", trained, "--device", "cuda"], tmp_path,
                   "--device cuda: device 'cuda' was requested but")


def test_evaluate_refuses_bad_sizes(trained, tmp_path):
    evaluate_error(["--checkpoint", trained, "--batch-size", "0"], tmp_path,
                   "--batch-size must be at least 1")
    evaluate_error(["--checkpoint", trained, "--subset", "-1"], tmp_path,
                   "--subset must be at least 1")


def test_evaluate_runs_on_a_good_checkpoint(trained, tmp_path):
    status, stdout, stderr = run(["--checkpoint", trained, "--subset", "60"], tmp_path,
                                 module="minidense.evaluate")
    assert status == 0, stderr
    assert "test accuracy" in stdout
