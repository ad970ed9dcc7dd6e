"""SGLD: stochastic gradient Langevin dynamics (MXNet ``sgld``)."""
from __future__ import annotations

import functools
import math

import torch

from ._numerics import BLOCK, HALF, Key, counter_normal, in_dtype, mx_scalar, paired_normals
from .base import Optimizer
from .registry import register


@register
class SGLD(Optimizer):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011): a half SGD step plus Gaussian noise.

    With :math:`G = \mathrm{clip}(rg\cdot g)` and :math:`\xi \sim \mathcal N(0, 1)` drawn per element:

    .. math::
        w &\leftarrow w - \tfrac{lr}{2}\,(G + wd\cdot w) \\
        w &\leftarrow w + \sqrt{lr}\;\xi

    so the noise has variance :math:`lr`. The noise is counter-based (``_numerics.counter_normal``): per update of a parameter one key is drawn from ``generator`` when given, else from
    torch's default CPU generator (reproducible with ``torch.manual_seed``), and element :math:`i` gets
    the normal value of the counter ``key + i``, :math:`i` its place in memory (splitmix64, then Box-Muller with polynomial ``ln`` and
    ``cos``; the two halves of each block of 32 counters share a draw, one taking its ``cos``, the other its ``sin``: keys are
    multiples of 32). Keys are drawn per parameter in index order on every path (a list's keys from a CPU generator as
    one draw of as many values: the same values, one after the other), and compiled kernels generate the
    values inside their loop: the reference path, packs and compiled steps give the same bits. MXNet
    draws from its own global RNG, so its noise values cannot be reproduced; only their distribution is
    the same (tests replace ``_noise`` to replay MXNet's recorded noise).

    State: None; multi-precision ``(w32, None)`` (the noise is then drawn in float32).

    torch.optim has no SGLD.

    Parameters
    ----------
    generator : torch.Generator, optional
        The source of the noise. Pickling the optimizer keeps it (with its state); the safe dump of
        ``Updater.get_states(dump_optimizer=True)`` does not, and a reloaded optimizer draws from
        torch's default generator.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    capabilities = frozenset({"multi_precision", "stochastic"})

    #: the executor draws each parameter's key (``_draw``) before the kernels, in index order
    _kernel_noise = True
    #: the kernel also takes a weight as the halves of its blocks of 32 elements (engine.PAIRS)
    _kernel_pairs = True

    def __init__(self, generator=None, **kwargs):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} is invalid: expected a torch.Generator or None")
        super().__init__(**kwargs)
        self.generator = generator

    def create_state(self, index, weight):
        return None

    def _key(self):
        """One draw from ``generator`` (else torch's default CPU generator): a parameter's noise key."""
        return Key(int(torch.randint(0, 1 << _KEY_BITS, (), generator=self.generator,
                                     device=self.generator.device if self.generator is not None else "cpu")) * BLOCK)

    def _noise(self, weight, lr):
        r"""``sqrt(lr) * xi`` with the weight's shape and dtype: one key drawn, ``xi`` its counter-based
        normals (what the kernel adds; tests may replace this with noise of their own)."""
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid for SGLD: the noise variance lr must be >= 0")
        return math.sqrt(lr) * _normals(self._key(), weight)

    def _draw(self, weight, lr, index=None):
        """What the kernel adds, drawn before it in index order: a key (the kernel makes the normals
        itself), or, where ``_noise`` was replaced, that noise. The local shard of a sharded parameter
        (FSDP2) counts from its first element's place in the whole parameter (``_counter_offsets``, set by
        the torch face), so that shards never repeat each other's noise."""
        if "_noise" in self.__dict__ or type(self)._noise is not _OWN_NOISE:
            return self._noise(weight, lr)
        offsets = self.__dict__.get("_counter_offsets") or {}
        return Key(self._key() + offsets.get(index, 0))

    def _draw_all(self, weights, lrs, indices):
        """``_draw`` for every index of a list, in index order. From a CPU generator the keys are one draw of
        ``len(weights)`` values: the same values (and the same generator state after) as as many draws of one,
        which the CPU generator makes one after the other (Mersenne Twister; the fast-path tests compare them
        with the reference path's draws of one), without ~3 us of torch call per parameter. Other generators
        (whose one draw of n values differs from n draws of one) and a replaced ``_noise`` draw index by index."""
        gen = self.generator
        if "_noise" in self.__dict__ or type(self)._noise is not _OWN_NOISE or \
                (gen is not None and gen.device.type != "cpu") or len(weights) < 2:
            return [self._draw(w, lr, i) for w, lr, i in zip(weights, lrs, indices)]
        keys = [k * BLOCK for k in torch.randint(0, 1 << _KEY_BITS, (len(weights),), generator=gen, device="cpu").tolist()]
        offsets = self.__dict__.get("_counter_offsets")
        if offsets:
            keys = [k + offsets.get(i, 0) for k, i in zip(keys, indices)]
        return list(map(Key, keys))

    def _check_reads(self, indices, reads):
        # before any tensor changes, on every path (the reference path's rule calls prepare index by index)
        for i, (lr, _, _) in zip(indices, reads):
            if lr < 0:
                raise ValueError(f"lr={lr!r} (the effective learning rate of index {i!r}) is invalid for SGLD: "
                                 "the noise variance lr must be >= 0")

    def prepare(self, *, lr, wd, t, index, dtype):
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid for SGLD: the noise variance lr must be >= 0")
        D = functools.partial(mx_scalar, dtype=dtype)  # scalars as MXNet's NDArray ops see them
        return D(self.rescale_grad), D(-lr / 2), D(wd), in_dtype(math.sqrt(lr), dtype), lr

    def kernel(self, w, g, state, s, seg=None):
        rg, neg_half_lr, wd, sqrt_lr, lr, *drawn = s
        if isinstance(w, tuple):  # the halves of the weight's blocks of 32 elements, then the rest (engine.PAIRS)
            key = drawn[0]
            draws = _pair_noise(key, w[0], sqrt_lr) + (key + w[0].shape[0] * BLOCK,) * (len(w) - 2)
            return tuple(self.kernel(wk, gk, None, (rg, neg_half_lr, wd, sqrt_lr, lr, d))[0]
                         for wk, gk, d in zip(w, g, draws)), None
        G = self._clip(g * rg)
        w = w + neg_half_lr * (G + wd * w)
        drawn = drawn[0] if drawn else self._draw(w, lr)  # the fast path draws beforehand, in index order
        if isinstance(drawn, torch.Tensor) and drawn.dtype != torch.int64:
            return w + drawn, None  # noise of its own (``_noise`` replaced, or a pair's)
        return w + sqrt_lr * _normals(drawn, w), None


_OWN_NOISE = SGLD._noise  # SGLD's own noise, which the kernels make themselves from a key
#: keys are drawn below 2^57, times BLOCK (32: below 2^62), so that a parameter's blocks of counters are its own
_KEY_BITS = 57


def _pair_noise(key, half, sqrt_lr):
    """``sqrt_lr`` times the normals of a weight's two halves (``[blocks, 16]`` views, the first halves of its
    blocks of 32 elements and the second): ``counter_normal(key + i)`` for element ``i``, ``key`` a multiple of
    32, each block's counters mixed once for both halves (:func:`~._numerics.paired_normals`)."""
    ctr = key + torch.arange(half.shape[0], device=half.device).view(-1, 1) * BLOCK + \
        torch.arange(HALF, device=half.device)
    return tuple(sqrt_lr * x for x in paired_normals(ctr, half.dtype))


def _normals(key, w):
    """The counter-based normals of ``w``'s elements: ``counter_normal(key + i)``, ``i`` the element's place in
    memory (so a flat view of a channels_last weight gets the same values; ``key`` a number, or per element
    ``key - offset`` over a pack of parameters)."""
    place = torch.arange(w.numel(), device=w.device)
    # a view where it is one (a compiled loop then computes each place from its index; as_strided would make it
    # write the places to memory and read them back: 16 bytes an element)
    place = place.view(w.shape) if w.is_contiguous() else place.as_strided(w.shape, w.stride())
    return counter_normal(key + place, w.dtype)
