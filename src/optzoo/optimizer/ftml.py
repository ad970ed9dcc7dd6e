"""FTML, Follow the Moving Leader (MXNet ``ftml``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_nonnegative, check_unit_interval
from ._numerics import compute_dtype, in_dtype, mx_param, mx_scalar, one_minus_pow, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class FTML(Optimizer):
    r"""FTML (Zheng & Kwok, ICML 2017), with coupled L2 weight decay.

    With :math:`G = \mathrm{clip}(rg\cdot g + wd\cdot w)` (weight decay *inside* the clip) and step
    :math:`t`:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2)\,G^2 \\
        d_t &= \frac{1-\beta_1^t}{lr}\left(\sqrt{\frac{v}{1-\beta_2^t}} + \epsilon\right) \\
        z &\leftarrow \beta_1 z + (1-\beta_1)\,G - (d_t - \beta_1 d)\,w \\
        d &\leftarrow d_t \\
        w &\leftarrow -z / d_t

    State: ``(d, v, z)`` in the weight dtype; multi-precision ``(w32, (d32, v32, z32))``.

    As in MXNet's kernel every scalar, :math:`t` and the powers :math:`\beta^t` included, is a value of
    the weight dtype (``lr``, ``wd``, :math:`\beta_1`, :math:`\beta_2`, ``rescale_grad`` and the clip
    bound are fp32 parameters first, :math:`\epsilon` a double one), and the arithmetic is in that dtype.
    Except for fp16/bf16 weights without ``multi_precision``, which are updated in fp32, scalars and
    :math:`1-\beta^t` included, and rounded back when stored (see ``_numerics``, item 5): in bf16,
    MXNet's :math:`\beta_2^t` is 1 and :math:`1-\beta_2^t` is 0, and in fp16 :math:`\epsilon` is 0.

    torch.optim has no FTML. Note that :math:`w` is not moved by a step but re-solved from the
    accumulators: :math:`z` and :math:`d` carry the whole history (with a time-varying ``lr``, each
    step's :math:`d_t` uses the current one), so the weight's previous value enters only through the
    :math:`(d_t - \beta_1 d)\,w` term.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's ``ftml_update``), fp32 and multi-precision alike: the rule above with :math:`g = 0` on
    absent rows.

    Parameters
    ----------
    beta1 : float in [0, 1), default 0.6
    beta2 : float in [0, 1), default 0.999
    epsilon : float >= 0, default 1e-8
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("d", "v", "z")  # the state's tensors, as the docstring names them

    def __init__(self, beta1=0.6, beta2=0.999, epsilon=1e-8, **kwargs):
        beta1 = check_unit_interval("beta1", beta1)
        beta2 = check_unit_interval("beta2", beta2)
        epsilon = check_nonnegative("epsilon", epsilon)
        super().__init__(**kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

    def create_state(self, index, weight):
        return (torch.zeros_like(weight), torch.zeros_like(weight), torch.zeros_like(weight))  # d, v, z

    def prepare(self, *, lr, wd, t, index, dtype):
        ct = compute_dtype(dtype)  # fp32 for fp16/bf16 weights: see the docstring
        P = functools.partial(mx_param, dtype=ct)  # ftml_update's float parameters
        b1, b2, lr, wd, rg = P(self.beta1), P(self.beta2), P(lr), P(wd), P(self.rescale_grad)
        eps = mx_scalar(self.epsilon, ct)  # a double parameter
        # 1 - power::Map(beta, t) (libm's pow, correctly rounded), in the kernel's roundings (one_minus_pow)
        c1, c2 = one_minus_pow(b1, t, dtype), one_minus_pow(b2, t, dtype)
        # 1 - beta (the kernel's 1.f - beta) as a scalar of its own: where an executor holds the scalars in
        # the weight dtype, bf16(0.999) is 1 but bf16(0.001) is not 0
        return b1, 1 - b1, b2, 1 - b2, wd, rg, eps, in_dtype(c1 / lr, ct), c2  # c = (1 - beta1^t)/lr

    def kernel(self, w, g, state, s, seg=None):
        b1, one_minus_b1, b2, one_minus_b2, wd, rg, eps, c, c2 = s
        ct = compute_dtype(w.dtype)  # fp32 for fp16/bf16 weights: see the docstring
        w, g, d, v, z = (x.to(ct) for x in (w, g, *state))
        G = self._clip(rg * g + wd * w)
        v = b2 * v + one_minus_b2 * (G * G)
        d_t = c * (sqrt_rn(v / c2) + eps)
        z = b1 * z + one_minus_b1 * G - (d_t - b1 * d) * w
        return -z / d_t, (d_t, v, z)
