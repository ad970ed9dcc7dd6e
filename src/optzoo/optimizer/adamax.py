"""Adamax (MXNet ``adamax``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_unit_interval
from ._numerics import compute_dtype, mx_scalar
from .base import Optimizer
from .registry import register


@register
class Adamax(Optimizer):
    r"""Adamax (Kingma & Ba, section 7): Adam with the infinity norm, no epsilon.

    With :math:`G = \mathrm{clip}(rg\cdot g + wd\cdot w)` (weight decay *inside* the clip) and step
    :math:`t`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) G \\
        u &\leftarrow \max(\beta_2 u, |G|) \\
        w &\leftarrow w - \frac{lr}{1-\beta_1^t}\cdot m / u

    :math:`lr/(1-\beta_1^t)` is computed in double; scalars enter as MXNet's NDArray ops see them
    (``mx_scalar``). There is no epsilon: a coordinate whose gradient has been exactly 0 at every
    step so far gets :math:`0/0` = NaN, as in MXNet.

    fp16/bf16 weights without ``multi_precision`` are updated in fp32, scalars included (the bias
    correction is held in fp32, not in the weight dtype), and rounded back when stored (see
    ``_numerics``, item 5); MXNet 1.9.1 computes in fp16.

    State: ``(m, u)`` in the weight dtype; multi-precision ``(w32, (m32, u32))``.

    Differs from ``torch.optim.Adamax``: torch adds ``eps`` (default 1e-8) to :math:`|G|` inside the
    maximum, :math:`u \leftarrow \max(\beta_2 u, |G| + \epsilon)`; here ``wd`` is added to the
    gradient before clipping.

    Row-sparse gradients: standard, as MXNet 1.9.1 updates a dense weight from one (its storage fallback
    through MXNet's NDArray ops), fp32 and multi-precision alike: the rule above with :math:`g = 0` on absent
    rows.

    Parameters
    ----------
    learning_rate : float, default 0.002
    beta1 : float in [0, 1), default 0.9
    beta2 : float in [0, 1), default 0.999
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("m", "u")  # the state's tensors, as the docstring names them

    def __init__(self, learning_rate=0.002, beta1=0.9, beta2=0.999, **kwargs):
        beta1 = check_unit_interval("beta1", beta1)
        beta2 = check_unit_interval("beta2", beta2)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2 = beta1, beta2

    def create_state(self, index, weight):
        return (torch.zeros_like(weight), torch.zeros_like(weight))  # m, u

    def prepare(self, *, lr, wd, t, index, dtype):
        D = functools.partial(mx_scalar, dtype=compute_dtype(dtype))  # scalars as MXNet's NDArray ops see them
        b1 = self.beta1
        lr_t = lr / (1.0 - b1 ** t)
        return D(self.rescale_grad), D(wd), D(b1), D(1.0 - b1), D(self.beta2), D(lr_t)

    def kernel(self, w, g, state, s, seg=None):
        rg, wd, b1, one_minus_b1, b2, lr_t = s
        ct = compute_dtype(w.dtype)  # fp32 for fp16/bf16 weights: see the docstring
        w, g, m, u = (x.to(ct) for x in (w, g, *state))
        G = self._clip(g * rg + wd * w)
        m = m * b1 + one_minus_b1 * G
        u = torch.maximum(b2 * u, G.abs())
        return w - lr_t * m / u, (m, u)
