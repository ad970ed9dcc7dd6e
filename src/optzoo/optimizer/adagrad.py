"""AdaGrad (MXNet ``adagrad``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_nonnegative
from ._numerics import mx_scalar, sqrt_rn
from .base import Optimizer
from .registry import register


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

    Row-sparse gradients: lazy (MXNet's ``sparse.adagrad_update``), only the gradient's rows of :math:`w` and
    :math:`h` change; it refuses weight decay, so a row-sparse gradient for an index whose ``wd`` (times its
    ``wd_mult``) is not 0 is an error, as in MXNet.

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

    state_names = ("history",)  # the state's tensors, as the docstring names them

    def __init__(self, eps=1e-7, **kwargs):
        eps = check_nonnegative("eps", eps)
        super().__init__(**kwargs)
        self.float_stable_eps = eps  # MXNet's attribute name

    def create_state(self, index, weight):
        return torch.zeros_like(weight, dtype=torch.float32)  # history

    def sparse_mode(self, index, multi_precision):
        wd = self._get_wd(index)
        if wd != 0:  # MXNet 1.9.1's sparse.adagrad_update refuses weight decay
            raise ValueError(f"wd for index {index!r} is {wd!r}: AdaGrad's row-sparse update does not support "
                             "weight decay (MXNet 1.9.1's sparse.adagrad_update), expected 0")
        return "lazy"

    def prepare(self, *, lr, wd, t, index, dtype):
        ct = torch.promote_types(dtype, torch.float32)  # see "State" in the docstring
        D = functools.partial(mx_scalar, dtype=ct)  # scalars as MXNet's NDArray ops see them
        return D(self.rescale_grad), D(self.float_stable_eps), D(wd), D(-lr)

    def kernel(self, w, g, h, s, seg=None):
        rg, eps, wd, neg_lr = s
        ct = torch.promote_types(w.dtype, torch.float32)
        w, g, h = w.to(ct), g.to(ct), h.to(ct)
        G = self._clip(g * rg)
        h = h + G * G
        return w + (G / sqrt_rn(h + eps) + w * wd) * neg_lr, h
