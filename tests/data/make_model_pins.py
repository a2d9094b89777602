"""Writes tests/data/model_pins.json: what tests/test_model_pins.py holds the models to.

For each model: its state-dict keys (sorted), its parameter count, a SHA-256 of its
initial weights after ``md.manual_seed(0)``, and its logits in eval mode, float64, for
fixed weights drawn here and a fixed input.  Run it with the code whose models are the
reference (the pins were written by the code before the models were rewritten to read
like the papers, commit 0ef6887):

    PYTHONPATH=<checkout> python tests/data/make_model_pins.py tests/data/model_pins.json
"""
import hashlib
import json
import sys

import numpy as np

import minidense as md

CASES = {   # name: (options, input shape)
    "resnet20": ({}, (2, 3, 32, 32)),
    "densenet40_k12": ({}, (2, 3, 32, 32)),
    "densenet_bc100_k12": ({}, (2, 3, 32, 32)),
    "resnet50": ({}, (1, 3, 64, 64)),
    "densenet121": ({}, (1, 3, 64, 64)),
}


def fixed_weights(model, seed=0):
    """Weights drawn from NumPy's generator by key, with positive running variances."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in sorted(model.state_dict().items()):
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, value.shape)
        elif key.endswith("num_batches_tracked"):
            state[key] = value
        else:
            state[key] = rng.normal(0, 0.1, value.shape)
    return state


def initial_digest(model):
    digest = hashlib.sha256()
    for key in sorted(model.state_dict()):
        if not key.endswith("num_batches_tracked"):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(model.state_dict()[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def pins(name):
    options, shape = CASES[name]
    md.manual_seed(0)
    model = md.models.get(name, **options)
    digest = initial_digest(model)
    model.double().eval()
    model.load_state_dict(fixed_weights(model))
    x = md.tensor(np.random.default_rng(1).normal(size=shape), dtype=np.float64)
    with md.no_grad():
        logits = model(x).numpy()
    return {"keys": sorted(k for k in model.state_dict() if not k.endswith("num_batches_tracked")),
            "num_parameters": int(sum(p.data.size for p in model.parameters())),
            "initial_weights_sha256": digest, "logits": logits.tolist()}


if __name__ == "__main__":
    result = {name: pins(name) for name in CASES}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
