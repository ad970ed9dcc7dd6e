"""GroupAdaGrad: AdaGrad with one rate per row (MXNet ``contrib.GroupAdaGrad``, name ``groupadagrad``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_nonnegative, check_number
from ._numerics import compute_dtype, kahan_sum, mx_scalar, sqrt_rn, wide_mul
from .base import Optimizer
from .registry import register


@register
class GroupAdaGrad(Optimizer):
    r"""AdaGrad with a single accumulator per row of a 2-D weight (MXNet contrib, e.g. for embeddings).

    With :math:`G = \mathrm{clip}(rg\cdot g)` and :math:`C` the number of columns:

    .. math::
        h_i &\leftarrow h_i + \frac{1}{C}\sum_j G_{ij}^2 \\
        w_{ij} &\leftarrow w_{ij} - lr\cdot G_{ij} / \sqrt{h_i + \epsilon}

    Weight decay is not supported: ``wd`` must be 0, and a nonzero effective ``wd`` (from ``wd_mult``,
    ``param_dict`` or a later change of ``wd``) is rejected at update time, before anything changes.
    The weight must be 2-D, shape ``(rows, C)``.

    The row sum is MXNet's: Kahan-compensated, column after column (:func:`kahan_sum`; a loop of
    :math:`C` vectorised steps, the price of bit-exact parity), then divided by :math:`C`.

    Fast path: packs hold the history flat, one value per row, and stack the rows of consecutive
    parameters with the same column count, so one Kahan loop of :math:`C` steps serves all of their rows
    (eager: MXNet's bits). Compiled (large parameters and packs by default, everything with ``fused=True``)
    the row sums are fp64 sums rounded to the weight dtype instead (Kahan's order is a loop; both are
    within two ulps of the exact sum of the nonnegative squares).

    State: ``history`` :math:`h` of shape ``(rows, 1)``, always **fp32** (MXNet creates it with no
    dtype); multi-precision ``(w32, h)`` through the generic wrapper, as in MXNet. Other weight dtypes
    compute in torch's promoted dtype, :math:`h` rounded to fp32 when stored (MXNet 1.9.1 raises on
    such mixed dtypes); for fp16/bf16 weights ``lr`` and :math:`\epsilon` are held in fp32, not in the
    weight dtype (an :math:`\epsilon` below 6e-8 is 0 in fp16: a row of zero gradients would give 0/0); the
    product :math:`lr\cdot G` is rounded once to the weight dtype with ``lr``'s fp32 value on every path
    (:func:`~._numerics.wide_mul`).

    Row-sparse gradients: lazy (MXNet's ``GroupAdagradDnsRspKernel``), only the gradient's rows of :math:`w`
    and :math:`h` change; the row sums there are plain running sums in the weight dtype (no Kahan), as that
    kernel takes them.

    torch.optim has no row-wise AdaGrad. Compared with ``torch.optim.Adagrad``: one accumulator per
    row (the mean of the row's squared gradients) instead of one per element; ``eps`` inside the
    square root (torch: outside, default 1e-10); no weight decay, ``lr_decay`` or
    ``initial_accumulator_value``.

    Parameters
    ----------
    eps : float >= 0, default 1e-5
        :math:`\epsilon`, added to the history inside the square root.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01; ``wd`` must be 0).
    """

    state_names = ("history",)  # the state's tensors, as the docstring names them

    def __init__(self, eps=1e-5, **kwargs):
        eps = check_nonnegative("eps", eps)
        if check_number("wd", kwargs.get("wd", 0.0)) != 0:
            raise ValueError(f"wd={kwargs['wd']!r} is invalid: GroupAdaGrad does not support weight decay, "
                             "expected 0")
        super().__init__(**kwargs)
        self.float_stable_eps = eps  # MXNet's attribute name

    def create_state(self, index, weight):
        if weight.dim() != 2:
            raise ValueError(f"weight for index {index!r} has shape {tuple(weight.shape)}: GroupAdaGrad "
                             "expects a 2-D weight (rows, columns)")
        return torch.zeros((weight.shape[0], 1), dtype=torch.float32, device=weight.device)  # history

    def _check_state(self, index, weight, state):
        super()._check_state(index, weight, state)
        self._check_indices([index])

    def _check_indices(self, indices):
        """Reject a nonzero effective ``wd`` before anything changes (the fast path calls it per list)."""
        for index, wd in zip(indices, self._get_wds(indices)):
            if wd != 0:
                raise ValueError(f"wd for index {index!r} is {wd!r} (wd={self.wd!r} times its wd_mult): "
                                 "GroupAdaGrad does not support weight decay, expected 0")

    def sparse_mode(self, index, multi_precision):
        return "lazy"

    def lazy_rule(self, w, g, h, *, lr, wd, t, index):
        # MXNet's GroupAdagradDnsRspKernel: a plain running sum of the row's squares (no Kahan), then
        # w - (lr*G)/sqrt(h + eps) in the weight dtype
        rg, lr, eps = self.prepare(lr=lr, wd=wd, t=t, index=index, dtype=w.dtype)
        G = self._clip(g * rg)
        ssq = torch.zeros_like(G[:, :1])
        for j in range(G.shape[1]):
            ssq = ssq + G[:, j:j + 1] * G[:, j:j + 1]
        h = (h + ssq / G.shape[1]).to(h.dtype)
        return w - wide_mul(lr, G) / sqrt_rn(h + eps), h

    def prepare(self, *, lr, wd, t, index, dtype):
        D = functools.partial(mx_scalar, dtype=compute_dtype(dtype))  # see "State" in the docstring
        return D(self.rescale_grad), D(lr), D(self.float_stable_eps)

    def kernel(self, w, g, h, s, seg=None):
        rg, lr, eps = s
        G = self._clip(g * rg)
        if torch.compiler.is_compiling():  # compiled: the fp64 row sum rounded (Kahan's order is a loop)
            row_sum = (G * G).to(torch.float64).sum(1, keepdim=True).to(G.dtype)
        else:
            row_sum = kahan_sum(G * G)
        h = (h + row_sum / G.shape[1]).to(h.dtype)  # MXNet's mean: a Kahan sum, then / C
        return w - wide_mul(lr, G) / sqrt_rn(h + eps), h
