"""``md.plain_ops()`` runs a whole model on the plain (textbook) algorithms; the fast
paths give the same training, to float32 rounding."""
import numpy as np
import pytest

import minidense as md
from minidense.models.densenet import densenet_cifar
from minidense.models.resnet import resnet_cifar


def _train_two_steps(make_model, plain):
    md.manual_seed(0)
    model = make_model()
    optimizer = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    losses, ops = [], set()
    with md.plain_ops(plain):
        for _ in range(2):
            x = md.tensor(rng.normal(size=(4, 3, 16, 16)).astype(np.float32))
            y = md.tensor(rng.integers(0, 10, size=4))
            with md.profiler() as prof:
                loss = md.cross_entropy(model(x), y)
            ops |= {row["name"] for row in prof.rows()}
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model.state_dict(), ops


@pytest.mark.parametrize("make_model", [
    lambda: densenet_cifar(10, 4, bottleneck=True, compression=0.5),    # DenseNet-BC
    lambda: resnet_cifar(8),
], ids=["densenet_bc10", "resnet8"])
def test_plain_ops_train_like_the_fast_paths(make_model):
    fast_losses, fast_state, fast_ops = _train_two_steps(make_model, plain=False)
    plain_losses, plain_state, plain_ops = _train_two_steps(make_model, plain=True)
    # The plain run has no fused op: BN and ReLU are two ops again.
    assert "BatchNormReLU" in fast_ops and "BatchNormReLU" not in plain_ops
    assert {"BatchNorm", "ReLU"} <= plain_ops
    np.testing.assert_allclose(plain_losses, fast_losses, rtol=1e-5)
    for key in fast_state:
        np.testing.assert_allclose(plain_state[key], fast_state[key], rtol=2e-4, atol=2e-5, err_msg=key)
