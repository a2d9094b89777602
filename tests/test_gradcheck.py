"""md.gradcheck itself: it passes correct ops and reports wrong ones clearly."""
import numpy as np
import pytest

import minidense as md
from minidense.autograd import Function


class Square(Function):
    def __init__(self, factor=2.0):
        self.factor = factor  # 2.0 is right; anything else is a planted bug

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, gy):
        (x,) = self.saved
        return gy * self.factor * x


def _x(shape, seed=0):
    return md.tensor(np.random.default_rng(seed).uniform(0.5, 1.5, shape), requires_grad=True)


def test_passes_a_correct_backward():
    assert md.gradcheck(lambda t: Square()(t), [_x((3, 4))])


def test_reports_op_element_values_and_tolerance_element_by_element():
    with pytest.raises(md.GradcheckError) as info:
        md.gradcheck(lambda t: Square(2.1)(t), [_x((3, 4))])
    message = str(info.value)
    for part in ("Square", "input 0", "shape (3, 4)", "element (", "analytical", "numerical",
                 "tolerance"):
        assert part in message


def test_catches_a_wrong_backward_along_random_directions_for_large_inputs():
    x = _x((20, 20))
    assert md.gradcheck(lambda t: Square()(t), [x])
    with pytest.raises(md.GradcheckError, match="random direction"):
        md.gradcheck(lambda t: Square(2.05)(t), [x])


def test_returns_false_when_asked_not_to_raise():
    assert md.gradcheck(lambda t: Square(3.0)(t), [_x(5)], raise_exception=False) is False


def test_refuses_float32():
    with pytest.raises(ValueError, match="float64"):
        md.gradcheck(lambda t: t * t, [md.tensor([1.0, 2.0], requires_grad=True)])


def test_leaves_the_callers_inputs_untouched():
    x = _x((2, 3))
    before = x.numpy()
    md.gradcheck(lambda t: Square()(t), [x])
    np.testing.assert_array_equal(x.numpy(), before)
    assert x.grad is None


def test_custom_op_example_runs(capsys):
    import runpy
    from pathlib import Path
    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "custom_op.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gradcheck(swish): True" in out and "the buggy version is caught" in out
