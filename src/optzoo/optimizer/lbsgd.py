"""LBSGD: large-batch SGD with gradient accumulation and warmup (MXNet ``lbsgd``)."""
from __future__ import annotations

import math
import operator

import torch

from .._checks import check_choice, check_nonnegative, check_number, check_positive_int, check_unit_interval
from ._numerics import in_dtype, mx_param, np_sum
from .base import Optimizer
from .registry import register

_STRATEGIES = ("linear", "power2", "sqrt", "lars")
_DTYPE = operator.attrgetter("dtype")


@register
class LBSGD(Optimizer):
    r"""Large-batch SGD: accumulate ``batch_scale`` gradients per parameter, then one scaled SGD step.

    Every call adds the gradient to the parameter's accumulator :math:`C` and counts it in
    :math:`n` (which starts at ``begin_epoch * updates_per_epoch + 1`` and is never reset). When
    :math:`n` is a multiple of :math:`M` = ``batch_scale``, with :math:`\bar g = C/M`,
    :math:`G = \mathrm{clip}(rg\cdot\bar g)` and :math:`lr' = \rho\cdot lr`:

    .. math::
        \mu = 0:\quad & w \leftarrow (1 - lr'\,wd)\,w - lr'\,G \\
        \mu > 0:\quad & mom \leftarrow \mu\,mom - lr'\,wd\cdot w - lr'\,G,\qquad w \leftarrow w + mom

    and :math:`C \leftarrow 0`; on the other calls the weight is unchanged. The multiplier
    :math:`\rho` ramps from 1 to :math:`M` over :math:`N` = ``warmup_epochs * updates_per_epoch``
    updates (:math:`\rho = M` once :math:`n \ge N`, and 1 if :math:`N \le 1`):

    .. math::
        \text{linear: } 1 + (M-1)\,n/N \qquad \text{power2: } 1 + (M-1)\,n^2/N^2 \qquad
        \text{sqrt: } 1 + (M-1)\sqrt{n/N}

    or, for ``'lars'``, :math:`\rho = \mathrm{clamp}\big(\sqrt{\textstyle\sum w^2 /
    (\sum \bar g^2 + wd\sum w^2 + 10^{-18})},\ 0.01,\ 100\big)` (no ``rescale_grad``).

    As in MXNet, the learning rate is read *before* the update is counted (a scheduler sees
    0, 1, 2, ...), and the accumulators live on the optimizer (``cumgrads``: index ->
    ``{'cum_grad', 'num_cums'}``). MXNet keeps a reference to the first gradient of a large batch;
    optzoo copies it. MXNet uses :math:`\rho = 1` for an unknown ``warmup_strategy``; optzoo rejects it.

    Fast path: with ``batch_scale = 1`` (every call steps) and a schedule warmup (not ``'lars'``) the rule is
    ``prepare`` (the count and the warmup multiplier) + ``kernel`` (the SGD step), which the executor runs
    like any other optimizer's; accumulating settings run the rule tensor by tensor.

    Row-sparse gradients (``batch_scale = 1`` with a schedule warmup only; accumulating settings refuse them):
    lazy, as MXNet's ``sgd(_mom)_update`` with its default ``lazy_update``, also under multi-precision.

    State: ``mom`` (weight dtype) or None when ``momentum == 0``; multi-precision ``(w32, mom32)``.
    fp16 weights without multi-precision compute in fp16, as MXNet's ``half_t`` kernels do: every operation is
    rounded, the float parameters and their products (:math:`lr\cdot wd`, :math:`1 - lr\cdot wd`) too
    (``tests/test_half_kernels.py``).

    torch.optim has no LBSGD (``torch.optim.SGD`` with gradient accumulation and a warmup scheduler
    is the nearest equivalent).

    Parameters
    ----------
    momentum : float in [0, 1), default 0
    multi_precision : bool, default False
    warmup_strategy : {'linear', 'power2', 'sqrt', 'lars'}, default 'linear'
    warmup_epochs : float >= 0, default 5
    batch_scale : int >= 1, default 1
        :math:`M`, the number of gradients accumulated per step.
    updates_per_epoch : int >= 1, default 32
    begin_epoch : int >= 0, default 0
    num_epochs : int, default 60
        Unused, as in MXNet.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("mom",)  # the state's tensors, as the docstring names them

    _step_vars = Optimizer._step_vars + ("cumgrads",)

    _lr_before_count = True
    _prepare_advances = True  # prepare advances each index's accumulation count

    @property
    def _reads_per_index(self):
        # the lr is read before each index is counted: with a scheduler (which reads num_update) a list is read
        # index by index; without one every index reads the same lr, and reading the list whole is the same
        return self.lr_scheduler is not None

    def __init__(self, momentum=0.0, multi_precision=False, warmup_strategy="linear", warmup_epochs=5,
                 batch_scale=1, updates_per_epoch=32, begin_epoch=0, num_epochs=60, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        warmup_strategy = check_choice("warmup_strategy", warmup_strategy, _STRATEGIES)
        warmup_epochs = check_nonnegative("warmup_epochs", warmup_epochs)
        batch_scale = check_positive_int("batch_scale", batch_scale)
        updates_per_epoch = check_positive_int("updates_per_epoch", updates_per_epoch)
        begin_epoch = check_positive_int("begin_epoch", begin_epoch, minimum=0)
        num_epochs = check_number("num_epochs", num_epochs)  # unused, as in MXNet, but saved with the rest
        super().__init__(multi_precision=multi_precision, **kwargs)
        self.momentum = momentum
        self.warmup_strategy = warmup_strategy
        self.warmup_epochs = warmup_epochs
        self.batch_scale = batch_scale
        self.updates_per_epoch = updates_per_epoch
        self.begin_epoch = begin_epoch
        self.num_epochs = num_epochs
        self.init_updates = self.begin_epoch * self.updates_per_epoch
        self.cumgrads = {}

    def sparse_mode(self, index, multi_precision):
        # MXNet: sgd(_mom)_update's lazy row-sparse kernels, also under multi-precision; optzoo's accumulator
        # holds dense gradients only, so accumulating settings refuse row-sparse ones
        return "lazy" if self._has_fast_path() else None

    def create_state(self, index, weight):
        return torch.zeros_like(weight) if self.momentum != 0.0 else None

    def _get_lbmult(self, nup):
        """The warmup multiplier :math:`\\rho` after ``nup`` accumulated gradients."""
        nwup = self.warmup_epochs * self.updates_per_epoch
        maxmult = float(self.batch_scale)
        if nup >= nwup:
            return maxmult
        if nwup <= 1:
            return 1.0
        if self.warmup_strategy == "linear":
            return 1.0 + (maxmult - 1) * nup / nwup
        if self.warmup_strategy == "power2":
            return 1.0 + (maxmult - 1) * (nup * nup) / (nwup * nwup)
        return 1.0 + (maxmult - 1) * math.sqrt(float(nup) / nwup)  # sqrt

    def _get_lars(self, w, g, wd):
        """The ``'lars'`` multiplier: squared sums in the weight dtype (numpy's, as MXNet takes them),
        the ratio in double."""
        w2, g2 = np_sum(w * w), np_sum(g * g)
        return min(max(math.sqrt(w2 / (g2 + wd * w2 + 1e-18)), 0.01), 100.0)

    def _cumulate(self, index, g):
        entry = self.cumgrads.get(index)
        more = entry and entry["num_cums"] > 0
        entry = {"cum_grad": entry["cum_grad"] + g if more else g.clone(), "num_cums": self._next_count(index)}
        self.cumgrads[index] = entry
        return entry

    def _next_count(self, index):
        """``num_cums`` after this call: one more, or ``begin_epoch * updates_per_epoch + 1`` at the start."""
        entry = self.cumgrads.get(index)
        return entry["num_cums"] + 1 if entry and entry["num_cums"] > 0 else self.init_updates + 1

    def _scalars(self, lr, wd, dtype):
        """The SGD step's scalars: ``sgd(_mom)_update``'s float parameters and their products."""
        lr, wd, mu, rg = (mx_param(x, dtype) for x in (lr, wd, self.momentum, self.rescale_grad))
        # products of DType parameters rounded to the kernel's dtype first (fp16: half_t rounds each; as SGD's)
        lr_wd = in_dtype(lr * wd, dtype)
        return mu, lr, lr_wd, in_dtype(1 - lr_wd, dtype), rg, in_dtype(lr * rg, dtype), self.batch_scale

    def _has_fast_path(self):
        return self.batch_scale == 1 and self.warmup_strategy != "lars"

    def prepare(self, *, lr, wd, t, index, dtype):
        """The fast path's half of ``rule`` when every call steps: the same count, multiplier and bookkeeping
        (``cum_grad`` 0 after the step, as the rule leaves it)."""
        num = self._next_count(index)
        self.cumgrads[index] = {"cum_grad": 0, "num_cums": num}
        return self._scalars(lr * self._get_lbmult(num), wd, dtype)

    def _prepare_all(self, indices, weights, reads):
        """``prepare`` for every index of a list (distinct indices), in index order, with the same values and
        bookkeeping: the counts in C-level maps, the warmup multiplier and the scalars once per distinct
        ``(lr, wd, t, dtype, count)``."""
        start = self.init_updates + 1
        nums = [e["num_cums"] + 1 if e and e["num_cums"] > 0 else start for e in map(self.cumgrads.get, indices)]
        self.cumgrads.update(zip(indices, [{"cum_grad": 0, "num_cums": n} for n in nums]))
        keys = list(zip(reads, map(_DTYPE, weights), nums))
        if keys and keys.count(keys[0]) == len(keys):  # one key for every index (compared in C; tuples hash slowly)
            (lr, wd, _), dtype, num = keys[0]
            return [self._scalars(lr * self._get_lbmult(num), wd, dtype)] * len(keys)
        table = {key: self._scalars(key[0][0] * self._get_lbmult(key[2]), key[0][1], key[1])
                 for key in dict.fromkeys(keys)}
        return list(map(table.__getitem__, keys))

    def rule(self, w, g, mom, *, lr, wd, t, index):
        entry = self._cumulate(index, g)
        if entry["num_cums"] % self.batch_scale != 0:
            return None, None
        if self.warmup_strategy == "lars":
            lr = lr * self._get_lars(w, entry["cum_grad"] / self.batch_scale, wd)
        else:
            lr = lr * self._get_lbmult(entry["num_cums"])
        cum, entry["cum_grad"] = entry["cum_grad"], 0  # num_cums is not reset (MXNet)
        return self.kernel(w, cum, mom, self._scalars(lr, wd, w.dtype))

    def kernel(self, w, g, mom, s, seg=None):
        """The SGD step from the accumulated gradient ``g`` (the sum of ``batch_scale`` gradients)."""
        mu, lr, lr_wd, decay, rg, lr_rg, scale = s
        grad = g / scale
        step = lr * self._clip(rg * grad) if self.clip_gradient else lr_rg * grad  # = _rescaled_clipped(grad, lr)
        if mom is None:
            return decay * w - step, None
        mom = mu * mom - lr_wd * w - step
        return w + mom, mom
