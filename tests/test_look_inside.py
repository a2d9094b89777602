"""examples/look_inside.py on random weights: with none (it says how to get torchvision's)
and with a .safetensors file in torchvision's names."""
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import minidense as md

REPO = Path(__file__).resolve().parent.parent


def run_example(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["look_inside.py", *map(str, args)])
    runpy.run_path(str(REPO / "examples" / "look_inside.py"), run_name="__main__")


def test_look_inside_runs_on_random_weights_and_writes_its_pictures(tmp_path, capsys, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    pytest.importorskip("safetensors")
    y, x = np.mgrid[0:60, 0:80]  # a landscape "photo": a disc on stripes
    pixels = np.stack([x * 3 % 256, y * 4 % 256, ((x - 40) ** 2 + (y - 30) ** 2 < 300) * 255], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "photo.jpg")

    run_example(monkeypatch, "--image", tmp_path / "photo.jpg", "--resize", 72, "--crop", 64,
                "--out", tmp_path / "random")
    out = capsys.readouterr().out
    assert "No --weights: random weights" in out and "safetensors.torch.save_file" in out
    assert "Top-5 classes:" in out
    classes = md.data.imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "tench"
    shown = [line for line in out.splitlines() if line.startswith("  ") and "%" in line]
    assert len(shown) == 5 and all(line.split(None, 2)[2] in classes for line in shown)
    assert "block4 (1024 channels, 2x2)" in out and "(layer " in out
    assert "block3: input" in out
    for name in ("feature_maps.png", "connectivity.png"):
        assert (tmp_path / "random" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same with --weights: torchvision's names in a .safetensors file, eval-mode BN
    weights = md.models.export_state_dict(md.models.get("densenet121"), "torchvision")
    md.save(weights, tmp_path / "densenet121.safetensors")
    run_example(monkeypatch, "--image", tmp_path / "photo.jpg", "--weights", tmp_path / "densenet121.safetensors",
                "--resize", 36, "--crop", 32, "--channels", 2, "--out", tmp_path / "loaded")
    out = capsys.readouterr().out
    assert "No --weights" not in out and "block4 (1024 channels, 1x1)" in out
    assert sorted(p.name for p in (tmp_path / "loaded").iterdir()) == ["connectivity.png", "feature_maps.png"]
