"""AdaDelta (MXNet ``adadelta``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_nonnegative, check_unit_interval
from ._numerics import mx_scalar, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class AdaDelta(Optimizer):
    r"""AdaDelta (Zeiler 2012): no learning rate, decoupled weight decay.

    **The learning rate is never read**: ``learning_rate``, ``lr_mult`` and ``lr_scheduler`` are
    accepted (as in MXNet) and have no effect on the update.

    With :math:`G = \mathrm{clip}(rg\cdot g)` (weight decay is *not* clipped):

    .. math::
        a_g &\leftarrow \rho\,a_g + (1-\rho)\,G^2 \\
        \Delta &= \frac{\sqrt{a_\Delta + \epsilon}}{\sqrt{a_g + \epsilon}}\,G \\
        a_\Delta &\leftarrow \rho\,a_\Delta + (1-\rho)\,\Delta^2 \\
        w &\leftarrow w - (\Delta + wd\cdot w)

    (MXNet's docstring puts :math:`wd\cdot w` inside the clipped gradient; its code, followed here,
    subtracts it from the weight, not scaled by any learning rate.) MXNet scales the caller's gradient
    in place (``grad *= rescale_grad``); optzoo leaves it untouched, with the same numbers.

    State: ``(acc_g, acc_delta)`` :math:`(a_g, a_\Delta)`, always **fp32** (MXNet creates them with no
    dtype); multi-precision ``(w32, state)``. MXNet 1.9.1 raises for any other weight dtype; optzoo
    computes in fp64 for fp64 weights and in fp32 for fp16/bf16 weights, storing the states in fp32.
    Scalars enter as MXNet's NDArray ops see them (``mx_scalar``), square roots are correctly
    rounded (``sqrt_rn``).

    Differs from ``torch.optim.Adadelta``: torch multiplies the step :math:`\Delta` by ``lr`` (default
    1.0), adds ``weight_decay * w`` to the gradient before the accumulators (coupled L2), and defaults to
    ``eps=1e-6``.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's NDArray ops), fp32 and multi-precision alike: the rule above with :math:`g = 0` on absent
    rows.

    Parameters
    ----------
    rho : float in [0, 1), default 0.9
        :math:`\rho`, decay of both accumulators.
    epsilon : float >= 0, default 1e-5
    **kwargs : the :class:`Optimizer` arguments (the learning-rate ones are ignored).
    """

    state_names = ("acc_g", "acc_delta")  # the state's tensors, as the docstring names them

    def __init__(self, rho=0.90, epsilon=1e-5, **kwargs):
        rho = check_unit_interval("rho", rho)
        epsilon = check_nonnegative("epsilon", epsilon)
        super().__init__(**kwargs)
        self.rho, self.epsilon = rho, epsilon

    def create_state(self, index, weight):
        return (torch.zeros_like(weight, dtype=torch.float32),   # acc_g
                torch.zeros_like(weight, dtype=torch.float32))   # acc_delta

    def prepare(self, *, lr, wd, t, index, dtype):
        ct = torch.promote_types(dtype, torch.float32)  # see "State" in the docstring
        D = functools.partial(mx_scalar, dtype=ct)  # scalars as MXNet's NDArray ops see them
        return D(self.rho), D(1.0 - self.rho), D(self.epsilon), D(self.rescale_grad), D(wd)

    def kernel(self, w, g, state, s, seg=None):
        rho, one_minus_rho, eps, rg, wd = s
        ct = torch.promote_types(w.dtype, torch.float32)
        acc_g, acc_delta = (x.to(ct) for x in state)
        w, g = w.to(ct), g.to(ct)
        G = self._clip(g * rg)
        acc_g = acc_g * rho + one_minus_rho * G * G
        delta = sqrt_rn(acc_delta + eps) / sqrt_rn(acc_g + eps) * G
        acc_delta = acc_delta * rho + one_minus_rho * delta * delta
        return w - (delta + wd * w), (acc_g, acc_delta)
