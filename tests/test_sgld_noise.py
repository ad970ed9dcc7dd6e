"""SGLD's counter-based noise (``_numerics.counter_normal``): standard normal values, two per mixed counter.

Checked against an independent float64 Box-Muller of the same splitmix64 bits (numpy's unsigned arithmetic, its
``log``, ``cos`` and ``sin``), against the standard normal's closed-form CDF (a Kolmogorov-Smirnov distance),
and for the independence of a pair's two values; then, through the executor, the weight taken in pairs
(``engine.PAIRS``) against the reference path bit for bit."""
import math

import numpy as np
import pytest
import torch

import optzoo.torch as ot
from optzoo import optimizer
from optzoo.optimizer import _direct, _large, engine
from optzoo.optimizer._numerics import counter_normal, in_dtype, paired_normals

#: counters from a key that is a multiple of 32 (as SGLD draws them), 2^20 of them
KEY = 0x2F3A5C7E91B3D5 * 32
N = 1 << 20


def _splitmix64(c):
    """splitmix64 of uint64 counters, wrapping (numpy's unsigned arithmetic: independent of the torch code)."""
    z = c + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _float64_normals(counters):
    """The tutorial's Box-Muller in float64: counters ``c`` and ``c ^ 16`` share the draw of ``c & ~16``:
    ``sqrt(-2 ln u1) cos(2 pi u2)`` where bit 4 is clear, ``... sin(2 pi u2)`` where it is set."""
    c = counters.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(c & ~np.uint64(16))
    u1 = ((z >> np.uint64(40)).astype(np.float64) + 1) / 2.0 ** 24
    u2 = (z & np.uint64(0xFFFFFF)).astype(np.float64) / 2.0 ** 24
    r = np.sqrt(-2 * np.log(u1))
    return np.where((c >> np.uint64(4)) & np.uint64(1), r * np.sin(2 * np.pi * u2), r * np.cos(2 * np.pi * u2))


@pytest.fixture(scope="module")
def values():
    ctr = KEY + torch.arange(N)
    return ctr, counter_normal(ctr, torch.float32)


def test_counter_normal_is_box_muller_of_splitmix64_in_pairs(values):
    ctr, got = values
    want = _float64_normals(ctr.numpy())
    # polynomial ln and cos in fp32: within a few fp32 ulps of the float64 values
    err = np.abs(got.double().numpy() - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 2e-6, (err.max(), int(err.argmax()))


def test_counter_normal_is_standard_normal(values):
    _, got = values
    x = np.sort(got.double().numpy())
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    ks = max(np.max(np.arange(1, N + 1) / N - cdf), np.max(cdf - np.arange(N) / N))
    assert ks < 1.63 / math.sqrt(N) * 1.5  # (the 1% critical value is 1.63 / sqrt(n))
    assert abs(x.mean()) < 5 / math.sqrt(N) and abs(x.var() - 1) < 5 * math.sqrt(2 / N)


def test_a_pairs_two_values_are_independent(values):
    """``r cos`` and ``r sin`` of one draw: uncorrelated, and so are their squares (which a shared radius alone
    would correlate)."""
    _, got = values
    blocks = got.double().view(-1, 32)
    a, b = blocks[:, :16].reshape(-1), blocks[:, 16:].reshape(-1)
    bound = 5 / math.sqrt(a.numel())
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < bound
    assert abs(torch.corrcoef(torch.stack([a * a, b * b]))[0, 1]) < bound


def test_paired_normals_are_counter_normals(values):
    ctr, got = values
    blocks = ctr.view(-1, 32)
    a, b = paired_normals(blocks[:, :16], torch.float32)
    assert torch.equal(a, got.view(-1, 32)[:, :16]) and torch.equal(b, got.view(-1, 32)[:, 16:])


SHAPES = [(300, 257), (70000,), (65536,), (2049, 32), (65568 + 1,), (3, 64, 7, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [None, True])
def test_weights_in_pairs_get_the_reference_paths_bits(monkeypatch, fused, dtype):
    """Large weights run in pairs (a tail of 0, 1 or more elements; fp16 with an fp32 master copy, bf16 without),
    replayed from their third step: the reference path's weights bit for bit."""
    halves = []
    make = _large._halves
    monkeypatch.setattr(_large, "_halves", lambda t: halves.append(t.numel()) or make(t))
    replays = []
    run_replay = _direct.Replay.run
    monkeypatch.setattr(_direct.Replay, "run", lambda self, opt, args: replays.append(1) or run_replay(self, opt, args))

    def run(fused):
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
        opt = ot.SGLD(params, lr=0.01, weight_decay=0.1, fused=fused, multi_precision=dtype is torch.float16)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape).to(dtype)
            opt.step()
        return [p.detach().clone() for p in params]

    ref = run(False)
    assert not halves
    got = run(fused)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert sorted(set(halves)) == sorted({math.prod(s) for s in SHAPES if math.prod(s) >= engine.LARGE})
    if dtype is torch.float32:  # (the fp16 weights' copies are written at each step: no plan)
        assert replays


def test_a_key_off_the_blocks_runs_element_by_element(monkeypatch):
    """A key that is no multiple of 32 (a shard's, counting from an offset inside a block): no pairs, and each
    element gets ``counter_normal(key + offset + i)``."""
    monkeypatch.setattr(_large, "_halves", lambda t: pytest.fail("taken in pairs"))
    asked = []
    paired = _large._paired
    monkeypatch.setattr(_large, "_paired", lambda *a: asked.append(1) or paired(*a))
    w, g = torch.randn(70000), torch.randn(70000)
    opt = optimizer.SGLD(learning_rate=0.09, generator=torch.Generator().manual_seed(6))
    opt._counter_offsets = {0: 7}  # (as the torch face sets it for the local shard of a sharded parameter)
    want = w - in_dtype(0.09 / 2, torch.float32) * g
    opt.update([0], [w], [g], [None])
    key = int(torch.randint(0, 1 << 57, (), generator=torch.Generator().manual_seed(6))) * 32
    want = want + in_dtype(math.sqrt(0.09), torch.float32) * counter_normal(key + 7 + torch.arange(70000), torch.float32)
    assert asked and torch.equal(w, want)
