"""LARS's and LAMB's norms keep their range: tensors whose fp32 sum of squares underflows (~1e-24 values) or
overflows (~1e20) still get their trust ratio, against a float64 closed form of one step from zero states."""
import math

import pytest
import torch

from optzoo import optimizer

PATHS = [("reference", False, 8), ("packed", None, 8), ("packed-compiled", True, 8), ("large", None, 1 << 16)]


def _step(name, fused, w, g, **kwargs):
    opt = optimizer.create(name, learning_rate=0.1, **kwargs)
    opt._fused = fused
    ws = [w.clone() for _ in range(4)]  # four parameters: a pack on the fast path
    states = [opt.create_state(i, x) for i, x in enumerate(ws)]
    opt.update(list(range(4)), ws, [g.clone() for _ in range(4)], states)
    return ws[0]


def _lamb64(w, g, lr=0.1, b1=0.9, b2=0.999, eps=1e-6):
    w, g = w.double(), g.double()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    u = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    r1, r2 = w.norm(), u.norm()
    ratio = r1 / r2 if r1 > 0 and r2 > 0 else 1.0
    return w - lr * ratio * u


def _lars64(w, g, lr=0.1, eta=0.001, eps=0.0):
    w, g = w.double(), g.double()
    nw, ng = w.norm(), g.norm()
    lr = lr * eta * nw / (ng + eps) if nw > 0 and ng > 0 else lr
    return w - lr * g


@pytest.mark.parametrize("path,fused,n", PATHS)
@pytest.mark.parametrize("scale_w,scale_g", [(1.0, 1e-30), (1e20, 1.0), (1.0, 1e20)])
def test_lamb_trust_ratio_out_of_fp32_square_range(path, fused, n, scale_w, scale_g):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=gen) * scale_w
    g = torch.randn(n, generator=gen) * scale_g
    got, want = _step("lamb", fused, w, g).double(), _lamb64(w, g)
    assert torch.isfinite(got).all()
    moved, expected = (got - w.double()).norm(), (want - w.double()).norm()
    assert expected > 0 and math.isclose(moved, expected, rel_tol=1e-3), (path, float(moved), float(expected))


@pytest.mark.parametrize("path,fused,n", PATHS)
@pytest.mark.parametrize("scale_w,scale_g", [(1e-25, 1.0), (1.0, 1e-25), (1e20, 1.0)])
def test_lars_rate_out_of_fp32_square_range(path, fused, n, scale_w, scale_g):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, generator=gen) * scale_w
    g = torch.randn(n, generator=gen) * scale_g
    got, want = _step("lars", fused, w, g).double(), _lars64(w, g)
    moved, expected = (got - w.double()).norm(), (want - w.double()).norm()
    assert expected > 0 and math.isclose(moved, expected, rel_tol=1e-3), (path, float(moved), float(expected))
