"""``skip_init``: build a module without its default initialisation, as PyTorch's
``torch.nn.utils.skip_init``, for code that initialises the weights itself."""
from __future__ import annotations

import threading

_state = threading.local()


def skip_init(module_cls, *args, **kwargs):
    """``module_cls(*args, **kwargs)`` with every ``reset_parameters`` skipped: the
    parameters are zeros (where PyTorch leaves them uninitialised) and nothing is drawn
    from the random generator, so the weights set afterwards, for example with
    ``nn.init.kaiming_normal_``, are the only draws."""
    previous = getattr(_state, "skipping", False)
    _state.skipping = True
    try:
        return module_cls(*args, **kwargs)
    finally:
        _state.skipping = previous


def initialising() -> bool:
    """False while ``skip_init`` builds a module (in this thread)."""
    return not getattr(_state, "skipping", False)
