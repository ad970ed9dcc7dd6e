"""RMSProp, plain (Tieleman & Hinton) and centered (Graves) (MXNet ``rmsprop``)."""
from __future__ import annotations

import torch

from .._checks import check_bool, check_nonnegative, check_optional_clip, check_unit_interval
from ._numerics import mx_float, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class RMSProp(Optimizer):
    r"""RMSProp with epsilon inside the square root, coupled L2 weight decay and optional weight clipping.

    With :math:`G = \mathrm{clip}(rg\cdot g + wd\cdot w)` (weight decay *inside* the clip), plain
    (``centered=False``, Tieleman & Hinton):

    .. math::
        n &\leftarrow (1-\gamma_1)\,G^2 + \gamma_1 n \\
        w &\leftarrow w - lr\cdot G/\sqrt{n + \epsilon}

    centered (``centered=True``, Graves 2013, eqs. 38-45), with momentum :math:`\gamma_2`:

    .. math::
        n &\leftarrow (1-\gamma_1)\,G^2 + \gamma_1 n \\
        \bar g &\leftarrow (1-\gamma_1)\,G + \gamma_1 \bar g \\
        \delta &\leftarrow \gamma_2\,\delta - lr\cdot G/\sqrt{n - \bar g^2 + \epsilon} \\
        w &\leftarrow w + \delta

    then, if ``clip_weights`` is set, :math:`w \leftarrow \mathrm{clip}(w, -cw, cw)` (:math:`\delta`
    keeps its unclipped value). :math:`\gamma_2` is unused when not centered.

    State: always **fp32** (MXNet creates it with no dtype): ``(n,)`` (a 1-tuple) or
    ``(n, g, delta)`` when centered; multi-precision ``(w32, state)``. MXNet 1.9.1 raises for any
    other weight dtype; optzoo computes in fp64 for fp64 weights and in fp32 for fp16/bf16 weights,
    storing the states in fp32.
    Hyperparameters enter as the fused kernel's fp32 fields (``mx_float``), square roots are
    correctly rounded (``sqrt_rn``): fp32 results are bit-identical to MXNet's.

    Differs from ``torch.optim.RMSprop``: torch's ``alpha`` is :math:`\gamma_1` (default 0.99, here
    0.9) and torch adds ``eps`` *outside* the square root, :math:`G/(\sqrt{n}+\epsilon)` (centered:
    :math:`\sqrt{n-\bar g^2}+\epsilon`); torch's ``momentum`` (default 0) applies to both variants and
    its buffer holds :math:`G/\sqrt{\cdot}` with ``lr`` multiplied at the end, whereas :math:`\delta`
    here exists only when centered and holds the lr-scaled step, so a change of learning rate acts only
    on new gradients; torch has no ``clip_weights`` and does not clip gradients.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's ``rmsprop(alex)_update``), fp32 and multi-precision alike: the rule above with :math:`g =
    0` on absent rows.

    Parameters
    ----------
    learning_rate : float, default 0.001
    gamma1 : float in [0, 1), default 0.9
        :math:`\gamma_1`, decay of the moving averages :math:`n` and :math:`\bar g`.
    gamma2 : float in [0, 1), default 0.9
        :math:`\gamma_2`, momentum of :math:`\delta` (centered only).
    epsilon : float >= 0, default 1e-8
    centered : bool, default False
    clip_weights : float >= 0, optional
        :math:`cw`: clip the updated weight to :math:`[-cw, cw]`; None or 0 disable it.
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("n", "g", "delta")  # the state's tensors, as the docstring names them
    _kernel_reads = ("clip_gradient", "centered", "clip_weights")

    def __init__(self, learning_rate=0.001, gamma1=0.9, gamma2=0.9, epsilon=1e-8, centered=False,
                 clip_weights=None, **kwargs):
        gamma1 = check_unit_interval("gamma1", gamma1)
        gamma2 = check_unit_interval("gamma2", gamma2)
        epsilon = check_nonnegative("epsilon", epsilon)
        centered = check_bool("centered", centered)
        clip_weights = check_optional_clip("clip_weights", clip_weights)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.gamma1, self.gamma2, self.epsilon = gamma1, gamma2, epsilon
        self.centered = centered
        self.clip_weights = clip_weights

    def create_state(self, index, weight):
        def zeros():
            return torch.zeros_like(weight, dtype=torch.float32)
        return (zeros(), zeros(), zeros()) if self.centered else (zeros(),)  # n [, g, delta]

    def prepare(self, *, lr, wd, t, index, dtype):
        F = mx_float  # the fused C++ kernel's float parameters, as dmlc parses str(x)
        g1 = F(self.gamma1)
        # 1 - g1: the kernel's fp32 ``1.f - gamma1``
        return g1, 1.0 - g1, F(self.gamma2), F(self.epsilon), F(self.rescale_grad), F(lr), F(wd)

    def kernel(self, w, g, state, s, seg=None):
        g1, one_minus_g1, g2, eps, rg, lr, wd = s
        ct = torch.promote_types(w.dtype, torch.float32)  # see "State" in the docstring
        w, g, state = w.to(ct), g.to(ct), tuple(x.to(ct) for x in state)
        G = self._clip(g * rg + wd * w)
        if not self.centered:
            (n,) = state
            n = one_minus_g1 * (G * G) + g1 * n
            new_w = w - lr * (G / sqrt_rn(n + eps))
            new_state = (n,)
        else:
            n, gbar, delta = state
            n = one_minus_g1 * G * G + g1 * n
            gbar = one_minus_g1 * G + g1 * gbar
            # (lr*G)/sqrt here but lr*(G/sqrt) when not centered: the two kernels' rounding orders
            delta = g2 * delta - lr * G / sqrt_rn(n - gbar * gbar + eps)
            new_w = w + delta
            new_state = (n, gbar, delta)
        if self.clip_weights:
            cw = mx_float(self.clip_weights)
            new_w = new_w.clamp(-cw, cw)
        return new_w, new_state
