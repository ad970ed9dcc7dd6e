"""DCASGD: delay-compensated asynchronous SGD (MXNet ``dcasgd``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_nonnegative, check_unit_interval
from ._numerics import mx_scalar
from .base import Optimizer
from .registry import register


@register
class DCASGD(Optimizer):
    r"""Delay-compensated asynchronous SGD (Zheng et al., 2017).

    With :math:`G = \mathrm{clip}(rg\cdot g)`, momentum :math:`\mu`, compensation scale :math:`\lambda`
    and :math:`w_{prev}` the weight before the previous update:

    .. math::
        d &= -lr\cdot\big(G + wd\cdot w + \lambda\,G^2\,(w - w_{prev})\big) \\
        \mu = 0:\quad & w_{prev} \leftarrow w,\qquad w \leftarrow w + d \\
        \mu > 0:\quad & mom \leftarrow \mu\,mom + d,\qquad w_{prev} \leftarrow w,\qquad w \leftarrow w + mom

    The term :math:`\lambda G^2 (w - w_{prev})` is a diagonal Hessian approximation that compensates
    for a gradient computed at the stale weight :math:`w_{prev}`.

    MXNet 1.9.1 raises for ``momentum > 0`` (``if mom:`` on an NDArray); optzoo implements the
    intended update above, as MXNet master does.

    State: ``(mom, w_prev)`` with ``mom`` None when ``momentum == 0`` and ``w_prev`` a copy of the
    weight; multi-precision ``(w32, (mom32, w_prev32))``.

    torch.optim has no DCASGD.

    Parameters
    ----------
    momentum : float in [0, 1), default 0
    lamda : float >= 0, default 0.04
        The compensation scale :math:`\lambda` (MXNet's spelling).
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("mom", "w_prev")  # the state's tensors, as the docstring names them

    def __init__(self, momentum=0.0, lamda=0.04, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        lamda = check_nonnegative("lamda", lamda)
        super().__init__(**kwargs)
        self.momentum, self.lamda = momentum, lamda

    def create_state(self, index, weight):
        mom = torch.zeros_like(weight) if self.momentum != 0.0 else None
        return (mom, weight.detach().clone())  # (mom, w_prev)

    def prepare(self, *, lr, wd, t, index, dtype):
        D = functools.partial(mx_scalar, dtype=dtype)  # scalars as MXNet's NDArray ops see them
        return D(self.rescale_grad), D(-lr), D(wd), D(self.lamda), D(self.momentum)

    def kernel(self, w, g, state, s, seg=None):
        rg, neg_lr, wd, lamda, mu = s
        mom, w_prev = state
        G = self._clip(g * rg)
        d = neg_lr * (G + wd * w + lamda * G * G * (w - w_prev))
        if mom is not None:
            d = mom * mu + d
        # torch 2.13's inductor stores the *updated* w into a state set to the input w (or to w.clone());
        # w * 1 (exact, fused into the loop) keeps the value from before the update
        w_prev = w * 1 if torch.compiler.is_compiling() else w
        return w + d, (None if mom is None else d, w_prev)
