"""AdaGrad (MXNet ``adagrad``)."""
from __future__ import annotations

import functools
import math
import struct

import torch

from .._checks import check_nonnegative
from .base import Optimizer
from .registry import register


# --- MXNet numerics shared by adagrad, rmsprop, adadelta, adamax and nadam.
# TODO(lead): move to optimizer/_numerics.py (every optimizer needs them for bit parity).

def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` correctly rounded, as MXNet's ``math::sqrt`` (IEEE ``sqrtf`` / ``sqrt``).

    torch 2.13's CPU ``sqrt`` is off by one ulp on ~15% of fp32 and ~1% of fp64 inputs. fp32 and
    narrower: the fp64 root (at most 1 ulp off) rounds back correctly, since the root of a p-bit
    number never lies within 2^-(2p+1) (relative) of a p-bit rounding midpoint. fp64: one Newton step
    with the residual ``x - s*s`` computed exactly (Dekker's product).
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


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _dmlc_parse(x: float, rnd) -> float:
    # dmlc-core's ParseFloat (strtonum.h) on Python's str(x): integer part, then the fraction digits
    # as one integer (rounded to double beyond 2**53) divided by 10**digits, then the exponent's scale;
    # every intermediate is rounded by ``rnd`` (to fp32 for float fields).
    x = float(x)
    if not math.isfinite(x):
        return x
    text = repr(abs(x))
    mantissa, _, exponent = text.partition("e")
    int_part, _, frac = mantissa.partition(".")
    value = rnd(float(int(int_part)))
    if frac:
        frac = frac[:19]
        value = rnd(value + rnd(float(int(frac)) / float(10 ** len(frac))))
    if exponent:
        e = int(exponent)
        n, scale = abs(e), 1.0
        while n >= 8:
            scale, n = rnd(scale * 1e8), n - 8
        while n > 0:
            scale, n = rnd(scale * 10.0), n - 1
        value = rnd(value / scale) if e < 0 else rnd(value * scale)
    return math.copysign(value, x)


@functools.lru_cache(maxsize=4096)
def mx_scalar(x: float, dtype: torch.dtype = torch.float32) -> float:
    """The scalar MXNet's NDArray ops (``w * s``, ``w / s``, ``w + s``) use on a ``dtype`` tensor.

    MXNet passes a Python scalar to C++ as ``str(x)``, parsed back by ``dmlc::stod``, which is not
    correctly rounded (~12% of doubles come back one ulp off, e.g. 0.9962535345811363 -> ...364),
    then cast to the tensor's dtype. torch casts to fp32 by itself but keeps fp16/bf16 scalars in
    fp32, so those are rounded here (an epsilon of 1e-8 is 0 in fp16, as in MXNet).
    """
    value = _dmlc_parse(x, float)
    if dtype in (torch.float16, torch.bfloat16):
        value = torch.tensor(value, dtype=dtype).item()
    return value


@functools.lru_cache(maxsize=4096)
def mx_float(x: float) -> float:
    """The fp32 value of a float operator parameter (``lr``, ``wd``, ``clip_gradient``, ``epsilon`` of
    the fused kernels, ``clip``'s bounds): ``str(x)`` parsed by ``dmlc::stof`` in fp32 arithmetic, one
    fp32 ulp off ``float32(x)`` for ~16% of values (mostly those below 1e-4 or above 1)."""
    return _dmlc_parse(x, _f32)


@register
class AdaGrad(Optimizer):
    r"""AdaGrad (Duchi, Hazan & Singer), with epsilon inside the square root and decoupled weight decay.

    With :math:`G = \mathrm{clip}(rg\cdot g)` (weight decay is *not* clipped, nor accumulated):

    .. math::
        h &\leftarrow h + G^2 \\
        w &\leftarrow w - lr\cdot\left(G/\sqrt{h + \epsilon} + wd\cdot w\right)

    State: ``history`` :math:`h`, always **fp32** (MXNet creates it with no dtype);
    multi-precision ``(w32, h)``. MXNet 1.9.1 raises for any other weight dtype ("Incompatible attr
    ... expected float32, got float64"); optzoo computes in fp64 for fp64 weights and in fp32 for
    fp16/bf16 weights, storing :math:`h` in fp32 and the weight in its dtype.

    Scalars enter as MXNet's NDArray ops see them (:func:`mx_scalar`), square roots are correctly
    rounded (:func:`sqrt_rn`): fp32 results are bit-identical to MXNet's.

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
        ct = torch.promote_types(w.dtype, torch.float32)  # see "State" in the docstring
        w, g, h, D = w.to(ct), g.to(ct), h.to(ct), mx_scalar
        G = self._clip(g * D(self.rescale_grad))
        h = h + G * G
        return w + (G / sqrt_rn(h + D(self.float_stable_eps)) + w * D(wd)) * D(-lr), h
