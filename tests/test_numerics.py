"""The MXNet numerics helpers (``optzoo.optimizer._numerics``) against exact arithmetic and MXNet's own values.

The MXNet values are constants read back from MXNet 1.9.1 (``.mxref``, CPU) once, by the probes named
next to each table; this file needs neither MXNet nor its venv.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from optzoo.optimizer._numerics import (in_dtype, kahan_sum, mx_double, mx_float, mx_list_float, mx_list_param,
                                        mx_param, mx_scalar, np_sum, sqrt_rn, sum_sq)

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


# ------------------------------------------------------------------------------------------ sqrt_rn
def _positive_finite(dtype, n, seed):
    """``n`` random positive finite values of ``dtype``, uniform over bit patterns (every binade and
    the subnormals alike), plus the edges: smallest/largest subnormal, smallest normal, 1, max."""
    info, ibits = torch.finfo(dtype), _BITS[dtype]
    top = torch.tensor(info.max, dtype=dtype).view(ibits).item()
    bits = torch.randint(1, top + 1, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    x = bits.to(ibits).view(dtype)
    edges = torch.tensor([info.smallest_normal, 1.0, 2.0, 4.0, info.max], dtype=dtype)
    tiny = torch.tensor([1, 2, 3], dtype=ibits).view(dtype)  # the smallest subnormals
    largest_sub = (torch.tensor(info.smallest_normal, dtype=dtype).view(ibits) - 1).view(dtype).reshape(1)
    return torch.cat([x, edges, tiny, largest_sub])


def _near_midpoints(dtype, n, seed):
    """Squares of the midpoints between neighbouring values of ``dtype``, rounded to ``dtype``: their
    roots lie as close to a rounding midpoint as roots can, the hardest inputs to round."""
    roots = _positive_finite(dtype, n, seed).sqrt()  # every binade of roots
    below, _ = _neighbours(roots)
    mids = [(Fraction(a) + Fraction(b)) / 2 for a, b in zip(below.tolist(), roots.tolist())]
    return torch.tensor([float(m * m) for m in mids], dtype=torch.float64).to(dtype)


def _neighbours(r):
    ibits = _BITS[r.dtype]
    return (r.view(ibits) - 1).view(r.dtype), (r.view(ibits) + 1).view(r.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sqrt_rn_is_correctly_rounded(dtype):
    """Exact check with rationals: r is the correctly rounded root of x iff x lies between the squares
    of the midpoints from r to its two neighbours (r's own binade and the one below may differ)."""
    x = torch.cat([_positive_finite(dtype, 300, seed=3), _near_midpoints(dtype, 100, seed=4)])
    x = x[torch.isfinite(x) & (x > 0)]
    r = sqrt_rn(x)
    assert r.dtype == dtype
    below, above = _neighbours(r)
    for xi, ri, lo, hi in zip(x.tolist(), r.tolist(), below.tolist(), above.tolist()):
        mid_lo, mid_hi = (Fraction(ri) + Fraction(lo)) / 2, (Fraction(ri) + Fraction(hi)) / 2
        assert mid_lo * mid_lo <= Fraction(xi) <= mid_hi * mid_hi, \
            f"{dtype}: sqrt_rn({xi!r}) = {ri!r} is not correctly rounded"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sqrt_rn_special_values(dtype):
    x = torch.tensor([0.0, -0.0, math.inf, -1.0, -math.inf, math.nan], dtype=dtype)
    r = sqrt_rn(x)
    assert r.dtype == dtype
    assert r[:3].tolist() == [0.0, 0.0, math.inf]
    assert math.copysign(1.0, r[1].item()) == -1.0, "sqrt(-0) is -0"
    assert r[3:].isnan().all()


# ------------------------------------------------------------------------------------------ parsing
# (Python value, what MXNet 1.9.1 computed with it), read back from MXNet 1.9.1 on the CPU:
# NDArray-op scalars / double fields: ``(mx.nd.ones((1,), dtype="float64") * x).asnumpy()``;
MX_DOUBLES = [(0.9962535345811363, 0.9962535345811364), (0.38120423768821243, 0.3812042376882124),
              (1.2345678901234568e-05, 1.234567890123457e-05), (0.1, 0.1), (3.7e-07, 3.7e-07),
              (1e-08, 1e-08), (123456.789, 123456.789), (1.7976931348623157e308, 1.7976931348623153e308)]
# float fields: ``mx.nd.sgd_update(zeros fp64, g=-1, lr=x, wd=0)`` (an fp32 field, cast to double);
MX_FLOATS = [(9.87654321e-05, 9.87654275377281e-05), (2.3238647657783154e-05, 2.3238646463141777e-05),
             (6.986158703315074e-05, 6.986159132793546e-05), (6.809708368723173e-09, 6.809708796851055e-09),
             (8.43840946224492e-06, 8.438410077360459e-06), (1.2345678, 1.2345677614212036),
             (0.001, 0.0010000000474974513), (0.3, 0.30000001192092896), (1e-08, 9.99999993922529e-09),
             (0.999, 0.9990000128746033), (65504.0, 65504.0), (3e38, 3.0000002083218518e38)]
# float-list fields: ``mx.nd.multi_sgd_update(zeros fp64, g=-1, lrs=(x,), wds=(0,))``. The x are fp32
# rounding midpoints whose shortest repr lies off the midpoint: float32(x) rounds them to even, MXNet
# rounds the decimal string (the second and fifth differ from float32(x));
MX_LIST_FLOATS = [(1.1000000834465027, 1.1000001430511475), (0.30000002682209015, 0.30000004172325134),
                  (0.007000000448897481, 0.007000000681728125), (123.45600509643555, 123.45600891113281),
                  (2.500000027794158e-05, 2.499999936844688e-05), (0.001, 0.0010000000474974513)]
# float16 NDArray scalars: ``(mx.nd.ones((1,), dtype="float16") * x).asnumpy()``.
MX_HALF_SCALARS = [(1e-08, 0.0), (0.1, 0.0999755859375), (0.999, 0.9990234375), (1e-05, 1.0013580322265625e-05),
                   (70000.0, math.inf)]


@pytest.mark.parametrize("x, mxnet", MX_DOUBLES)
def test_mx_double_and_scalar_match_mxnet(x, mxnet):
    assert mx_double(x) == mxnet
    assert mx_double(-x) == -mxnet
    assert mx_scalar(x, torch.float64) == mxnet


@pytest.mark.parametrize("x, mxnet", MX_FLOATS)
def test_mx_float_matches_mxnet(x, mxnet):
    assert mx_float(x) == mxnet
    assert mx_param(x, torch.float64) == mxnet and mx_param(x, torch.float32) == mxnet


@pytest.mark.parametrize("x, mxnet", MX_LIST_FLOATS)
def test_mx_list_float_matches_mxnet(x, mxnet):
    assert mx_list_float(x) == mxnet
    assert mx_list_param(x, torch.float64) == mxnet


@pytest.mark.parametrize("x, mxnet", MX_HALF_SCALARS)
def test_mx_scalar_rounds_to_half_precision(x, mxnet):
    assert mx_scalar(x, torch.float16) == mxnet


def test_parsers_differ_where_mxnet_does():
    """The three parsers are distinct: a test of one cannot pass with another's values."""
    assert mx_float(9.87654321e-05) != float(np.float32(9.87654321e-05))  # stof is not correctly rounded
    assert mx_double(0.9962535345811363) != 0.9962535345811363  # nor is stod
    assert mx_list_float(0.30000002682209015) != float(np.float32(0.30000002682209015))


def test_in_dtype():
    assert in_dtype(0.1, torch.float64) == 0.1
    assert in_dtype(0.1, torch.float32) == float(np.float32(0.1))
    assert in_dtype(0.1, torch.bfloat16) == torch.tensor(0.1, dtype=torch.bfloat16).item() != float(np.float32(0.1))
    assert in_dtype(1e-8, torch.float16) == 0.0
    assert mx_param(1e-8, torch.float16) == 0.0  # MXNet's fp16 kernels see an epsilon of 0


# ------------------------------------------------------------------------------------------ reductions
def _sequential_fp32_sum_sq(a):
    """The C++ loop ``float s = 0; for (x : a) s += x * x`` (the square in a's dtype), element by element."""
    s = np.float32(0.0)
    for x in a.tolist():
        s = np.float32(float(s) + float((np.asarray(x, dtype=a.dtype) * np.asarray(x, dtype=a.dtype))))
    return float(s)


# ``mx.nd.multi_sum_sq(mx.nd.array(a, dtype), num_arrays=1)`` for a = (1..12)/7 * (1 + 1e-3 * k).
MX_SUM_SQ = {"float32": 13.488105773925781, "float64": 13.488105773925781, "float16": 13.485794067382812}


@pytest.mark.parametrize("dtype", sorted(MX_SUM_SQ))
def test_sum_sq_matches_mxnet(dtype):
    a = (np.arange(1, 13, dtype=np.float64) / 7.0 * (1 + 1e-3 * np.arange(12))).astype(dtype)
    assert sum_sq(torch.from_numpy(a)) == MX_SUM_SQ[dtype]


def test_sum_sq_is_mxnets_sequential_fp32_sum():
    a = np.random.RandomState(7).standard_normal(3000).astype(np.float32)
    assert sum_sq(torch.from_numpy(a)) == 2965.41943359375  # multi_sum_sq, read back from MXNet
    assert float(np.float32((a.astype(np.float64) ** 2).sum())) != 2965.41943359375  # not the fp64 sum
    for n, seed in ((1, 1), (7, 2), (100, 3), (1000, 4)):
        for dtype in (np.float32, np.float16):
            b = np.random.RandomState(seed).standard_normal(n).astype(dtype)
            assert sum_sq(torch.from_numpy(b)) == _sequential_fp32_sum_sq(b)
    assert sum_sq(torch.zeros(0)) == 0.0


def test_sum_sq_fp64_is_within_the_sequential_sums_error():
    """fp64 squares are summed in fp64 (MXNet rounds its fp32 sum after each addition): not MXNet's
    value, but within the error bound of MXNet's sequential fp32 sum, (n - 1) * 2**-24 * sum."""
    a = np.random.RandomState(5).standard_normal(2000)
    mxnet_like, ours = _sequential_fp32_sum_sq(a), sum_sq(torch.from_numpy(a))
    assert ours != mxnet_like
    assert abs(ours - mxnet_like) <= (a.size - 1) * 2.0 ** -24 * mxnet_like


def test_np_sum_matches_numpy_1_23():
    """``multiply(v, v).asnumpy().sum()`` under MXNet's numpy 1.23 (LBSGD's 'lars'), read back from MXNet.

    Beyond 8192 elements numpy >= 2 sums differently (8840.173828125 here), numpy 1.23 by buffers.
    """
    a = torch.from_numpy(np.random.RandomState(7).standard_normal(9000).astype(np.float32))
    assert np_sum(a * a) == 8840.1748046875
    rs = np.random.RandomState(11)
    rs.standard_normal(20000)
    b = torch.from_numpy(rs.standard_normal(30000))
    assert np_sum(b * b) == 30055.245430180876


def test_kahan_sum_matches_mxnet_mean():
    """``mx.nd.mean(x, axis=1, keepdims=True)``: a Kahan sum in fp32, then / C (GroupAdaGrad's row mean)."""
    x = torch.from_numpy((np.arange(24, dtype=np.float64).reshape(3, 8) / 3.0 + 1e-7).astype(np.float32) ** 2)
    assert (kahan_sum(x) / 8).ravel().tolist() == [1.9444446563720703, 15.277778625488281, 42.833335876464844]
    rs = np.random.RandomState(7)
    rs.standard_normal(3000)
    y = torch.from_numpy(rs.standard_normal((5, 1000)).astype(np.float32) ** 2)
    expected = [0.9570388197898865, 1.0291489362716675, 0.9881971478462219, 0.9305350184440613, 1.0167964696884155]
    assert (kahan_sum(y) / 1000).ravel().tolist() == expected
    assert y.mean(dim=1).tolist() != expected  # torch's own mean is an ulp off in one row
