"""Adam (MXNet ``adam``)."""
from __future__ import annotations

import functools
import math

import torch

from .._checks import check_bool, check_nonnegative, check_unit_interval
from ._numerics import compute_dtype, mx_param, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class Adam(Optimizer):
    r"""Adam (Kingma & Ba), with MXNet's folded bias correction and coupled L2 weight decay.

    With :math:`G = \mathrm{clip}(rg\cdot g + wd\cdot w)` (weight decay *inside* the clip) and step
    :math:`t`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) G \\
        v &\leftarrow \beta_2 v + (1-\beta_2) G^2 \\
        lr_t &= lr\cdot\sqrt{1-\beta_2^t}\,/\,(1-\beta_1^t) \\
        w &\leftarrow w - lr_t\cdot m / (\sqrt{v} + \epsilon)

    which is :math:`w \leftarrow w - lr\cdot\hat m/(\sqrt{\hat v} + \epsilon/\sqrt{1-\beta_2^t})`.

    State: ``(mean, var)`` in the weight dtype; multi-precision ``(w32, (mean32, var32))``.

    fp16/bf16 weights without ``multi_precision`` are updated in fp32, scalars included, and rounded
    back when stored (see ``_numerics``, item 5). This departs from MXNet 1.9.1, whose fp16 kernel
    computes in fp16, where :math:`\epsilon = 10^{-8}` is 0; in bf16, :math:`\beta_2 = 0.999` would be 1
    and :math:`v` would never move.

    Row-sparse gradients: ``lazy_update=True`` (MXNet's default, also under multi-precision) updates only
    the gradient's rows of :math:`w`, :math:`m` and :math:`v`, and the count still advances on a call with no
    rows (the bias correction moves); ``False``: the rule above on every row, :math:`g = 0` on absent ones
    (so :math:`G = wd\cdot w` there). MXNet's sparse kernels round :math:`(1-\beta_2)(G^2)` where the dense
    one rounds :math:`((1-\beta_2)G)\,G` (standard always, lazy when clipping); optzoo follows each.
    Unlike ``torch.optim.SparseAdam``, weight decay and clipping apply.

    Differs from ``torch.optim.Adam``: epsilon is added to :math:`\sqrt{v}` *before* bias correction
    (torch adds it to :math:`\sqrt{\hat v}`), and ``wd`` is added to the gradient before clipping.

    Parameters
    ----------
    learning_rate : float, default 0.001
    beta1 : float in [0, 1), default 0.9
    beta2 : float in [0, 1), default 0.999
    epsilon : float >= 0, default 1e-8
    lazy_update : bool, default True
        Row-sparse gradients only: lazy or standard update, see above.
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("mean", "var")  # the state's tensors, as the docstring names them

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, lazy_update=True, **kwargs):
        beta1 = check_unit_interval("beta1", beta1)
        beta2 = check_unit_interval("beta2", beta2)
        epsilon = check_nonnegative("epsilon", epsilon)
        lazy_update = check_bool("lazy_update", lazy_update)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.lazy_update = lazy_update

    def create_state(self, index, weight):
        return (torch.zeros_like(weight), torch.zeros_like(weight))  # mean, var

    def sparse_mode(self, index, multi_precision):
        return "lazy" if self.lazy_update else "standard"

    def prepare(self, *, lr, wd, t, index, dtype):
        lr_t = lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)  # in double, as MXNet's Python side
        P = functools.partial(mx_param, dtype=compute_dtype(dtype))  # adam_update's float parameters
        b1, b2 = P(self.beta1), P(self.beta2)
        # 1 - beta (the kernel's 1.f - beta) as a scalar of its own: where an executor holds the scalars in
        # the weight dtype, bf16(0.999) is 1 but bf16(0.001) is not 0
        return b1, 1 - b1, b2, 1 - b2, P(self.epsilon), P(self.rescale_grad), P(lr_t), P(wd)

    def kernel(self, w, g, state, s, seg=None, square_first=False):
        b1, one_minus_b1, b2, one_minus_b2, eps, rg, lr_t, wd = s
        ct = compute_dtype(w.dtype)  # fp32 for fp16/bf16 weights: see the docstring
        w, g, m, v = (x.to(ct) for x in (w, g, *state))
        G = self._clip(g * rg + w * wd)
        m = b1 * m + one_minus_b1 * G
        # MXNet's row-sparse kernels round (1-b2)*(G*G) where the dense one rounds ((1-b2)*G)*G
        v = b2 * v + (one_minus_b2 * (G * G) if square_first else one_minus_b2 * G * G)
        return w - lr_t * m / (sqrt_rn(v) + eps), (m, v)

    def lazy_kernel(self, w, g, state, s, seg=None):
        # AdamDnsRspDnsKernel: the dense arithmetic, except (1-b2)*(G*G) when clipping
        return self.kernel(w, g, state, s, seg, square_first=bool(self.clip_gradient))

    def standard_rule(self, w, g, state, *, lr, wd, t, index):
        # AdamStdDnsRspDnsKernel: the dense rule, with (1-b2)*(G*G)
        s = self.prepare(lr=lr, wd=wd, t=t, index=index, dtype=w.dtype)
        return self.kernel(w, g, state, s, square_first=True)
