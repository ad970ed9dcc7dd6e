"""Large tensors run ``engine.GROUP`` (4) per compiled call (a last, shorter group filled up with small stand-ins;
a lone large tensor by itself), and give the
reference path's numbers: shared and per-parameter scalars, per-tensor norms, noise keys, fp16 weights with
fp32 master copies; a group graph serves every pattern of member sizes (no recompiles)."""
import pytest
import torch
from torch._dynamo.utils import counters

import optzoo
import optzoo.torch as ot
from optzoo.optimizer import engine
from test_fast_path import assert_match, compiled_rtol
from specs import SPECS

#: 11 "large" tensors (engine.LARGE lowered to 12): two groups of 4, then three and a stand-in; equal and distinct sizes
SHAPES = [(4, 5)] * 3 + [(6, 7), (13,), (4, 5), (30,), (2, 9), (21,), (4, 5), (17,)]
NAMES = ["adam", "nadam", "lamb", "sgld"]


def spec_of(name):
    return next(s for s in SPECS if s.name == name)


def trained(name, fused, steps=3, dtype=torch.float32, multipliers=False, **kw):
    """The weights after ``steps`` Trainer steps on seeded gradients (SGLD with its own keyed noise, drawn
    from a seeded generator: the same keys on every path)."""
    gen = torch.Generator().manual_seed(0)
    params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for k, s in enumerate(SHAPES)}
    if name == "sgld":
        kw["generator"] = torch.Generator().manual_seed(1)
    trainer = optzoo.Trainer(params, name, {"wd": 0.01, **kw}, fused=fused)
    if multipliers:  # per-parameter lr: each member its own scalars
        trainer.set_lr_mult({"p1": 0.5, "p8": 2.0})
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        trainer.step(2)
    return [p.detach().clone() for p in params.values()]


@pytest.fixture
def grouped(monkeypatch):
    monkeypatch.setattr(engine, "LARGE", 12)


def group_graphs(name):
    """(group length, scalars shared by the members) of the group graphs compiled for optimizer ``name`` (in
    this process); a two-phase rule's (LAMB on the CPU) are its first phase's."""
    cls = type(optzoo.optimizer.create(name))
    return {key[-2:] if "group" in key else key[-3:-1] for key, fn in engine._COMPILED.items()
            if key[0] is cls and fn is not None and ("group" in key or key[-1:] == ("first",))}


@pytest.mark.parametrize("multipliers", [False, True], ids=["shared", "per-parameter"])
@pytest.mark.parametrize("name", NAMES)
def test_groups_of_large_tensors_match_the_reference_path(name, multipliers, grouped):
    ref = trained(name, False, multipliers=multipliers)
    got = trained(name, None, multipliers=multipliers)
    # 11 members: 4, 4, then three and a stand-in; with multipliers p1's group, and with noise keys every group,
    # has scalars of its own per member
    shared = not multipliers and "stochastic" not in spec_of(name).flags
    assert (engine.GROUP, shared) in group_graphs(name)
    assert_match(ref, got, compiled_rtol(spec_of(name)))


@pytest.mark.parametrize("name", ["adam"])
def test_groups_with_fp16_weights_and_master_copies(name, grouped):
    kw = {"multi_precision": True}
    ref = trained(name, False, dtype=torch.float16, **kw)
    got = trained(name, True, dtype=torch.float16, **kw)
    assert (engine.GROUP, True) in group_graphs(name)
    assert_match(ref, got, compiled_rtol(spec_of(name)))


@pytest.mark.parametrize("cls,keys", [(ot.Adamax, [("group", 4, True)]),
                                      (ot.LAMB, [("phases", 4, True, "first"), ("phases", 4, True, "second")])],
                         ids=["elementwise", "two_phases"])
def test_a_group_graph_serves_every_pattern_of_sizes(cls, keys, monkeypatch):
    """dynamo gives equal sizes one symbol (duck sizing): a graph first compiled on a group of equal sizes
    would guard on it and recompile for the next pattern. The executor compiles a group graph on stand-ins
    of distinct sizes first: then any pattern, equal sizes included, runs on that one graph (a two-phase rule's
    pair of graphs alike)."""
    monkeypatch.setattr(engine, "LARGE", 12)
    monkeypatch.setattr(engine, "_COMPILED", {})

    def step(shapes):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params, lr=0.01)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()

    step([(20,)] * 4)  # equal sizes first
    graphs = counters["stats"]["unique_graphs"]
    step([(20,), (30,), (40,), (50,)])
    step([(31,), (31,), (64,), (64,)])
    step([(5, 9)] * 4)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sorted(key[-len(keys[0]):] for key in engine._COMPILED if "group" in key or "phases" in key) == keys


def test_scalar_tensors_are_remade_only_where_a_value_changed():
    """Adam's bias-corrected lr changes at every step: its 0-d tensor is new, the other places keep theirs; two
    places of equal value (beta1 = 0.5, 1 - beta1 = 0.5) never share a tensor (dynamo would see aliased inputs),
    and the steps add no graph."""
    param = torch.nn.Parameter(torch.randn(70000))
    opt = ot.Adam([param], lr=0.01, betas=(0.5, 0.999))
    seen = []
    as_tensors = engine._as_tensors

    def spy(*args):
        got = as_tensors(*args)
        if not seen or seen[-1] is not got:  # (a step may ask twice)
            seen.append(got)
        return got

    param.grad = torch.randn(70000)
    opt.step()
    graphs = counters["stats"]["unique_graphs"]
    engine._as_tensors = spy
    try:
        for _ in range(3):
            opt.step()
    finally:
        engine._as_tensors = as_tensors
    assert counters["stats"]["unique_graphs"] == graphs
    first, second = seen[0], seen[1]
    values = [float(t) for t in first]
    assert values[0] == values[1] == 0.5 and first[0] is not first[1]
    changed = [k for k, (a, b) in enumerate(zip(first, second)) if float(a) != float(b)]
    assert changed  # the bias-corrected lr
    assert all((a is b) == (k not in changed) for k, (a, b) in enumerate(zip(first, second)))


def test_the_rest_of_the_large_tensors_runs_on_the_group_graph(monkeypatch):
    """Large tensors that are not a multiple of ``GROUP``: the last group, filled up with small stand-ins, runs on
    the group graph (no graph of its own for the rest: one compile and one trace fewer at the first step), with
    the reference path's numbers bit for bit; a lone large tensor runs alone, on a graph of its own."""
    monkeypatch.setattr(engine, "LARGE", 12)
    monkeypatch.setattr(engine, "_COMPILED", {})

    def run(shapes, fused):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = ot.Adamax(params, lr=0.01, fused=fused)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()
                                           if isinstance(t, torch.Tensor) and t.dim()]

    shapes = [(20,), (5, 9), (31,), (20,), (64,), (13,)]  # 4 + 2
    assert_match(run(shapes, False), run(shapes, None), 0)
    assert_match(run(shapes[:2], False), run(shapes[:2], None), 0)  # 2: one group call
    assert [key[-3:] for key in engine._COMPILED] == [("group", engine.GROUP, True)]
    run(shapes[:1], None)
    assert len(engine._COMPILED) == 2 and not any("group" in key for key in list(engine._COMPILED)[1:])


def test_members_with_scalars_of_their_own_fill_the_last_group_without_another_graph(monkeypatch):
    """Where each member has scalars of its own (SGLD's noise keys), the stand-ins filling the last group get
    keys of their own too: the one group graph, traced once, and the reference path's numbers bit for bit (the
    members' own keys, whatever the stand-ins draw)."""
    monkeypatch.setattr(engine, "LARGE", 12)
    monkeypatch.setattr(engine, "_COMPILED", {})
    # element by element (as on an accelerator): on the CPU, weights of a block or more run in pairs, one per call
    monkeypatch.setattr(engine, "PAIRS", 1 << 40)
    shapes = [(20,), (5, 9), (31,), (20,), (64,), (13,)]

    def run(fused):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = ot.SGLD(params, lr=0.01, fused=fused, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in params]

    ref = run(False)
    graphs = counters["stats"]["unique_graphs"]
    assert_match(ref, run(None), 0)
    assert [key[-3:] for key in engine._COMPILED] == [("group", engine.GROUP, False)]
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_two_phase_groups_with_scalars_of_their_own_fill_without_another_graph(monkeypatch):
    """A two-phase rule (LAMB on the CPU) whose members each have their own lr: the last group, one member
    filled up with stand-ins, runs on the pair of graphs of the full groups (not on a pair for scalars shared
    by all members), with the reference path's numbers."""
    monkeypatch.setattr(engine, "LARGE", 12)
    monkeypatch.setattr(engine, "_COMPILED", {})
    shapes = [(20,), (5, 9), (31,), (20,), (64,)]

    def run(fused):
        gen = torch.Generator().manual_seed(0)
        params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in enumerate(shapes)}
        trainer = optzoo.Trainer(params, "lamb", {"wd": 0.01}, fused=fused)
        trainer.set_lr_mult({f"p{k}": 0.5 + 0.25 * k for k in range(len(shapes))})
        for _ in range(2):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            trainer.step(2)
        return [p.detach() for p in params.values()]

    assert_match(run(False), run(None), compiled_rtol(spec_of("lamb")))
    assert {key[-4:] for key in engine._COMPILED} == {("phases", engine.GROUP, False, "first"),
                                                      ("phases", engine.GROUP, False, "second")}
