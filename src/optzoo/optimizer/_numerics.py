"""MXNet 1.9.1's numerics, reproduced so that optzoo's numbers equal MXNet's bit for bit.

MXNet's CPU kernels evaluate an update in the weight's dtype, one IEEE operation at a time, so the same
formula in the same operation order gives the same bits in torch, provided the inputs and the few
non-elementwise steps are the same. Four things differ, and this module undoes them:

1. **Square roots.** MXNet calls ``sqrtf`` / ``sqrt``, which IEEE 754 requires to be correctly rounded.
   torch 2.13's CPU ``sqrt`` is not: it is one ulp off on ~15% of fp32 and ~1% of fp64 inputs.
   :func:`sqrt_rn` is correctly rounded.

2. **Hyperparameters are parsed from text.** MXNet hands every operator parameter to C++ as ``str(x)``:

   * a ``float`` field of a fused kernel (``lr``, ``wd``, ``rescale_grad``, ``beta1``, ``epsilon``,
     ``clip_gradient``, the bounds of the ``clip`` op, ...) is read by dmlc-core's ``stof``, which is
     *not* correctly rounded (one fp32 ulp off ``float32(x)`` for ~16% of values): :func:`mx_float`.
     It stays an fp32 value in an fp64 kernel;
   * a ``double`` field (FTML's ``epsilon``) and the scalar of an NDArray op (``w * s``, ``w + s``: the
     Python-implemented optimizers) are read by dmlc's ``stod``, one double ulp off for ~12% of
     values: :func:`mx_double`;
   * a ``Tuple<float>`` field (the per-tensor ``lrs``/``wds`` of the ``multi_*`` kernels) is read by
     the C++ stream, correctly rounded: :func:`mx_list_float`.

3. **Scalars take the kernel's dtype.** The kernel casts each parameter to ``DType`` before using it:
   an epsilon of 1e-8 is 0 in a float16 kernel. torch rounds a Python scalar to an fp32/fp64 tensor's
   dtype by itself, but computes float16/bfloat16 ops with the scalar kept in fp32, so :func:`in_dtype`
   rounds it. :func:`mx_param`, :func:`mx_list_param` and :func:`mx_scalar` combine parsing and dtype;
   an optimizer converts its scalars once, at the top of its rule.

4. **Reductions** follow MXNet's summation order: :func:`sum_sq` (``multi_sum_sq``, the LARS and
   LAMB norms), :func:`np_sum` (numpy 1.23's sum, LBSGD) and :func:`kahan_sum` (``mean``, GroupAdaGrad).

5. **Low precision without a master copy** is where optzoo departs from MXNet. Its fp16 kernels round
   every scalar to fp16 (bf16 it does not run at all), which breaks the rules with bias corrections
   or schedules: bf16(0.999) is 1, so ``1 - beta2^t`` is 0 and LAMB and FTML divide by it, Adam's
   ``1 - beta2`` is 0 and its ``v`` never moves; an epsilon of 1e-8 is 0 in fp16. Those rules (Adam,
   Adamax, Nadam, FTML, LAMB) compute in :func:`compute_dtype`, fp32 for fp16/bf16 weights: the
   weight, gradient and states are read as fp32, the scalars are fp32 values (``1 - beta^t`` from
   :func:`one_minus_pow`: in double, rounded once), and only what is stored is rounded back. Signum
   (``1 - mu``) and GroupAdaGrad (its epsilon) hold their scalars in fp32 and keep their arithmetic.

Every parser maps a Python float to a Python float (the exact value the kernel holds), so a rule still
reads as its equations. One operation on two kernel scalars (``1 - beta``, ``lr * wd``) needs no
helper: it is exact in a Python double, and torch's one rounding when it meets the tensor is the
kernel's. Two chained ones (``(1 - beta1^t) / lr``) are rounded between the steps with :func:`in_dtype`.
"""
from __future__ import annotations

import ctypes
import functools
import math
from fractions import Fraction

import numpy as np
import torch

__all__ = ["sqrt_rn", "mx_float", "mx_double", "mx_list_float", "in_dtype", "mx_param", "mx_list_param",
           "mx_scalar", "compute_dtype", "one_minus_pow", "ROWS", "WHOLE", "Shards", "Key", "BLOCK", "HALF", "counter_normal", "paired_normals", "counter_polar", "sum_sq", "sum_sq_of", "sum_sq_rows", "np_sum", "kahan_sum", "wide_mul"]


# ------------------------------------------------------------------------------------------ wide scalars
def wide_mul(s, x: torch.Tensor) -> torch.Tensor:
    """``s * x`` for a scalar ``s`` held in fp32 (a Python float, or the executor's 0-d fp32 tensor) and an
    fp16/bf16 tensor ``x``, rounded once to ``x``'s dtype: a Python float's product in eager torch. A 0-d fp32
    tensor meeting an fp16/bf16 tensor is first rounded to that dtype (eagerly and compiled alike), so a rule
    that holds its scalars in fp32 while its arithmetic stays in the weight dtype (Signum; GroupAdaGrad's
    ``lr``) multiplies through this, and every path keeps the scalar's fp32 value."""
    ct = compute_dtype(x.dtype)
    return s * x if ct is x.dtype else (s * x.to(ct)).to(x.dtype)


# ------------------------------------------------------------------------------------------ sqrt
def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` correctly rounded (IEEE ``sqrtf`` / ``sqrt``, as MXNet's ``math::sqrt``).

    On the CPU, numpy's: it is the processor's IEEE square-root instruction, where torch's CPU
    ``sqrt`` goes through a vector math library accurate to one ulp only. float16 and bfloat16 go
    through float32: the root of a p-bit number never lies within 2^-(2p+1) (relative) of a p-bit
    rounding midpoint, so a format of more than 2p + 1 bits rounds back correctly. On other devices,
    torch's own ``sqrt`` (IEEE on CUDA).
    """
    if x.device.type != "cpu":
        return x.sqrt()
    if torch.compiler.is_compiling():
        # inside a compiled fast-path kernel numpy is out of reach, and not needed: inductor's C++ computes
        # an fp32 root with the processor's IEEE instruction (sqrtps; checked against numpy in the tests),
        # which rounds back correctly for fp16/bf16 (same argument as above); fp64 keeps torch's (<= 1 ulp)
        return x.sqrt() if x.dtype in (torch.float32, torch.float64) else x.float().sqrt().to(x.dtype)
    wide = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
    with np.errstate(invalid="ignore"):  # sqrt of a negative number is nan, as in torch
        return torch.from_numpy(np.asarray(np.sqrt(wide.numpy()))).to(x.dtype)


# ------------------------------------------------------------------------------------------ parsing
_c_float = ctypes.c_float


def _round_f32(x: float) -> float:
    # the C cast (round to nearest even; +-inf beyond the largest fp32), by ctypes rather than struct: where
    # dynamo (torch 2.13) traces it (the frames a constant function, assume_constant_result below, calls while
    # it runs), its struct polyfill recursed without end; ctypes is a clean graph break
    return _c_float(x).value


def _dmlc_parse(x: float, rnd) -> float:
    """dmlc-core's ``ParseFloat`` (strtonum.h) applied to Python's ``str(x)``.

    The integer part, then the fraction digits read as one integer divided by ``10**digits``, then
    the exponent applied by repeated multiplication; every intermediate is rounded by ``rnd`` (to
    fp32 for ``stof``, to fp64 for ``stod``). The extra roundings are why it is not correctly rounded.
    """
    x = float(x)
    if not math.isfinite(x):
        return x
    mantissa, _, exponent = repr(abs(x)).partition("e")
    int_part, _, frac = mantissa.partition(".")
    value = rnd(float(int(int_part)))
    if frac:
        frac = frac[:19]  # dmlc reads at most 19 fraction digits into a uint64
        value = rnd(value + rnd(float(int(frac)) / float(10 ** len(frac))))
    if exponent:
        e = int(exponent)
        n, scale = abs(e), 1.0
        while n >= 8:
            scale, n = rnd(scale * 1e8), n - 8
        while n > 0:
            scale, n = rnd(scale * 10.0), n - 1
        value = rnd(value / scale) if e < 0 else rnd(value * scale)
    return math.copysign(value, x)


@functools.lru_cache(maxsize=4096)
def mx_float(x: float) -> float:
    """The fp32 value of a fused kernel's ``float`` parameter: ``str(x)`` read by ``dmlc::stof``."""
    return _dmlc_parse(x, _round_f32)


@functools.lru_cache(maxsize=4096)
def mx_double(x: float) -> float:
    """The value of a ``double`` parameter or an NDArray op's scalar: ``str(x)`` read by ``dmlc::stod``
    (e.g. 0.9962535345811363 comes back as 0.9962535345811364)."""
    return _dmlc_parse(x, float)


@functools.lru_cache(maxsize=4096)
def mx_list_float(x: float) -> float:
    """``str(x)`` correctly rounded to fp32: the elements of a ``Tuple<float>`` field (``lrs`` and
    ``wds`` of the ``multi_*`` kernels), which the C++ stream reads.

    The decimal string is rounded, not the double ``x``: they differ when ``x`` is exactly halfway
    between two fp32 values while its shortest decimal form lies off the midpoint.
    """
    x = float(x)
    f = _round_f32(x)
    other = 2.0 * x - f  # the other fp32 neighbour, when x is a midpoint
    if f != x and math.isfinite(other) and _round_f32(other) == other:
        side = Fraction(repr(x)) - Fraction(x)
        if side != 0 and (side > 0) == (other > f):
            return other
    return f


@functools.lru_cache(maxsize=4096)
@torch.compiler.assume_constant_result  # a Python constant inside compiled kernels (clip bounds)
def in_dtype(x: float, dtype: torch.dtype) -> float:
    """``x`` as a kernel's ``DType(x)`` holds it (torch keeps float16/bfloat16 scalars in fp32)."""
    if dtype == torch.float64:
        return float(x)
    if dtype == torch.float32:  # the C cast (round to nearest even), as torch's; ~20x faster than a tensor
        return _round_f32(float(x))
    return torch.tensor(x, dtype=torch.float64).to(dtype).item()


@torch.compiler.assume_constant_result  # Python constants inside compiled kernels (clip bounds)
def mx_param(x: float, dtype: torch.dtype) -> float:
    """A fused kernel's ``float`` parameter as the kernel uses it on a ``dtype`` tensor."""
    return in_dtype(mx_float(x), dtype)


@torch.compiler.assume_constant_result
def mx_list_param(x: float, dtype: torch.dtype) -> float:
    """An element of a fused kernel's float-list parameter as the kernel uses it on a ``dtype`` tensor."""
    return in_dtype(mx_list_float(x), dtype)


@torch.compiler.assume_constant_result
def mx_scalar(x: float, dtype: torch.dtype) -> float:
    """The scalar of an NDArray op (``w * s``, ``w / s``, ``w + s``) on a ``dtype`` tensor, or a
    ``double`` kernel parameter cast to the kernel's dtype."""
    return in_dtype(mx_double(x), dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule with bias corrections or schedules computes in on ``dtype`` weights, and holds its
    scalars in: the weight dtype, fp32 for float16/bfloat16 (item 5 above)."""
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=4096)
def one_minus_pow(beta: float, t: int, dtype: torch.dtype) -> float:
    """A bias correction ``1 - beta^t`` (``beta`` a parsed parameter) as the rule on ``dtype`` weights uses it.

    fp32/fp64: MXNet's, ``beta^t`` (``std::pow`` in double) rounded to the weight dtype, then ``1 -`` in that
    dtype. fp16/bf16: in double, rounded once to fp32; rounding ``beta^t`` first would leave it 1 (item 5).
    """
    if compute_dtype(dtype) != dtype:
        return _round_f32(1.0 - beta ** t)
    return in_dtype(1.0 - in_dtype(beta ** t, dtype), dtype)


# ------------------------------------------------------------------------------------------ reductions
def sum_sq(x: torch.Tensor) -> float:
    """``sum(x*x)`` as MXNet's CPU ``multi_sum_sq`` computes it (the norms of LARS and LAMB): squares in
    ``x``'s dtype, added one by one into an fp32 accumulator; returns that fp32 value.

    A sequential sum cannot be vectorised and torch has none (its ``cumsum`` accumulates fp32 in
    fp64), but numpy's ``add.accumulate`` is sequential in the array's dtype: fp32, fp16 and bf16 CPU
    tensors get MXNet's value exactly. fp64 squares (which MXNet adds in fp64, rounding to fp32 after
    every addition: only a Python loop could follow) and tensors on other devices (no host copy in
    the update) get the fp64 sum rounded to fp32: more accurate, and within the sequential sum's own
    error of MXNet's value ((n-1) * 2^-24 relative at worst, about sqrt(n) fp32 ulps typically).
    """
    sq = (x * x).detach().reshape(-1)
    if sq.numel() == 0:
        return 0.0
    if sq.device.type == "cpu" and sq.dtype != torch.float64:
        return float(np.add.accumulate(sq.to(torch.float32).numpy())[-1])
    return _round_f32(float(sq.sum(dtype=torch.float64)))


def sum_sq_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`sum_sq` of every row of a 2-D tensor, as an fp32 ``[rows, 1]`` column: the same values, row by
    row (fp32/fp16/bf16 on the CPU: one ``add.accumulate`` along the rows, each row summed in order)."""
    if x.device.type == "cpu" and x.dtype != torch.float64 and x.shape[1] > 0:
        sq = (x * x).detach().to(torch.float32).numpy()
        return torch.from_numpy(np.ascontiguousarray(np.add.accumulate(sq, axis=1)[:, -1:]))
    if x.device.type != "cpu":  # no host sync per row: fp64 row sums rounded to fp32 (within sum_sq's own error)
        return (x.double() * x.double()).sum(1, keepdim=True).to(torch.float32)
    return torch.tensor([[sum_sq(row)] for row in x], dtype=torch.float32).reshape(-1, 1)


def np_sum(x: torch.Tensor) -> float:
    """``x.asnumpy().sum()`` as numpy 1.23 (MXNet 1.9.1's) computes it, in ``x``'s dtype (LBSGD's
    ``'lars'`` norms): numpy's pairwise sum of each 8192-element buffer, the buffers added in order.
    (numpy >= 2 sums the whole array pairwise: the same value up to 8192 elements, not beyond.)
    """
    a = x.detach().reshape(-1)
    a = (a.float() if a.dtype == torch.bfloat16 else a).cpu().numpy()
    total = a[:8192].sum()
    for start in range(8192, a.size, 8192):
        total = total + a[start:start + 8192].sum()
    return float(total)


def kahan_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (kept), as MXNet's CPU ``sum``/``mean`` reduce: element after
    element in ``x``'s dtype, with Kahan compensation (mshadow's ``red::sum``). A loop over the last
    dimension, vectorised over the others (GroupAdaGrad's row mean: one step per column).

    fp32/fp64/fp16 CPU tensors loop in numpy, in place (its per-step overhead is a fraction of torch's),
    without mshadow's test for an infinite partial sum; the rows whose sum is not finite (the only ones
    where that test can have fired) are summed again with it.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64, torch.float16) or x.numel() == 0:
        return _kahan_sum_torch(x)
    flat = x.detach().reshape(-1, x.shape[-1])
    cols = flat.t().contiguous().numpy()  # torch's transposing copy is the faster one
    total, residual = np.zeros_like(cols[0]), np.zeros_like(cols[0])
    y, t = np.empty_like(total), np.empty_like(total)
    with np.errstate(all="ignore"):  # overflow and nan propagate, as in torch
        for col in cols:
            np.subtract(col, residual, out=y)
            np.add(total, y, out=t)
            np.subtract(t, total, out=residual)
            np.subtract(residual, y, out=residual)
            total, t = t, total
    out = torch.from_numpy(total)
    bad = ~torch.isfinite(out)
    if bad.any():
        out[bad] = _kahan_sum_torch(flat[bad]).squeeze(-1)
    return out.reshape(x.shape[:-1] + (1,))


def _kahan_sum_torch(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:  # an empty sum
        return torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
    cols = x.movedim(-1, 0).contiguous()
    total, residual = torch.zeros_like(cols[0]), torch.zeros_like(cols[0])
    for col in cols:
        y = col - residual
        t = total + y
        residual = torch.where(torch.isinf(t), 0.0, (t - total) - y)
        total = t
    return total.unsqueeze(-1)


# ------------------------------------------------------------------------------------------ kernel reductions
class Rows:
    """The ``seg`` of a kernel call over one run of a pack: ``[k, n]`` views whose k rows are parameters of
    n elements each (or, for per-row states, the rows of 2-D parameters of n columns), per-parameter scalars
    as ``[k, 1]`` columns; per-tensor (per-row) sums are row sums."""

    def __repr__(self):
        return "ROWS"


ROWS = Rows()


class Whole:
    """The ``seg`` of a compiled kernel call over one whole parameter viewed 1-D: per-tensor sums are full
    reductions (which the compiler splits across threads)."""

    def __repr__(self):
        return "WHOLE"


WHOLE = Whole()


class Shards:
    """The ``seg`` of a kernel call on the local shard of a sharded parameter (FSDP2's DTensor): per-tensor
    sums are the whole parameter's, the local sums added over ``groups`` (the process groups of the mesh
    dimensions the parameter is sharded over)."""

    def __init__(self, groups):
        self.groups = list(groups)

    def __repr__(self):
        return f"Shards({len(self.groups)} groups)"


def sum_sq_of(x, seg=None):
    """:math:`\\sum x^2` per tensor as an fp32 value, for the norms of LARS and LAMB.

    Per tensor (``seg`` None): a 0-d tensor holding MXNet's own sequential fp32 sum
    (:func:`sum_sq`). On a shard (``seg`` a :class:`Shards`): the whole parameter's sum, accumulated in
    fp64 across the shards. Over the rows of a run (``seg`` :data:`ROWS`): a
    ``[k, 1]`` column of the rows' sums: MXNet's sequential fp32 sums again when eager on the CPU
    (numpy's ``add.accumulate`` along the rows); compiled (or on other devices), accumulated in fp64 and
    rounded to fp32 (MXNet's order cannot be vectorised; this is within the sequential sum's rounding
    error of it).
    """
    if seg is None and x.device.type == "cpu":
        return torch.tensor(sum_sq(x), dtype=torch.float32, device=x.device)
    if seg is None or seg is WHOLE:  # (on an accelerator: on the device, no host round trip)  # one parameter, compiled: the fp64 sum rounded to fp32, as over ROWS
        return (x.to(torch.float64) * x.to(torch.float64)).sum().to(torch.float32)
    if isinstance(seg, Shards):  # a shard: the fp64 sum of every shard's fp64 sum, rounded once (no host copy)
        import torch.distributed as dist
        total = (x.to(torch.float64) * x.to(torch.float64)).sum()
        for group in seg.groups:
            dist.all_reduce(total, group=group)
        return total.to(torch.float32)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # eager: MXNet's sums, row by row
        return sum_sq_rows(x)
    return (x.to(torch.float64) * x.to(torch.float64)).sum(1, keepdim=True).to(torch.float32)


def norm_of(x, seg=None):
    """:math:`\\|x\\|_2` per tensor (or per row, as :func:`sum_sq_of`) as an fp32 value, for the trust ratios of
    LARS and LAMB: the correctly rounded root of :func:`sum_sq_of`'s fp32 sum (MXNet's value) wherever that
    sum is a normal fp32 number. Where it underflowed (below 2^-126: a tensor of ~1e-24 values) or overflowed
    (inf, of finite values), the root of the sum of fp64 squares, rounded to fp32: the norm itself is
    representable, and a lost one would turn the trust ratio into 1 or 0 (MXNet's scaled ``norm`` keeps it)."""
    eager = x.device.type == "cpu" and not torch.compiler.is_compiling() and (seg is None or seg is ROWS)
    if eager:  # MXNet's sequential sums; the wide ones only when needed (a Python branch)
        s32 = sum_sq_of(x, seg)
        if not bool(_lost(s32).any()) or not bool(x.ne(0).any()):
            return sqrt_rn(s32)
    x64 = x.to(torch.float64)
    s64 = (x64 * x64).sum(1, keepdim=True) if seg is ROWS else (x64 * x64).sum()
    if not eager:  # compiled, on a device, or a shard: sum_sq_of's fp64 sums, computed once for both roots
        if isinstance(seg, Shards):
            import torch.distributed as dist
            for group in seg.groups:
                dist.all_reduce(s64, group=group)
        s32 = s64.to(torch.float32)
    return torch.where(_lost(s32), s64.sqrt().to(torch.float32), sqrt_rn(s32))


def _lost(s32):
    """Where an fp32 sum of squares lost the norm: underflowed below the normal range, or overflowed."""
    # 2^-126, the smallest normal fp32 number: a sum of squares below it has lost digits (or all of them). A
    # literal: dynamo makes a module's float global read by a compiled kernel a tensor input of its graph (which
    # then takes no direct calls, _direct)
    return (s32 < 1.1754943508222875e-38) | (s32 == math.inf)


# ------------------------------------------------------------------------------------------ counter-based noise
class Key(int):
    """A stochastic kernel's per-parameter key (SGLD): its noise is :func:`counter_normal` of
    ``key + i`` for element ``i``. An int that the executor hands over as an int64 tensor (never a float)."""


_SPLITMIX = (0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))


def _srl(x, s):
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def counter_normal(ctr, dtype):
    """Standard normal values from int64 counters, two per mixed counter: counters ``c`` and ``c ^ 16`` (bit 4
    flipped: the two halves of a block of :data:`BLOCK` counters) share one Box-Muller draw of
    :func:`counter_polar` of ``c & ~16``, and get its radius times ``cos`` of its angle (bit 4 clear) or of the
    angle plus 3/4 of a turn (bit 4 set: its ``sin``), two independent normals. A kernel over a block's halves side
    by side (:func:`paired_normals`) mixes each counter once for both; element by element, the same bits."""
    radius, angle = counter_polar(ctr & ~HALF)
    return _normal(radius, angle, ((ctr >> _SIDE) & 1) * _QUARTER3, dtype)


def paired_normals(ctr, dtype):
    """:func:`counter_normal` of ``ctr`` and of ``ctr + 16`` (``ctr``'s bit 4 clear), from one mix of each counter."""
    radius, angle = counter_polar(ctr)
    return _normal(radius, angle, 0, dtype), _normal(radius, angle, _QUARTER3, dtype)


def _normal(radius, angle, side, dtype):
    """A Box-Muller draw's normal: ``radius`` times ``cos`` of its 24-bit ``angle`` turned by ``side``."""
    return (radius * _cos_2pi(((angle + side) & _ANGLE).to(torch.float32) * 2.0 ** -24)).to(dtype)


#: The counter bit that tells a block's two halves apart; counters per block (a Box-Muller draw serves counters
#: ``c`` and ``c ^ HALF``), and per half
_SIDE = 4
BLOCK, HALF = 2 << _SIDE, 1 << _SIDE
#: 24-bit angles (turns / 2^24): all of them, and three quarters of a turn
_ANGLE, _QUARTER3 = 0xFFFFFF, 0xC00000


def counter_polar(ctr):
    """One Box-Muller draw per int64 counter: splitmix64 (a bijective 64-bit mix, wrapping arithmetic) gives
    24-bit uniforms ``u1 = k / 2^24`` in (0, 1] and an angle ``a`` in [0, 2^24) (turns / 2^24); the radius
    ``sqrt(-2 ln u1)`` (fp32) and ``a`` (int64). Only integer ops, fp32 ``+ - * /``, bit casts and a correctly
    rounded root (``ln`` and ``cos`` are short polynomials here, accurate to ~1e-7): eager and compiled
    kernels give the same bits, and the compiled loop makes the noise itself, with no tensor drawn beforehand."""
    golden, m1, m2 = _SPLITMIX
    z = ctr + golden
    z = (z ^ _srl(z, 30)) * m1
    z = (z ^ _srl(z, 27)) * m2
    z = z ^ _srl(z, 31)
    k = (_srl(z, 40) + 1).to(torch.float32)            # u1 = k / 2^24, k in [1, 2^24] (exact in fp32)
    return sqrt_rn(-2.0 * _ln_unit(k)), z & _ANGLE


def _ln_unit(k):
    """``ln(k / 2^24)`` for fp32 integers ``k`` in [1, 2^24]: ``k = m 2^e`` by bit casts (m in [0.5, 1)),
    ``ln m = 2 atanh(s)`` with ``s = (m - 1)/(m + 1)`` in (-1/3, 0] by its series to ``s^13``."""
    bits = k.view(torch.int32)
    e = ((bits >> 23) - 126).to(torch.float32)
    m = ((bits & 0x7FFFFF) | (126 << 23)).view(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = 2.0 + s2 * (2.0 / 3 + s2 * (2.0 / 5 + s2 * (2.0 / 7 + s2 * (2.0 / 9 + s2 * (2.0 / 11 + s2 * (2.0 / 13))))))
    return s * series + (e - 24.0) * 0.6931471805599453


def _cos_2pi(u):
    """``cos(2 pi u)`` for ``u`` in [0, 1): folded onto an angle in [0, pi/2] (exact steps), then its Taylor
    series to ``a^12``."""
    t = torch.where(u >= 0.5, 1.0 - u, u)                  # cos is even and 1-periodic: t in [0, 0.5]
    far = t > 0.25
    a = torch.where(far, 0.5 - t, t) * 6.283185307179586  # cos(2 pi t) = -cos(2 pi (0.5 - t))
    a2 = a * a
    c = 1.0 + a2 * (-1.0 / 2 + a2 * (1.0 / 24 + a2 * (-1.0 / 720 + a2 * (1.0 / 40320 + a2 * (
        -1.0 / 3628800 + a2 * (1.0 / 479001600))))))
    return torch.where(far, -c, c)
