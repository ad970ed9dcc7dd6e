"""Nesterov accelerated gradient (MXNet ``nag``)."""
from __future__ import annotations

import torch

from .._checks import check_unit_interval
from ._numerics import in_dtype, mx_param
from .base import Optimizer
from .registry import register


@register
class NAG(Optimizer):
    r"""SGD with Nesterov momentum, in MXNet's ``nag_mom_update`` form.

    With :math:`G = \mathrm{clip}(rg\cdot g) + wd\cdot w` (weight decay added *after* the clip) and
    momentum :math:`\mu`:

    .. math::
        \mu = 0:\quad & w \leftarrow (1 - lr\cdot wd)\,w - lr\cdot\mathrm{clip}(rg\cdot g) \\
        \mu > 0:\quad & m' = \mu\,mom,\qquad
                        w' \leftarrow w - m' + (1 + \mu)(m' - lr\cdot G) \\
                      & mom \leftarrow m' - lr\cdot\big(\mathrm{clip}(rg\cdot g) + wd\cdot w'\big),
                        \qquad w \leftarrow w'

    that is :math:`w' = w + \mu^2 mom - (1+\mu)\,lr\cdot G`. MXNet's kernel runs in place and
    reads the weight again for the new buffer, so the buffer's weight-decay term uses the *updated*
    weight :math:`w'` (kept for parity; it only matters when ``wd != 0``).

    State: ``mom`` (weight dtype) or None when ``momentum == 0``; multi-precision ``(mom, w32)``.
    fp16 weights without multi-precision compute in fp16, as MXNet's ``half_t`` kernel does: every operation is
    rounded, the float parameters and :math:`\mu + 1`, :math:`1 - lr\cdot wd` too, on every path
    (``tests/test_half_kernels.py``).

    Row-sparse gradients: lazy for ``momentum == 0`` in fp32 (MXNet calls ``sgd_update``, lazy by default:
    only the gradient's rows change), otherwise standard (``nag_mom_update`` and the ``mp_*`` kernels fall
    back to the dense rule, :math:`g = 0` on absent rows).

    Differs from ``torch.optim.SGD(nesterov=True)``: the buffer holds the lr-scaled, negated velocity
    (torch keeps ``buf = μ·buf + g`` and steps ``lr·(g + μ·buf)``), and weight decay is never clipped.

    Parameters
    ----------
    momentum : float in [0, 1), default 0
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("mom",)  # the state's tensors, as the docstring names them

    _mp_master_first = False

    def __init__(self, momentum=0.0, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        super().__init__(**kwargs)
        self.momentum = momentum

    def create_state(self, index, weight):
        return torch.zeros_like(weight) if self.momentum != 0.0 else None

    def sparse_mode(self, index, multi_precision):
        # momentum 0 calls sgd_update (lazy by default); nag_mom_update and the mp kernels fall back to dense
        return "lazy" if self.momentum == 0.0 and not multi_precision else "standard"

    def prepare(self, *, lr, wd, t, index, dtype):
        lr, wd, mu = (mx_param(x, dtype) for x in (lr, wd, self.momentum))  # the kernels' float parameters
        rg = mx_param(self.rescale_grad, dtype)
        # sgd_update's (1 - lr*wd) and unclipped lr*rg are rounded to the kernel's dtype first
        # (param_momentum + 1) and (1 - lr*wd) are DType expressions too: fp16's half_t rounds them
        return (lr, wd, mu, in_dtype(mu + 1, dtype), rg, in_dtype(1 - in_dtype(lr * wd, dtype), dtype),
                in_dtype(lr * rg, dtype))

    def kernel(self, w, g, mom, s, seg=None):
        lr, wd, mu, mu_1, rg, decay, lr_rg = s
        if mom is None:  # sgd_update
            step = lr * self._clip(rg * g) if self.clip_gradient else lr_rg * g
            return decay * w - step, None
        G = self._clip(g * rg)
        m = mu * mom
        new_w = w - m + mu_1 * (m - lr * (G + wd * w))
        return new_w, m - lr * (G + wd * new_w)
