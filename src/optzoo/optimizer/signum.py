"""Signum and SignSGD (MXNet ``signum``; SignSGD is ``momentum=0``)."""
from __future__ import annotations

import torch

from .._checks import check_nonnegative, check_unit_interval
from ._numerics import compute_dtype, in_dtype, mx_param, wide_mul
from .base import Optimizer
from .registry import register


@register
class Signum(Optimizer):
    r"""Signum (Bernstein et al., 2018): step by the sign of the momentum; SignSGD when ``momentum=0``.

    With :math:`G = \mathrm{clip}(rg\cdot g)`, momentum :math:`\mu`, decoupled decay :math:`wd_{lh}`:

    .. math::
        \mu > 0:\quad & mom \leftarrow \mu\,mom - (1-\mu)\,wd\cdot w - (1-\mu)\,G \\
                      & w \leftarrow (1 - lr\cdot wd_{lh})\,w + lr\cdot\mathrm{sign}(mom) \\
        \mu = 0:\quad & w \leftarrow (1 - lr\cdot wd - lr\cdot wd_{lh})\,w - lr\cdot\mathrm{sign}(g)

    The buffer holds the *negated* momentum, hence ``+ sign(mom)``. ``wd`` is coupled (it enters the
    momentum) when :math:`\mu > 0`, but MXNet's ``signsgd_update`` applies it decoupled, and takes the sign
    of the raw gradient, so ``rescale_grad`` and ``clip_gradient`` have no effect when :math:`\mu = 0`.

    MXNet 1.9.1 raises when :math:`\mu = 0` and :math:`wd_{lh} \ne 0` (``signsgd_update`` has no
    ``wd_lh`` argument); optzoo applies :math:`wd_{lh}` as the momentum variant does, a decoupled
    :math:`-lr\cdot wd_{lh}\cdot w` next to SignSGD's own decoupled :math:`-lr\cdot wd\cdot w`, so
    :math:`wd_{lh} = 0` gives MXNet's numbers.

    Under a distributed kvstore (``dist_sync``) each worker keeps its own ``mom``, updated with its local
    gradient, and the workers send only the signs of their directions (1 bit per element) and step by
    the majority vote :math:`v = \mathrm{sign}(\sum_{workers} \mathrm{sign}(mom))` (SignSGD: of
    :math:`\mathrm{sign}(g)`, stepping by :math:`-lr\cdot v`), as signSGD with majority vote
    (Bernstein et al., 2019): ``direction`` and ``apply_vote`` are the two halves of the rule.

    State: ``mom`` (weight dtype) or None when ``momentum == 0``; multi-precision ``(w32, mom32)``.

    fp16/bf16 weights without ``multi_precision``: the scalars, :math:`1-\mu` among them, are held in fp32
    (the arithmetic stays in the weight dtype: each product of a scalar and a tensor is rounded once to it, the
    scalar at its fp32 value, on every path: :func:`~._numerics.wide_mul`). MXNet 1.9.1 rounds :math:`\mu` to
    fp16 first; in bf16, :math:`\mu = 0.999` would be 1 and :math:`1-\mu` 0: the momentum would never see a
    gradient.

    torch.optim has no sign-based optimizer.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's ``signum_update`` / ``signsgd_update``), fp32 and multi-precision alike: the rule above
    with :math:`g = 0` on absent rows.

    Parameters
    ----------
    learning_rate : float, default 0.01
    momentum : float in [0, 1), default 0.9
    wd_lh : float >= 0, default 0
        Decoupled weight decay (Loshchilov & Hutter), :math:`wd_{lh}`.
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("mom",)  # the state's tensors, as the docstring names them

    def __init__(self, learning_rate=0.01, momentum=0.9, wd_lh=0.0, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        wd_lh = check_nonnegative("wd_lh", wd_lh)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.momentum, self.wd_lh = momentum, wd_lh

    def create_state(self, index, weight):
        return torch.zeros_like(weight) if self.momentum != 0.0 else None

    def prepare(self, *, lr, wd, t, index, dtype):
        ct = compute_dtype(dtype)  # fp32 scalars for fp16/bf16 weights: see "State" in the docstring
        lr, wd, mu, wd_lh, rg = (mx_param(x, ct) for x in (lr, wd, self.momentum, self.wd_lh, self.rescale_grad))
        # scalar expressions the kernels round before they meet the tensors
        lr_wd, lr_wd_lh, one_minus_mu = (in_dtype(x, ct) for x in (lr * wd, lr * wd_lh, 1 - mu))
        return (lr, mu, rg, one_minus_mu, one_minus_mu * wd, in_dtype(one_minus_mu * rg, ct),
                1 - lr_wd_lh, 1 - lr_wd - lr_wd_lh)

    def kernel(self, w, g, mom, s, seg=None):
        x, mom = self.direction(w, g, mom, s)
        return self.apply_vote(w, torch.sign(x), s, mom), mom

    # The rule split in two for distributed training (optzoo.kvstore): each worker computes its local
    # ``direction``, the workers vote on its sign, and ``apply_vote`` steps by the vote. One worker's own
    # sign is the single-process rule (``kernel`` is the composition).
    def direction(self, w, g, mom, s):
        r"""``(x, new_mom)``: the tensor whose sign is the step: ``mom`` after its update (:math:`\mu > 0`),
        the raw gradient ``g`` (:math:`\mu = 0`, stepped by :math:`-\mathrm{sign}`)."""
        lr, mu, rg, one_minus_mu, omu_wd, omu_rg, decay_lh, decay = s
        if mom is None:
            return g, None
        # each scalar product rounded once to the weight dtype, the scalar kept in fp32 (wide_mul)
        G = wide_mul(one_minus_mu, self._clip(wide_mul(rg, g))) if self.clip_gradient else wide_mul(omu_rg, g)
        mom = wide_mul(mu, mom) - wide_mul(omu_wd, w) - G
        return mom, mom

    def apply_vote(self, w, v, s, mom):
        """The new weight from the (voted) sign ``v`` of ``direction``'s ``x`` (``mom``: the state, None
        for SignSGD)."""
        lr, mu, rg, one_minus_mu, omu_wd, omu_rg, decay_lh, decay = s
        if mom is None:
            return wide_mul(decay, w) - wide_mul(lr, v)
        return wide_mul(decay_lh, w) + wide_mul(lr, v)
