"""Packs of rules with per-tensor sums (LAMB's and LARS's norms, GroupAdaGrad's row sums) lay their parameters
out sorted by size (``_packs.pack_order``), so that equal sizes form one run (one kernel call) whatever order the
model lists them in; their states are made in that order and used in place. The numbers are those of the
reference path (no packs), bit for bit where the pack runs eagerly, and do not depend on the model's order."""
import math

import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import _packs, create, engine, get_updater

# sizes interleaved as a network's are (conv, norm scale, norm shift, conv, ...): 8 runs as listed, 3 sorted
NORM_SHAPES = [(6, 5), (6,), (6,), (4, 3), (6,), (6,), (6, 5), (4, 3)]
ROW_SHAPES = [(6, 5), (1, 6), (1, 6), (4, 3), (2, 6), (6, 5), (3, 3)]  # GroupAdaGrad: 2-D, runs of column counts
SETTINGS = {"lamb": {"lr": 0.1, "weight_decay": 0.01}, "lars": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
            "groupadagrad": {"lr": 0.1}}
CASES = [(name, fused) for name in SETTINGS for fused in (None, True)]


def _shapes(name):
    return ROW_SHAPES if name == "groupadagrad" else NORM_SHAPES


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(name, params, fused, steps=4, order=None):
    """``steps`` steps of ``params`` (gradients drawn per parameter position, whatever ``order`` the optimizer
    is given them in); the weights and states in the parameters' own order."""
    listed = params if order is None else [params[k] for k in order]
    opt = ot.create(name, listed, fused=fused, **SETTINGS[name])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()
                                                         if isinstance(t, torch.Tensor) and t.dim() > 0]


def _runs(shapes):
    return sum(1 for k in range(len(shapes)) if k == 0 or _key(shapes[k]) != _key(shapes[k - 1]))


def _key(shape):
    return math.prod(shape)


@pytest.mark.parametrize("name,fused", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_sorted_packs_equal_the_reference_path(name, fused):
    """Interleaved sizes, eager or compiled packs: the reference path's numbers (bit for bit eagerly; compiled
    row sums are fp64 sums rounded to fp32, held to 1e-5), and bit for bit those of the same parameters listed
    already sorted by size (a parameter's numbers never depend on its neighbours in the pack)."""
    shapes = _shapes(name)
    _, ref = _run(name, _params(shapes), False)
    _, got = _run(name, _params(shapes), fused)
    by_size = sorted(range(len(shapes)), key=lambda k: math.prod(shapes[k]) // (shapes[k][0] if name ==
                                                                                   "groupadagrad" else 1))
    _, presorted = _run(name, _params(shapes), fused, order=by_size)
    assert len(ref) == len(got) == len(presorted) > len(shapes)
    for a, b, c in zip(ref, got, presorted):
        if fused is None:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
        assert torch.equal(b, c)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_pack_runs_one_call_per_size_on_states_made_in_its_order(name, monkeypatch):
    """A compiled pack of interleaved sizes makes one kernel call per distinct size (not per stretch of the
    model's order), and its states, made in the pack's order, are used in place (none copied in or out)."""
    shapes = _shapes(name)
    params = _params(shapes)
    opt, _ = _run(name, params, True, steps=1)
    calls = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda *a, **k: calls.append(a[1]) or run(*a, **k))
    copies = []
    split = _packs._split_into
    monkeypatch.setattr(_packs, "_split_into", lambda *a: copies.append(a) or split(*a))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    cols = {math.prod(s) // (s[0] if name == "groupadagrad" else 1) for s in shapes}
    assert len(calls) == len(cols) < _runs(shapes)
    assert not copies  # the states lay in the pack's order: used in place
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert len({t._base.data_ptr() for t in state if t._base is not None}) >= 1


def test_mxnet_updater_sorted_packs_keep_per_index_scalars():
    """The MXNet-style Updater (states made together, ``lr_mult`` per index) on interleaved sizes: every
    index gets its own learning rate after the pack sorts them, bit for bit the reference path's numbers."""
    shapes = NORM_SHAPES
    results = []
    for fused in (False, None):
        opt = create("lamb", learning_rate=0.1, wd=0.01)
        opt._fused = fused  # False: the reference path (a rule per tensor, no packs)
        opt.set_lr_mult({k: 0.5 + 0.25 * k for k in range(len(shapes))})
        updater = get_updater(opt)
        weights = [p.detach().clone() for p in _params(shapes)]
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            grads = [torch.randn(w.shape, generator=gen) for w in weights]
            updater(list(range(len(shapes))), grads, weights)
        results.append(weights)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_order_is_kept_where_it_costs_less():
    """Elementwise rules, sizes already sorted, and weights lying end to end in one buffer (the flat layout,
    used in place rather than copied in another order) keep the given order."""
    adam, lamb = create("adam"), create("lamb")
    ws = [torch.zeros(s) for s in NORM_SHAPES]
    assert engine.pack_order(engine.layout_of(adam, ws[0]), ws) is None
    assert engine.pack_order(engine.layout_of(lamb, ws[0]), sorted(ws, key=torch.Tensor.numel)) is None
    assert engine.pack_order("norms", ws) == sorted(range(len(ws)), key=lambda k: ws[k].numel())
    flat = torch.zeros(sum(w.numel() for w in ws))
    views = list(torch.split(flat, [w.numel() for w in ws]))
    assert engine.pack_order("norms", views) is None
    assert engine.run_keys(adam, ws) is None and engine.run_keys(lamb, views) is None
    assert engine.run_keys(lamb, ws) == [w.numel() for w in ws]


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_sorted_fp16_packs_with_master_copies_equal_the_reference_path(name):
    """fp16 weights with fp32 master copies (``multi_precision``): the masters, states and rounded fp16 weights
    of a sorted pack go back to their own parameters, bit for bit as the reference path."""
    results = []
    for fused in (False, None):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).half()) for s in NORM_SHAPES]
        opt = ot.create(name, params, fused=fused, multi_precision=True, **SETTINGS[name])
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).half()
            opt.step()
        results.append([p.detach().clone() for p in params] +
                       [t.clone() for p in params for t in opt.state[p].values()
                        if isinstance(t, torch.Tensor) and t.dim() > 0])
    assert len(results[0]) > 2 * len(NORM_SHAPES)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
