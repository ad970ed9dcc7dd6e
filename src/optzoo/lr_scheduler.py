r"""Learning-rate schedulers: MXNet 1.9.1's ``mxnet.lr_scheduler``, value for value.

A scheduler is a callable of ``num_update`` :math:`n`, the optimizer's update count (1 on the first
step, 0 for LBSGD, which reads the rate before counting), that returns the base learning rate for that
step. As in MXNet the schedulers are stateful, and every piece of state is a plain attribute with
MXNet's name (``base_lr``, ``warmup_final_lr``, ``count``, ``cur_step_ind``, ``base_lr_orig``, ...):

* ``Optimizer(learning_rate=X, lr_scheduler=S)`` overwrites ``S.base_lr`` only. The warmup ramp still
  targets the old ``warmup_final_lr``; Factor and MultiFactor decay X; Poly and Cosine restart from
  ``base_lr_orig`` and so ignore X (except past ``max_update`` before any in-range call).
* ``Updater.get_states`` saves a scheduler as its class name plus ``vars(scheduler)`` and restores it
  with ``cls.__new__`` and ``__dict__.update``.

Warmup, shared by every scheduler: with :math:`W` = ``warmup_steps``, :math:`\eta_b` =
``warmup_begin_lr`` and :math:`\eta_w` = ``warmup_final_lr`` (``base_lr`` at construction),
for :math:`n < W`

.. math::

    \eta(n) = \eta_b + (\eta_w - \eta_b)\,\frac{n}{W} \quad\text{(linear)}, \qquad
    \eta(n) = \eta_b \quad\text{(constant)}.

The schedules below apply for :math:`n \ge W`; their :math:`n` is absolute (warmup is not subtracted)
except in Poly and Cosine, which count from :math:`W`.

Where MXNet 1.9.1 checks an argument with ``assert`` (or not at all) optzoo raises ``ValueError`` naming
the argument, the value and what was expected, before anything is stored. optzoo is stricter than MXNet
in a few places, all of which would give a negative, infinite or undefined rate: learning rates
(``base_lr``, ``warmup_begin_lr``, ``final_lr``, ``stop_factor_lr``) must be >= 0, ``factor`` must lie in
[0, 1], ``pwr`` must be >= 0, ``step`` must be integer, and Poly/Cosine need ``max_update > warmup_steps``
(MXNet divides by zero at ``max_update == warmup_steps``). Numbers are stored as Python ``int`` or ``float``
(an int ``base_lr`` is handed back untouched, as MXNet does): numpy scalars and 0-d arrays or tensors are read,
so that a dump (``Updater.get_states``) holds plain numbers only.
"""
from __future__ import annotations

import logging
from math import cos, pi

from ._checks import check_choice, check_nonnegative, check_number, check_positive_int

__all__ = ["LRScheduler", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler"]

_log = logging.getLogger(__name__)
_WARMUP_MODES = ("linear", "constant")


def _check_factor(factor):
    checked = check_number("factor", factor)
    if not 0 <= checked <= 1:
        raise ValueError(f"factor={factor!r} is invalid: expected a value in [0, 1] (the rate only decays)")
    return checked


def _check_max_update(max_update, warmup_steps):
    max_update = check_positive_int("max_update", max_update)
    if max_update <= warmup_steps:
        raise ValueError(f"max_update={max_update!r} is invalid: expected an integer > warmup_steps="
                         f"{warmup_steps!r} (the decay spans max_update - warmup_steps updates)")
    return max_update


class LRScheduler:
    r"""Base class: holds ``base_lr`` and the warmup ramp; subclasses implement ``__call__(num_update)``.

    Parameters
    ----------
    base_lr : float, default 0.01
        :math:`\eta_0`, the rate the schedule starts from after warmup (>= 0).
    warmup_steps : int, default 0
        :math:`W`, the number of warmup updates (>= 0); calls with ``num_update < warmup_steps`` return
        :meth:`get_warmup_lr`.
    warmup_begin_lr : float, default 0
        :math:`\eta_b`, where the warmup starts; must lie in ``[0, base_lr]``.
    warmup_mode : {'linear', 'constant'}, default 'linear'
        ``'linear'`` ramps from :math:`\eta_b` towards :math:`\eta_w` = ``warmup_final_lr`` (``base_lr``
        at construction, not updated when the optimizer overwrites ``base_lr``); ``'constant'`` holds
        :math:`\eta_b`.
    """

    def __init__(self, base_lr=0.01, warmup_steps=0, warmup_begin_lr=0, warmup_mode="linear"):
        base_lr, warmup_steps, warmup_begin_lr, warmup_mode = self._check_warmup(
            base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.warmup_final_lr = base_lr
        self.warmup_begin_lr = warmup_begin_lr
        self.warmup_mode = warmup_mode

    @staticmethod
    def _check_warmup(base_lr, warmup_steps, warmup_begin_lr, warmup_mode):
        base_lr = check_nonnegative("base_lr", base_lr)
        warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        begin = check_nonnegative("warmup_begin_lr", warmup_begin_lr)
        if begin > base_lr:
            raise ValueError(f"warmup_begin_lr={warmup_begin_lr!r} is invalid: expected a value <= "
                             f"base_lr={base_lr!r}")
        warmup_mode = check_choice("warmup_mode", warmup_mode, _WARMUP_MODES)
        return base_lr, warmup_steps, begin, warmup_mode

    def get_warmup_lr(self, num_update):
        r"""The warmup rate for ``num_update < warmup_steps`` (see the module docstring)."""
        if not num_update < self.warmup_steps:
            raise ValueError(f"num_update={num_update!r} is invalid: get_warmup_lr expects num_update < "
                             f"warmup_steps={self.warmup_steps!r}")
        if self.warmup_mode == "linear":
            # MXNet's operation order, kept for bit parity.
            increase = (self.warmup_final_lr - self.warmup_begin_lr) * float(num_update) / float(self.warmup_steps)
            return self.warmup_begin_lr + increase
        if self.warmup_mode == "constant":
            return self.warmup_begin_lr
        raise ValueError(f"warmup_mode={self.warmup_mode!r} is invalid: expected one of "
                         f"{', '.join(map(repr, _WARMUP_MODES))}")

    def __call__(self, num_update):
        """The learning rate for ``num_update``, the largest update count of any weight."""
        raise NotImplementedError(f"{type(self).__name__} must override __call__")


class FactorScheduler(LRScheduler):
    r"""Multiply the rate by ``factor`` every ``step`` updates, down to ``stop_factor_lr``.

    With :math:`s` = ``step``, :math:`\gamma` = ``factor`` and :math:`\eta_{stop}` = ``stop_factor_lr``,
    for :math:`W \le n`

    .. math::

        \eta(n) = \eta_{k(n)}, \qquad k(n) = \left\lfloor \frac{\max(n', 1) - 1}{s} \right\rfloor, \qquad
        \eta_{k+1} = \begin{cases} \gamma\,\eta_k & \gamma\,\eta_k \ge \eta_{stop} \\
                                   \eta_{stop} & \text{otherwise} \end{cases}

    where :math:`\eta_0` is ``base_lr`` and :math:`n'` the largest ``num_update`` seen so far at or past
    warmup. MXNet's quirks, kept: the first decay happens at :math:`n = s + 1` (MXNet's docstring says
    :math:`\eta_0\gamma^{\lfloor n/s \rfloor}`); :math:`n` is absolute, so decays due during warmup
    all land at once on the first call with :math:`n \ge W`; the rate is built by repeated
    multiplication and stored back into ``base_lr`` (with ``count`` = :math:`k s`), so it never goes
    back up for a smaller :math:`n`; and a ``stop_factor_lr`` above ``base_lr`` lifts the rate to it at
    the first decay.

    Parameters
    ----------
    step : int
        :math:`s` >= 1, updates between decays.
    factor : float, default 1
        :math:`\gamma` in [0, 1].
    stop_factor_lr : float, default 1e-8
        :math:`\eta_{stop}` >= 0, the floor of the decayed rate.
    base_lr, warmup_steps, warmup_begin_lr, warmup_mode
        See :class:`LRScheduler`.
    """

    def __init__(self, step, factor=1, stop_factor_lr=1e-8, base_lr=0.01,
                 warmup_steps=0, warmup_begin_lr=0, warmup_mode="linear"):
        self._check_warmup(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        step = check_positive_int("step", step)
        factor = _check_factor(factor)
        stop_factor_lr = check_nonnegative("stop_factor_lr", stop_factor_lr)
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.step = step
        self.factor = factor
        self.stop_factor_lr = stop_factor_lr
        self.count = 0

    def __call__(self, num_update):
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        # A while, not an if: resuming at a large num_update catches up on every decay at once.
        while num_update > self.count + self.step:
            lr = self.base_lr * self.factor
            if lr < self.stop_factor_lr:
                lr = self.stop_factor_lr
            self.base_lr, unchanged = lr, lr == self.base_lr
            if unchanged:
                # Fixed point (floor reached, or factor 1): jump over the remaining no-op iterations,
                # landing on the count MXNet's loop ends with (the smallest count + j*step >= num_update).
                self.count += int(-((self.count - num_update) // self.step)) * self.step - self.step
                break
            self.count += self.step
            _log.info("Update[%d]: change learning rate to %0.5e", num_update, lr)
        return self.base_lr


class MultiFactorScheduler(LRScheduler):
    r"""Multiply the rate by ``factor`` once past each entry of ``step``.

    With :math:`s_1 < s_2 < \dots` = ``step`` and :math:`\gamma` = ``factor``, for :math:`W \le n`

    .. math::

        \eta(n) = \eta_0\,\gamma^{\#\{i \,:\, s_i < n'\}}

    where :math:`\eta_0` is ``base_lr`` and :math:`n'` the largest ``num_update`` seen so far at or past
    warmup. MXNet's quirks, kept: the decay for :math:`s_i` happens at :math:`n = s_i + 1`; :math:`n` is
    absolute (steps inside the warmup all apply on the first call with :math:`n \ge W`); the rate is
    built by repeated multiplication into ``base_lr`` (``cur_step_ind`` decays done, ``count`` the last
    step passed), so it never goes back up; there is no floor.

    Parameters
    ----------
    step : list of int
        Strictly increasing update counts, each >= 1 (a tuple is accepted and stored as a list).
    factor : float, default 1
        :math:`\gamma` in [0, 1].
    base_lr, warmup_steps, warmup_begin_lr, warmup_mode
        See :class:`LRScheduler`.
    """

    def __init__(self, step, factor=1, base_lr=0.01, warmup_steps=0, warmup_begin_lr=0,
                 warmup_mode="linear"):
        self._check_warmup(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        if not isinstance(step, (list, tuple)) or not step:
            raise ValueError(f"step={step!r} is invalid: expected a non-empty list of increasing integers >= 1")
        steps = [check_positive_int(f"step[{i}]", s) for i, s in enumerate(step)]
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise ValueError(f"step={step!r} is invalid: expected strictly increasing integers, but "
                                 f"step[{i}]={steps[i]} <= step[{i - 1}]={steps[i - 1]}")
        factor = _check_factor(factor)
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.step = steps
        self.cur_step_ind = 0
        self.factor = factor
        self.count = 0

    def __call__(self, num_update):
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        while self.cur_step_ind < len(self.step) and num_update > self.step[self.cur_step_ind]:
            self.count = self.step[self.cur_step_ind]
            self.cur_step_ind += 1
            self.base_lr *= self.factor
            _log.info("Update[%d]: change learning rate to %0.5e", num_update, self.base_lr)
        return self.base_lr


class _DecayScheduler(LRScheduler):
    """Poly and Cosine: ``final_lr + (base_lr_orig - final_lr) * decay(n - warmup_steps)`` up to
    ``max_update``, the last in-range value past it (MXNet's arithmetic, in MXNet's order)."""

    def __init__(self, max_update, base_lr=0.01, final_lr=0,
                 warmup_steps=0, warmup_begin_lr=0, warmup_mode="linear"):
        _, warmup_steps, _, _ = self._check_warmup(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        max_update = _check_max_update(max_update, warmup_steps)
        final_lr = check_nonnegative("final_lr", final_lr)
        super().__init__(base_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.base_lr_orig = self.base_lr
        self.max_update = max_update
        self.final_lr = final_lr
        self.max_steps = self.max_update - self.warmup_steps

    def _decay(self, n):
        raise NotImplementedError

    def __call__(self, num_update):
        if num_update < self.warmup_steps:
            return self.get_warmup_lr(num_update)
        if num_update <= self.max_update:
            self.base_lr = self.final_lr + (self.base_lr_orig - self.final_lr) * \
                self._decay(num_update - self.warmup_steps)
        return self.base_lr


class PolyScheduler(_DecayScheduler):
    r"""Polynomial decay from ``base_lr`` to ``final_lr`` over ``max_update - warmup_steps`` updates.

    With :math:`T` = ``max_update``, :math:`p` = ``pwr``, :math:`\eta_T` = ``final_lr`` and
    :math:`\eta_0` = ``base_lr_orig`` (``base_lr`` at construction), for :math:`W \le n \le T`

    .. math::

        \eta(n) = \eta_T + (\eta_0 - \eta_T)\left(1 - \frac{n - W}{T - W}\right)^{p}.

    Each in-range call stores its value in ``base_lr``; for :math:`n > T` the scheduler returns that
    stored value: the value of the last in-range call, which is :math:`\eta_T` only if that call was at
    :math:`n = T`, and the construction-time (or optimizer-overwritten) ``base_lr`` if no in-range call
    was ever made (MXNet's docstring says 0 past :math:`T`; its code does this). ``max_steps`` holds
    :math:`T - W`. A ``final_lr`` above ``base_lr`` makes the rate grow, as in MXNet.

    Parameters
    ----------
    max_update : int
        :math:`T`, the update at which the rate reaches ``final_lr``; must exceed ``warmup_steps``.
    pwr : float, default 2
        :math:`p` >= 0 (stored as ``power``).
    final_lr : float, default 0
        :math:`\eta_T` >= 0.
    base_lr, warmup_steps, warmup_begin_lr, warmup_mode
        See :class:`LRScheduler`.
    """

    def __init__(self, max_update, base_lr=0.01, pwr=2, final_lr=0,
                 warmup_steps=0, warmup_begin_lr=0, warmup_mode="linear"):
        pwr = check_nonnegative("pwr", pwr)
        super().__init__(max_update, base_lr, final_lr, warmup_steps, warmup_begin_lr, warmup_mode)
        self.power = pwr

    def _decay(self, n):
        return pow(1 - float(n) / float(self.max_steps), self.power)


class CosineScheduler(_DecayScheduler):
    r"""Cosine decay from ``base_lr`` to ``final_lr`` over ``max_update - warmup_steps`` updates.

    With :math:`T` = ``max_update``, :math:`\eta_T` = ``final_lr`` and :math:`\eta_0` = ``base_lr_orig``
    (``base_lr`` at construction), for :math:`W \le n \le T`

    .. math::

        \eta(n) = \eta_T + (\eta_0 - \eta_T)\,\frac{1 + \cos\!\left(\pi\,\frac{n - W}{T - W}\right)}{2}.

    Past :math:`T` it returns the value stored by the last in-range call, exactly as
    :class:`PolyScheduler` (not 0 as MXNet's docstring says). Unlike ``torch.optim.lr_scheduler.
    CosineAnnealingLR`` it is a function of the update count, not of how often it was called, and it
    does not restart.

    Parameters
    ----------
    max_update : int
        :math:`T`, the update at which the rate reaches ``final_lr``; must exceed ``warmup_steps``.
    final_lr : float, default 0
        :math:`\eta_T` >= 0.
    base_lr, warmup_steps, warmup_begin_lr, warmup_mode
        See :class:`LRScheduler`.
    """

    def _decay(self, n):
        return (1 + cos(pi * n / self.max_steps)) / 2
