"""AdaGrad (MXNet ``adagrad``)."""
from __future__ import annotations

import torch

from .._checks import check_nonnegative
from .base import Optimizer
from .registry import register


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` correctly rounded, as MXNet's ``math::sqrt`` (IEEE ``sqrtf`` / ``sqrt``).

    This torch build's CPU ``sqrt`` is off by one ulp on ~15% of fp32 and ~1% of fp64 inputs, which
    breaks bit parity with MXNet. fp32 and narrower: the fp64 root (at most 1 ulp off) rounds back
    correctly, since a root of a p-bit number never lies within 2^-(2p+2) of a p-bit midpoint.
    fp64: one Newton step with the residual ``x - s*s`` computed exactly (Dekker's product).
    TODO(lead): shared by adagrad, rmsprop, adadelta and nadam; move to a shared numerics module.
    """
    if x.dtype != torch.float64:
        return x.double().sqrt().to(x.dtype)
    s = x.sqrt()
    c = s * 134217729.0  # 2**27 + 1: Veltkamp split of s into 26-bit halves
    hi = c - (c - s)
    lo = s - hi
    p = s * s
    r = (x - p) - (((hi * hi - p) + 2.0 * hi * lo) + lo * lo)
    return torch.where(torch.isfinite(s) & (s > 0), s + r / (2.0 * s), s)


@register
class AdaGrad(Optimizer):
    r"""AdaGrad (Duchi, Hazan & Singer), with epsilon inside the square root and decoupled weight decay.

    With :math:`G = \mathrm{clip}(rg\cdot g)` (weight decay is *not* clipped, nor accumulated):

    .. math::
        h &\leftarrow h + G^2 \\
        w &\leftarrow w - lr\cdot\left(G/\sqrt{h + \epsilon} + wd\cdot w\right)

    State: ``history`` :math:`h`, always **fp32** (MXNet creates it with no dtype), so for fp32 weights
    every operation is fp32. For other weight dtypes the arithmetic follows torch's type promotion
    (fp64 weights: fp64, with :math:`h` rounded to fp32 when stored and read back; bf16/fp16 weights:
    fp32, the new weight rounded to the weight dtype). MXNet 1.9.1 raises on such mixed dtypes
    ("Incompatible attr ... expected float32, got float64"); with ``multi_precision=True`` fp16/bf16
    weights get an fp32 master copy: ``(w32, h)``.

    Differs from ``torch.optim.Adagrad``: torch adds ``eps`` (default 1e-10) *outside* the square root,
    :math:`G/(\sqrt{h}+\epsilon)`; torch adds ``weight_decay * w`` to the gradient before it is
    accumulated (coupled L2), here :math:`wd\cdot w` is applied after, outside the accumulator; torch's
    ``lr_decay`` and ``initial_accumulator_value`` do not exist here (:math:`h` starts at 0, use an
    ``lr_scheduler`` to decay the rate).

    Parameters
    ----------
    eps : float >= 0, default 1e-7
        :math:`\epsilon`, added to the history inside the square root.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    def __init__(self, eps=1e-7, **kwargs):
        super().__init__(**kwargs)
        self.float_stable_eps = check_nonnegative("eps", eps)  # MXNet's attribute name

    def create_state(self, index, weight):
        return torch.zeros_like(weight, dtype=torch.float32)  # history

    def rule(self, w, g, h, *, lr, wd, t, index):
        G = self._rescaled_clipped(g)
        h = (h + G * G).to(h.dtype)
        return w + (G / sqrt_rn(h + self.float_stable_eps) + w * wd) * -lr, h
