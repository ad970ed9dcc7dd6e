"""Nadam (MXNet ``nadam``)."""
from __future__ import annotations

import functools
import itertools
import operator

import torch

from .._checks import check_nonnegative, check_unit_interval
from ._numerics import compute_dtype, mx_scalar, sqrt_rn
from .base import Optimizer
from .registry import register

_DTYPE = operator.attrgetter("dtype")


@register
class Nadam(Optimizer):
    r"""Nadam (Dozat 2016): Adam with Nesterov momentum and a warming momentum schedule.

    With :math:`G = \mathrm{clip}(rg\cdot g + wd\cdot w)` (weight decay *inside* the clip), step
    :math:`t` of this index and schedule decay :math:`\psi`:

    .. math::
        \mu_t &= \beta_1\,(1 - \tfrac12\,0.96^{t\psi}),\qquad
        \mu_{t+1} = \beta_1\,(1 - \tfrac12\,0.96^{(t+1)\psi}) \\
        M &\leftarrow M\cdot\mu_t \quad(\text{the shared } m\_schedule) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) G \\
        v &\leftarrow \beta_2 v + (1-\beta_2) G^2 \\
        \bar m &= (1-\mu_t)\,\frac{G}{1-M} + \mu_{t+1}\,\frac{m}{1 - M\mu_{t+1}} \\
        w &\leftarrow w - lr\cdot\bar m \,/\, \left(\sqrt{v/(1-\beta_2^t)} + \epsilon\right)

    The scalars (:math:`\mu_t`, :math:`M`, the bias corrections) are computed in double and enter as
    MXNet's NDArray ops see them (``mx_scalar``); square roots are correctly rounded (``sqrt_rn``).
    fp16/bf16 weights without ``multi_precision`` are updated in fp32, the scalars held in fp32, and
    rounded back when stored (see ``_numerics``, item 5); MXNet 1.9.1 computes in fp16, where
    :math:`\epsilon = 10^{-8}` is 0.

    :math:`M` is ``self.m_schedule``, **one number on the optimizer shared by every parameter**
    (starting at 1): it advances once per update of *any* index, in call order, so with :math:`N`
    parameters it is multiplied :math:`N` times per training step. This is MXNet's behaviour, kept
    for parity; it is saved with the optimizer (``Updater.get_states(dump_optimizer=True)``).

    State: ``(m, v)`` in the weight dtype; multi-precision ``(w32, (m32, v32))``.

    Differs from ``torch.optim.NAdam``: torch keeps the momentum product per parameter
    (``state['mu_product']``, advanced once per step) where MXNet shares :math:`M` across
    parameters; torch calls :math:`\psi` ``momentum_decay`` and defaults to ``lr=0.002``; here ``wd``
    is added to the gradient before clipping.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's NDArray ops), fp32 and multi-precision alike: the rule above with :math:`g = 0` on absent
    rows.

    Parameters
    ----------
    learning_rate : float, default 0.001
    beta1 : float in [0, 1), default 0.9
    beta2 : float in [0, 1), default 0.999
    epsilon : float >= 0, default 1e-8
    schedule_decay : float >= 0, default 0.004
        :math:`\psi`.
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("m", "v")  # the state's tensors, as the docstring names them

    _step_vars = Optimizer._step_vars + ("m_schedule",)
    _prepare_advances = True  # each prepare advances the shared m_schedule


    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, schedule_decay=0.004,
                 **kwargs):
        beta1 = check_unit_interval("beta1", beta1)
        beta2 = check_unit_interval("beta2", beta2)
        epsilon = check_nonnegative("epsilon", epsilon)
        schedule_decay = check_nonnegative("schedule_decay", schedule_decay)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.schedule_decay = schedule_decay
        self.m_schedule = 1.0

    def create_state(self, index, weight):
        return (torch.zeros_like(weight), torch.zeros_like(weight))  # m, v

    def prepare(self, *, lr, wd, t, index, dtype):
        key = (lr, wd, t, dtype, self.rescale_grad, self.beta1, self.beta2, self.epsilon, self.schedule_decay)
        fixed = self._memo(key, lambda: self._prepare_fixed(lr, wd, t, dtype))  # all but the shared schedule
        mu_t, mu_t1, (rg, wd, b1, one_minus_b1, b2, one_minus_b2, one_minus_mu_t, mu_t1_, one_minus_b2_t, lr,
                      eps) = fixed
        self.m_schedule = self.m_schedule * mu_t   # shared by every index: see the docstring
        m_schedule_next = self.m_schedule * mu_t1
        D = functools.partial(mx_scalar, dtype=compute_dtype(dtype))
        return (rg, wd, b1, one_minus_b1, b2, one_minus_b2, one_minus_mu_t, D(1.0 - self.m_schedule),
                mu_t1_, D(1.0 - m_schedule_next), one_minus_b2_t, lr, eps)

    def _prepare_all(self, indices, weights, reads):
        """``prepare`` for every index, in index order, with the same values: per stretch of indices with one
        ``(lr, wd, t, dtype)`` the fixed scalars once, the shared schedule's products one after the other (a
        C-level ``accumulate``: the same double products as index by index) and ``D`` once per distinct
        value (past ~50 indices :math:`1 - M` is 1)."""
        out = []
        for ((lr, wd, t), dtype), group in itertools.groupby(zip(reads, map(_DTYPE, weights))):
            n = len(list(group))
            key = (lr, wd, t, dtype, self.rescale_grad, self.beta1, self.beta2, self.epsilon, self.schedule_decay)
            mu_t, mu_t1, fixed = self._memo(key, lambda: self._prepare_fixed(lr, wd, t, dtype))
            schedule = list(itertools.accumulate(itertools.repeat(mu_t, n), operator.mul, initial=self.m_schedule))
            self.m_schedule = schedule[-1]
            ones = list(itertools.repeat(1.0, n))
            now = list(map(operator.sub, ones, schedule[1:]))
            after = list(map(operator.sub, ones, map(operator.mul, schedule[1:], itertools.repeat(mu_t1))))
            ct = compute_dtype(dtype)
            D = {x: mx_scalar(x, ct) for x in dict.fromkeys(now + after)}
            # prepare's tuples, made by zip (in C): the fixed scalars with D(1 - M) after the 7th, D(1 - M mu_t1) after
            # the 8th
            parts = [itertools.repeat(x) for x in fixed]
            parts.insert(7, map(D.__getitem__, now))
            parts.insert(9, map(D.__getitem__, after))
            out += zip(*parts)
        return out

    def _prepare_fixed(self, lr, wd, t, dtype):
        D = functools.partial(mx_scalar, dtype=compute_dtype(dtype))  # scalars as MXNet's NDArray ops see them
        b1, b2, psi = self.beta1, self.beta2, self.schedule_decay
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_t1 = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        return mu_t, mu_t1, (D(self.rescale_grad), D(wd), D(b1), D(1.0 - b1), D(b2), D(1.0 - b2), D(1.0 - mu_t),
                             D(mu_t1), D(1.0 - b2 ** t), D(lr), D(self.epsilon))

    def kernel(self, w, g, state, s, seg=None):
        (rg, wd, b1, one_minus_b1, b2, one_minus_b2, one_minus_mu_t, one_minus_M, mu_t1, one_minus_M_next,
         one_minus_b2_t, lr, eps) = s
        ct = compute_dtype(w.dtype)  # fp32 for fp16/bf16 weights: see the docstring
        w, g, m, v = (x.to(ct) for x in (w, g, *state))
        G = self._clip(g * rg + wd * w)
        m = m * b1 + one_minus_b1 * G
        v = v * b2 + one_minus_b2 * G * G
        m_bar = one_minus_mu_t * (G / one_minus_M) + mu_t1 * (m / one_minus_M_next)
        v_hat = v / one_minus_b2_t
        return w - lr * m_bar / (sqrt_rn(v_hat) + eps), (m, v)
