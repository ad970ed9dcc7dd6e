"""SGLD: stochastic gradient Langevin dynamics (MXNet ``sgld``)."""
from __future__ import annotations

import functools
import math

import torch

from ._numerics import mx_scalar, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class SGLD(Optimizer):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011): a half SGD step plus Gaussian noise.

    With :math:`G = \mathrm{clip}(rg\cdot g)` and :math:`\xi \sim \mathcal N(0, 1)` drawn per element:

    .. math::
        w &\leftarrow w - \tfrac{lr}{2}\,(G + wd\cdot w) \\
        w &\leftarrow w + \sqrt{lr}\;\xi

    so the noise has variance :math:`lr`. The noise is drawn by :meth:`_noise` (once per update, after
    the drift step, as MXNet), from ``generator`` when given, else from torch's default generator of
    the weight's device (reproducible with ``torch.manual_seed``). MXNet draws from its own global
    RNG, so its noise values cannot be reproduced; only their distribution is the same.

    The fast path makes the same draws: before a pack's or tensor's kernel runs it calls :meth:`_noise` once per
    parameter, in index order, into a flat noise buffer that the (eager or compiled) kernel adds. The
    same seed or ``generator`` therefore gives the reference path's noise bit for bit, with
    ``fused=None`` and ``fused=True`` alike.

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

    #: the fast path draws the noise before the kernel, with ``_noise`` per parameter, and appends it to ``s``
    _kernel_noise = True

    def __init__(self, generator=None, **kwargs):
        super().__init__(**kwargs)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} is invalid: expected a torch.Generator or None")
        self.generator = generator

    def create_state(self, index, weight):
        return None

    def _noise(self, weight, lr):
        r"""``sqrt(lr) * N(0, 1)`` with the weight's shape, dtype and device (``lr`` a number or, on the fast
        path, a tensor broadcast against the weight)."""
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"lr={lr!r} is invalid for SGLD: the noise variance lr must be >= 0")
        gen = self.generator
        device = gen.device if gen is not None else weight.device
        xi = torch.randn(weight.shape, dtype=weight.dtype, device=device, generator=gen)
        scale = sqrt_rn(lr) if isinstance(lr, torch.Tensor) else math.sqrt(lr)
        return scale * xi.to(weight.device)

    def prepare(self, *, lr, wd, t, index, dtype):
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid for SGLD: the noise variance lr must be >= 0")
        D = functools.partial(mx_scalar, dtype=dtype)  # scalars as MXNet's NDArray ops see them
        return D(self.rescale_grad), D(-lr / 2), D(wd), lr

    def kernel(self, w, g, state, s, seg=None):
        rg, neg_half_lr, wd, lr, *drawn = s
        G = self._clip(g * rg)
        w = w + neg_half_lr * (G + wd * w)
        # the fast path draws beforehand (the same _noise calls, in index order) and hands the noise over
        return w + (drawn[0] if drawn else self._noise(w, lr)), None
