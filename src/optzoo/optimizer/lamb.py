"""LAMB, layer-wise adaptive moments (MXNet ``lamb``)."""
from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_nonnegative, check_unit_interval
from ._numerics import compute_dtype, mx_list_param, mx_param, one_minus_pow, norm_of, sqrt_rn
from .base import Optimizer
from .registry import register


@register
class LAMB(Optimizer):
    r"""LAMB (You et al., "Large Batch Optimization for Deep Learning", ICLR 2020).

    Phase 1, an Adam direction plus decoupled weight decay, with :math:`G = \mathrm{clip}(rg\cdot g)`
    (weight decay *not* in :math:`G`) and step :math:`t`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) G \\
        v &\leftarrow \beta_2 v + (1-\beta_2) G^2 \\
        u &= \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon} + wd\cdot w
           \quad\text{(} u = m/(\sqrt{v} + \epsilon) + wd\cdot w \text{ without bias correction)}

    Phase 2, the layer-wise trust ratio:

    .. math::
        r_1 &= \min(\max(\|w\|_2, lb), ub), \qquad r_2 = \|u\|_2 \\
        w &\leftarrow w - lr\cdot\frac{r_1}{r_2}\,u \qquad (\text{ratio } 1 \text{ when } r_1 = 0
           \text{ or } r_2 = 0)

    where the bounds ``lower_bound`` (:math:`lb`) and ``upper_bound`` (:math:`ub`) apply only when
    set to a nonzero value, as in MXNet. The numbers are those of MXNet's aggregated
    ``multi_lamb_update`` (the path its Updater takes), for every weight dtype but fp16/bf16 without
    multi-precision (below): :math:`u` is held in fp32, the norms are fp32 values summed in order
    (``multi_sum_sq``; where that fp32 sum of squares underflows or overflows, as for ~1e-24 or ~1e20 values, the norm comes from fp64 squares instead: :func:`~._numerics.norm_of`), and the ratio :math:`r_1/r_2` is taken in fp32 (bit-exact for fp32; for fp64
    the norms are an fp32 ulp or so off).

    fp16/bf16 weights without ``multi_precision`` are updated in fp32, scalars included, and rounded
    back when stored (see ``_numerics``, item 5). MXNet 1.9.1 computes :math:`m`, :math:`v` and
    :math:`\beta^t` in fp16; in bf16, :math:`\beta_2 = 0.999` and :math:`\beta_2^t` would be 1:
    :math:`v` would never move and :math:`1-\beta_2^t` would be 0.

    State: ``(m, v)`` in the weight dtype; multi-precision ``(w32, (m32, v32))``.

    Multi-precision: the rule sees the fp32 master copy, so :math:`r_1 = \|w_{32}\|` and the master
    copy is updated. This is the single-tensor semantics of MXNet 1.9.1 with its bug fixed: 1.9.1's
    ``mp_lamb_update_phase2`` writes the fp16 weight but never stores :math:`w_{32}`, so on MXNet's
    single-tensor path the master copy stays at its initial value. (MXNet's aggregated path, which its
    Updater always takes, stores :math:`w_{32}` but computes :math:`r_1` over the fp16 weight.)

    ``aggregate_num`` is 45 (MXNet's default, ``MXNET_OPTIMIZER_AGGREGATION_SIZE`` clamped to
    [1, 45]); a list call applies the same per-tensor rule to each parameter.

    torch.optim has no LAMB. Compared with common implementations (e.g. NVIDIA's FusedLAMB,
    ``pytorch_optimizer.Lamb``): epsilon is added after the square root of the bias-corrected
    :math:`v`; :math:`r_1` is not clamped to [0, 10] unless ``upper_bound`` says so; there is no
    global gradient-norm clipping (``clip_gradient`` clips elementwise).

    Parameters
    ----------
    learning_rate : float, default 0.001
    beta1 : float in [0, 1), default 0.9
    beta2 : float in [0, 1), default 0.999
    epsilon : float >= 0, default 1e-6
    lower_bound : float >= 0, optional
        :math:`lb`, the floor of :math:`r_1`; None or 0 disable it.
    upper_bound : float >= 0, optional
        :math:`ub`, the ceiling of :math:`r_1`; None or 0 disable it.
    bias_correction : bool, default True
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("m", "v")  # the state's tensors, as the docstring names them

    capabilities = frozenset({"multi_precision", "aggregated"})
    _kernel_reads = ("clip_gradient", "bias_correction")
    aggregate_num = 45

    _segment_kernel = True  # per-tensor norms: packed parameters run as rows of equal-sized parameters
    _two_phase = True  # u's root and division, computed once on the CPU (see _phases)

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-6, lower_bound=None,
                 upper_bound=None, bias_correction=True, **kwargs):
        beta1 = check_unit_interval("beta1", beta1)
        beta2 = check_unit_interval("beta2", beta2)
        epsilon = check_nonnegative("epsilon", epsilon)
        lower_bound = check_nonnegative("lower_bound", lower_bound, allow_none=True)
        upper_bound = check_nonnegative("upper_bound", upper_bound, allow_none=True)
        bias_correction = check_bool("bias_correction", bias_correction)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.lower_bound, self.upper_bound = lower_bound, upper_bound
        self.bias_correction = bias_correction

    def create_state(self, index, weight):
        return (torch.zeros_like(weight), torch.zeros_like(weight))  # m, v

    def prepare(self, *, lr, wd, t, index, dtype):
        # multi_lamb_update's parameters: float fields, and lr and wd from float lists
        ct = compute_dtype(dtype)  # fp32 for fp16/bf16 weights: see the docstring
        b1, b2, eps, rg = (mx_param(x, ct) for x in (self.beta1, self.beta2, self.epsilon, self.rescale_grad))
        c1, c2 = (one_minus_pow(b1, t, dtype), one_minus_pow(b2, t, dtype)) if self.bias_correction else (1, 1)
        # the bounds of r1, fp32 fields that MXNet passes only when truthy (else no bound: 0 and inf)
        lb = mx_param(self.lower_bound, torch.float32) if self.lower_bound else 0.0
        ub = mx_param(self.upper_bound, torch.float32) if self.upper_bound else math.inf
        # 1 - beta (the kernel's 1.f - beta) as a scalar of its own: where an executor holds the scalars in
        # the weight dtype, bf16(0.999) is 1 but bf16(0.001) is not 0
        return b1, 1 - b1, b2, 1 - b2, eps, rg, mx_list_param(lr, ct), mx_list_param(wd, ct), c1, c2, lb, ub

    def kernel(self, w, g, state, s, seg=None):
        u, new_state, scale = self.first_phase(w, g, state, s, seg)
        return self.second_phase(w, u, scale), new_state

    def first_phase(self, w, g, state, s, seg=None):
        r"""Phase 1: the moments, :math:`u` (fp32) and the step's scale :math:`lr\cdot r_1/r_2`."""
        b1, one_minus_b1, b2, one_minus_b2, eps, rg, lr, wd, c1, c2, lb, ub = s
        ct = compute_dtype(w.dtype)  # fp32 for fp16/bf16 weights: see the docstring
        w, g, m, v = (x.to(ct) for x in (w, g, *state))
        G = self._clip(g * rg)
        m = b1 * m + one_minus_b1 * G
        v = b2 * v + one_minus_b2 * G * G
        # the kernel's sqrt is the double one, which widens the rest of u's expression to fp64; u is
        # then stored in an fp32 temporary. Compiled (held to 1e-5, not to bits), u is fp32 math and the bias
        # corrections multiply by their reciprocals: fp64 math or three divisions per element would make it
        # compute-bound
        wide = torch.float32 if torch.compiler.is_compiling() and w.dtype != torch.float64 else torch.float64
        if not self.bias_correction:
            m_hat, v_hat = m, v
        elif wide is torch.float32:
            m_hat, v_hat = m * (1 / c1), v * (1 / c2)
        else:
            m_hat, v_hat = m / c1, v / c2
        u = (m_hat.to(wide) / (sqrt_rn(v_hat.to(wide)) + eps) + (wd * w).to(wide)).to(torch.float32)
        r1, r2 = norm_of(w, seg), norm_of(u, seg)  # fp32 values (MXNet's, unless the fp32 sums under/overflow)
        r1 = r1.clamp(min=lb, max=ub)  # no-ops when unset: r1 >= 0 (or nan, which clamp keeps)
        # lr * (r1 / r2): the fp32 ratio times lr in double, rounded once to the weight dtype
        scale = torch.where((r1 != 0) & (r2 != 0), ((r1 / r2).to(wide) * lr).to(w.dtype), lr)
        return u, (m, v), scale

    def second_phase(self, w, u, scale):
        r"""Phase 2: :math:`w - lr\cdot\frac{r_1}{r_2}\,u` (in fp32 for fp16/bf16 weights)."""
        w = w.to(compute_dtype(w.dtype))
        return w - scale * u.to(w.dtype)
