"""SGD with momentum and weight decay (MXNet ``sgd``, alias ``ccsgd``)."""
from __future__ import annotations

import torch

from .._checks import check_bool, check_unit_interval
from ._numerics import in_dtype, mx_list_param, mx_param
from .base import Optimizer
from .registry import register


@register(aliases=("ccsgd",))
class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional momentum and L2 weight decay.

    With :math:`G = \mathrm{clip}(rg\cdot g)`, momentum :math:`\mu`:

    .. math::
        \mu = 0:\quad & w \leftarrow (1 - lr\cdot wd)\,w - lr\cdot G \\
        \mu > 0:\quad & mom \leftarrow \mu\,mom - lr\cdot wd\cdot w - lr\cdot G,\qquad w \leftarrow w + mom

    State: ``mom`` (weight dtype) or None when ``momentum == 0``; multi-precision ``(mom, w32)``.
    fp16 weights without multi-precision compute in fp16, as MXNet's ``half_t`` kernels do: every operation is
    rounded, the float parameters and their products (:math:`lr\cdot wd`, :math:`lr\cdot rg`) too, on every path
    (``tests/test_half_kernels.py``).

    Differs from ``torch.optim.SGD``: the buffer holds the *lr-scaled, negated* velocity, so a change of
    learning rate acts only on new gradients (torch keeps ``buf = μ·buf + g`` and multiplies by the current
    lr); weight decay is never clipped.

    Row-sparse gradients (``lazy_update``, MXNet's choice): lazy in fp32, only the gradient's rows of
    :math:`w` and :math:`mom` change (absent rows get no weight decay or momentum); standard with
    ``lazy_update=False`` and under multi-precision (MXNet's ``mp_*`` kernels have no sparse path): the rule
    above with :math:`g = 0` on absent rows. Without momentum both take ``sgd_update``'s rounding,
    :math:`(1 - lr\,wd)\,w - lr\,G` (the dense path follows ``multi_sgd_update``'s, one ulp apart).

    Parameters
    ----------
    momentum : float in [0, 1), default 0
    lazy_update : bool, default True
        Row-sparse gradients only: lazy (fp32) or standard update, see above.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("mom",)  # the state's tensors, as the docstring names them

    capabilities = frozenset({"multi_precision", "aggregated"})
    _mp_master_first = False
    aggregate_num = 4
    _counts_call_at_once = True  # MXNet's multi_sgd path: one count of the call, one lr read

    def __init__(self, momentum=0.0, lazy_update=True, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        lazy_update = check_bool("lazy_update", lazy_update)
        super().__init__(**kwargs)
        self.momentum = momentum
        self.lazy_update = lazy_update

    def create_state(self, index, weight):
        return torch.zeros_like(weight) if self.momentum != 0.0 else None

    def sparse_mode(self, index, multi_precision):
        # MXNet's mp_sgd(_mom)_update has no row-sparse kernel: its storage fallback is the dense rule
        return "lazy" if self.lazy_update and not multi_precision else "standard"

    def lazy_prepare(self, *, lr, wd, t, index, dtype):
        if self.momentum != 0.0:  # sgd_mom_update's row-sparse kernels round as the dense one
            return self.prepare(lr=lr, wd=wd, t=t, index=index, dtype=dtype)
        # sgd_update (not multi_sgd_update, whose rounding the dense rule follows): the factor (1 - lr*wd) and
        # lr*rg rounded to the weight dtype first
        lr, wd, rg = (mx_param(x, dtype) for x in (lr, wd, self.rescale_grad))
        return in_dtype(1 - in_dtype(lr * wd, dtype), dtype), lr, rg, in_dtype(lr * rg, dtype)

    def lazy_kernel(self, w, g, mom, s, seg=None):
        if mom is not None:
            return self.kernel(w, g, mom, s, seg)
        keep, lr, rg, lr_rg = s  # sgd_update: (1 - lr*wd)*w - lr*G
        return keep * w - (lr * self._clip(rg * g) if self.clip_gradient else lr_rg * g), None

    standard_rule = Optimizer.lazy_rule  # on the densified gradient: sgd_update's w *= (1 - lr*wd), then -= lr*G

    def prepare(self, *, lr, wd, t, index, dtype):
        # MXNet's Updater always takes multi_sgd(_mom)_update, which reads lr and wd from a float list
        # and computes the update as a step d (mom = 0 without momentum), in this rounding order
        lr, wd = mx_list_param(lr, dtype), mx_list_param(wd, dtype)
        rg = mx_param(self.rescale_grad, dtype)
        # lr * wd and lr * rg are products of two DType parameters (``lrs[i] * wds[i] * w``): rounded to the
        # kernel's dtype before they meet the tensors (fp16: half_t arithmetic rounds each product)
        return mx_param(self.momentum, dtype), lr, in_dtype(lr * wd, dtype), rg, in_dtype(lr * rg, dtype)

    def kernel(self, w, g, mom, s, seg=None):
        mu, lr, lr_wd, rg, lr_rg = s
        step = lr * self._clip(rg * g) if self.clip_gradient else lr_rg * g
        d = (0.0 if mom is None else mu * mom) - lr_wd * w - step
        return w + d, (None if mom is None else d)


ccSGD = SGD  # MXNet's deprecated alias class
