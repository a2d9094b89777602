"""The models, read like the papers, are the same models: state-dict keys, parameter
counts, the initial weights a seed draws, and the logits of fixed weights, against the
pins that tests/data/make_model_pins.py wrote from the code before the rewrite."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import minidense as md

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_model_pins  # noqa: E402

PINS = json.loads((DATA / "model_pins.json").read_text())


IMAGENET = {"resnet50", "densenet121"}   # seconds each to build and run: slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in IMAGENET else n
                                  for n in sorted(PINS)])
def test_model_matches_its_pins(name):
    now, pinned = make_model_pins.pins(name), PINS[name]
    assert now["keys"] == pinned["keys"]
    # The one intended change since the pins (PyTorch's BatchNorm2d): every BN's
    # num_batches_tracked beside its running statistics.
    md.manual_seed(0)
    keys = set(md.models.get(name).state_dict())
    counts = {k for k in keys if k.endswith(".num_batches_tracked")}
    assert counts == {k[:-len("running_mean")] + "num_batches_tracked" for k in keys
                      if k.endswith(".running_mean")}
    assert keys - counts == set(pinned["keys"])
    assert now["num_parameters"] == pinned["num_parameters"]
    assert now["initial_weights_sha256"] == pinned["initial_weights_sha256"]
    np.testing.assert_allclose(now["logits"], pinned["logits"], rtol=1e-10, atol=1e-12)
