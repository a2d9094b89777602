"""Define your own op, check its gradient, and see what a wrong backward looks like.

Swish (Ramachandran et al., 2017): y = x * sigmoid(x),
    dy/dx = sigmoid(x) + x * sigmoid(x) * (1 - sigmoid(x)) = s + y * (1 - s).

Run:  python examples/custom_op.py
"""
import numpy as np
from hypothesis import given, settings

import minidense as md
from minidense import backend
from minidense.testing import arrays, shapes, tensors_from


class Swish(md.Function):
    """x * sigmoid(x).  Keeps: x and sigmoid(x) (both needed by the derivative)."""

    def forward(self, x):
        xp = backend.get_array_module(x)  # NumPy or CuPy: the op works on both
        s = 1 / (1 + xp.exp(-x))
        self.save_for_backward(x, s)
        return x * s

    def backward(self, gy):
        x, s = self.saved
        return gy * (s + x * s * (1 - s))


class SwishWithABug(Swish):
    def backward(self, gy):
        x, s = self.saved
        return gy * (s + x * s)  # forgot the (1 - s)


def swish(x):
    return Swish()(x)


def main():
    # 1. One check by hand, in float64 (finite differences in float32 are mostly rounding).
    x = md.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    print("gradcheck(swish):", md.gradcheck(swish, [x]))

    # 2. Many checks, with shapes and values drawn by hypothesis.
    @settings(max_examples=50, deadline=None)
    @given(x=shapes(max_dims=4).flatmap(arrays))
    def check_swish(x):
        assert md.gradcheck(swish, [tensors_from(x)])
    check_swish()
    print("50 hypothesis-drawn shapes: all pass")

    # 3. What a wrong backward looks like.
    try:
        md.gradcheck(lambda t: SwishWithABug()(t), [x])
    except md.GradcheckError as error:
        print("the buggy version is caught:\n ", error)


if __name__ == "__main__":
    main()
