"""MXNet's trivial ``Test`` optimizer (``test``)."""
from __future__ import annotations

import torch

from ._numerics import mx_scalar
from .base import Optimizer
from .registry import register


@register
class Test(Optimizer):
    r"""MXNet's ``Test`` optimizer: adds the rescaled gradient and keeps a copy of the weight.

    .. math::
        w \leftarrow w + rg\cdot g,\qquad state \leftarrow w

    The gradient is *added* (no learning rate, weight decay or clipping), and the update is not
    counted (``num_update`` stays at ``begin_num_update``), as in MXNet, where it serves to test the
    Updater and kvstore plumbing.

    State: a float32 copy of the weight (MXNet creates it with the default dtype, float32, zeros);
    multi-precision ``(w32, state32)``.

    torch.optim has no counterpart (it is a plumbing test, not an optimizer).

    Parameters
    ----------
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("state",)  # the state's tensors, as the docstring names them

    _counts_updates = False

    def create_state(self, index, weight):
        return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def prepare(self, *, lr, wd, t, index, dtype):
        return (mx_scalar(self.rescale_grad, dtype),)

    def kernel(self, w, g, state, s, seg=None):
        (rg,) = s
        w = w + g * rg
        return w, w
