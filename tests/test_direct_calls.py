"""Steady-state compiled calls skip dynamo (``optimizer._direct``): a call like one that dynamo ran calls that
graph itself. The numbers stay the reference path's bit for bit; whatever dynamo's guards would catch (a kernel
attribute changed, autocast on, a size of another pattern, memory shared between inputs, a class from outside
optzoo) sends the call through dynamo again; and every kernel reads only the attributes it declares."""
import contextlib

import pytest
import torch

import optzoo.torch as ot
from optzoo import optimizer
from optzoo.optimizer import _direct, engine
from specs import SPECS
from test_engine_scratch import _grads, _params as _seeded

#: three 256 x 256 weights (65,536 elements each: large, one group with a stand-in) and five small biases (a pack)
SHAPES = [(256, 256)] * 3 + [(256,)] * 5


def _params(seed=0, shapes=SHAPES):
    return _seeded(shapes, seed)


class Calls:
    """Compiled calls counted: ``direct`` (a graph called by itself), ``through`` (through dynamo), and per
    step (:meth:`mark`) each one's increments."""

    def __init__(self):
        self.direct = self.through = 0
        self.steps = []
        self._at = (0, 0)

    def mark(self):
        self.steps.append((self.direct - self._at[0], self.through - self._at[1]))
        self._at = (self.direct, self.through)


@pytest.fixture
def calls(monkeypatch):
    counted = Calls()
    graph_call, through = _direct.Graph.call, _direct.through

    def direct(self, args):
        counted.direct += 1
        return graph_call(self, args)

    def dynamo(*args, **kwargs):
        counted.through += 1
        return through(*args, **kwargs)

    monkeypatch.setattr(_direct.Graph, "call", direct)
    monkeypatch.setattr(_direct, "through", dynamo)
    return counted


def _run_both(cls, kw, steps, calls, between=None, shapes=SHAPES, fused=True):
    """The same steps on the compiled path (``fused``) and on the reference path, ``calls`` marked after each;
    ``between(opt, step)`` changes both optimizers alike before a step."""
    fast, ref = _params(shapes=shapes), _params(shapes=shapes)
    a, b = cls(fast, fused=fused, **kw), cls(ref, fused=False, **kw)
    for k in range(steps):
        if between is not None:
            between(a, k)
            between(b, k)
        _grads(fast, k)
        _grads(ref, k)
        a.step()
        b.step()
        calls.mark()
    return fast, ref


def _equal(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


#: Per step after the first: the group of three large weights (with a stand-in) and the pack of five biases
STEADY = (2, 0)


@pytest.mark.parametrize("cls, kw", [(ot.Adam, {}), (ot.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
                                     (ot.RMSProp, {"centered": True})])
def test_steady_steps_call_the_graphs_directly_with_the_reference_numbers(cls, kw, calls):
    fast, ref = _run_both(cls, kw, 4, calls)
    assert _equal(fast, ref)
    assert calls.steps[1:] == [STEADY] * 3


@pytest.mark.parametrize("cls, kw, shapes, steady", [
    # the group's two phases, the pack's one run (the biases' norms as row sums)
    (ot.LAMB, {}, SHAPES, (3, 0)),
    (ot.LARS, {"momentum": 0.9}, SHAPES, (2, 0)),  # the group, the pack's run
    # per-row states: the large weights one by one, the small ones' run
    (ot.GroupAdaGrad, {}, [(256, 256)] * 3 + [(4, 8)] * 5, (4, 0)),
], ids=["LAMB", "LARS", "GroupAdaGrad"])
def test_steady_steps_with_norms_phases_and_rows_call_every_graph_directly(cls, kw, shapes, steady, calls,
                                                                           monkeypatch):
    """Per-tensor norms (whose graphs read no tensor but their inputs), LAMB's two phases (in place, their scales
    and directions in buffers of their own) and packs' runs take direct calls: the numbers of the same steps
    made through dynamo alone."""
    def run(mark):
        ps = _params(shapes=shapes)
        opt = cls(ps, fused=True, **kw)  # (the pack compiled too, however small)
        for k in range(4):
            _grads(ps, k)
            opt.step()
            mark()
        return ps
    fast = run(calls.mark)
    assert calls.steps[1:] == [steady] * 3
    monkeypatch.setattr(engine, "_DIRECT_STEPS", {})  # no call recorded or replayed: every one through dynamo
    assert _equal(fast, run(lambda: None))


@pytest.mark.parametrize("cls, kw", [(ot.Adam, {}), (ot.SGD, {"momentum": 0.9})])
def test_one_large_weight_beside_a_pack_calls_both_graphs_directly(cls, kw, calls):
    """A lone large weight's call and the pack's share a graph key (one graph): neither displaces the other's
    record, so both are direct calls from the second step on (they once went through dynamo at every step)."""
    fast, ref = _run_both(cls, kw, 4, calls, shapes=[(512, 256), (512,), (10, 512)])
    assert _equal(fast, ref)
    assert calls.steps[1:] == [(2, 0)] * 3


@pytest.mark.parametrize("cls, kw", [(ot.Adam, {}), (ot.SGD, {"momentum": 0.9})])
def test_a_pack_too_small_to_compile_takes_the_graph_its_large_neighbour_compiled(cls, kw, calls):
    """A 784-128-10 perceptron, no flag: one large weight and a pack of 1,418 elements (under PACK_COMPILED: eager
    on its own). Once the large weight's call has compiled the graph of their common key, the pack takes it too (a
    direct call), with the eager kernel's bits: the reference path's numbers whichever a step took."""
    fast, ref = _run_both(cls, kw, 5, calls, shapes=[(128, 784), (128,), (10, 128), (10,)], fused=None)
    assert _equal(fast, ref)
    assert calls.steps[2:] == [(2, 0)] * 3  # (the pack eager: (1, 0))


def test_a_scheduled_lr_keeps_the_direct_calls(calls):
    """A scheduler's new lr rebuilds the face's MXNet-style optimizer: what it recorded carries over."""
    def halve(opt, k):
        for group in opt.param_groups:
            group["lr"] = 0.1 * 0.5 ** k
    fast, ref = _run_both(ot.SGD, {"momentum": 0.9}, 4, calls, between=halve)
    assert _equal(fast, ref)
    assert calls.steps[1:] == [STEADY] * 3


def test_a_dynamo_reset_sends_the_next_step_through_dynamo(calls):
    """``torch._dynamo.reset()`` (a user's, to compile again under a new configuration): the graphs compiled before
    are no longer called; the step after records the new ones, and the next is direct again."""
    def reset_before_step_three(opt, k):
        if k == 2:
            torch._dynamo.reset()
    fast, ref = _run_both(ot.Adam, {}, 4, calls, between=reset_before_step_three)
    assert _equal(fast, ref)
    assert calls.steps[1:] == [STEADY, (0, 2), STEADY]


def _mx_run(name, steps, calls=None, between=None, fused=True, **kw):
    """The weights after ``steps`` MXNet-style updates of SHAPES (one list call each; ``calls`` marked after
    each); ``between(opt, step)`` before each."""
    opt = optimizer.create(name, learning_rate=0.01, **kw)
    opt._fused = fused
    weights = [w.detach().clone() for w in _params()]
    states = [opt.create_state(i, w) for i, w in enumerate(weights)]
    gen = torch.Generator().manual_seed(5)
    for k in range(steps):
        if between is not None:
            between(opt, k)
        opt.update(list(range(len(weights))), weights, [torch.randn(w.shape, generator=gen) for w in weights], states)
        if calls is not None:
            calls.mark()
    return weights


def test_a_changed_kernel_attribute_goes_through_dynamo(calls):
    def clip_from_step_three(opt, k):
        if k == 2:
            opt.clip_gradient = 0.05  # the kernel reads it: dynamo specializes a graph on it
    fast = _mx_run("sgd", 4, calls, clip_from_step_three, momentum=0.9)
    ref = _mx_run("sgd", 4, None, clip_from_step_three, fused=False, momentum=0.9)
    assert _equal(fast, ref)
    assert calls.steps[1:] == [STEADY, (0, 2), STEADY]


@pytest.mark.parametrize("around", [
    pytest.param(lambda: torch.autocast("cpu", dtype=torch.bfloat16), id="autocast"),  # dynamo's global state
    pytest.param(lambda: torch.compiler.set_stance("force_eager"), id="force_eager"),  # the user's stance
])
def test_a_context_around_the_step_goes_through_dynamo(around, calls):
    fast, ref = _params(), _params()
    a, b = ot.Adam(fast, fused=True), ot.Adam(ref, fused=False)
    for k in range(4):
        _grads(fast, k)
        _grads(ref, k)
        with around() if k == 2 else contextlib.nullcontext():
            a.step()
            b.step()
        calls.mark()
    assert _equal(fast, ref)
    # step 4 goes through dynamo too: step 3 recorded what it ran under autocast, or nothing (eager)
    assert calls.steps[1:] == [STEADY, (0, 2), (0, 2)]


def test_new_sizes_of_the_same_graphs_are_called_directly(calls):
    """A graph serves every size: an optimizer over weights of other sizes calls the graphs that another's
    steps compiled, directly from its second step on (its first records what dynamo ran)."""
    _run_both(ot.Adam, {}, 2, calls)
    shapes = [(300, 300)] * 3 + [(100,)] * 5
    fast, ref = _run_both(ot.Adam, {}, 3, calls, shapes=shapes)
    assert _equal(fast, ref)
    assert calls.steps[2:] == [(0, 2), STEADY, STEADY]


def test_inputs_sharing_memory_apart_are_called_directly(calls):
    """Weights that are views of one buffer (the opt-in flat layout, or a user's own), each a stretch of its own:
    called directly, as AOT autograd compiles inputs that cannot overlap as inputs of their own (views that may
    overlap go through dynamo: ``_direct._apart``, below)."""
    def views(seed):
        flat = torch.randn(3 * 65536, generator=torch.Generator().manual_seed(seed))
        return [torch.nn.Parameter(v) for v in flat.split(65536)]

    fast, ref = views(0), views(0)
    a, b = ot.SGD(fast, momentum=0.9, fused=True), ot.SGD(ref, momentum=0.9, fused=False)
    for k in range(3):
        _grads(fast, k)
        _grads(ref, k)
        a.step()
        b.step()
        calls.mark()
    assert _equal(fast, ref)
    assert calls.steps[2:] == [(1, 0)]


def test_disjoint_views():
    """``_direct._disjoint``: stretches apart, and 2-D views whose rows lie between each other's; else not."""
    flat = torch.zeros(64)
    blocks = flat.view(4, 16)
    assert _direct._disjoint(flat[:10], flat[10:])
    assert not _direct._disjoint(flat[:11], flat[10:])
    assert _direct._disjoint(blocks[:, :8], blocks[:, 8:])
    assert _direct._disjoint(blocks[:, 8:], blocks[:, :8])
    assert not _direct._disjoint(blocks[:, :9], blocks[:, 8:])
    assert not _direct._disjoint(blocks[:, 2:10], blocks[:, 8:])
    assert not _direct._disjoint(flat.view(8, 8)[:, :4], blocks[:, 8:])  # rows of other strides
    assert _direct._disjoint(blocks[:3, :8], flat[48:])
    assert _direct._apart([blocks[:, :8], blocks[:, 8:], torch.zeros(3)])
    assert not _direct._apart([blocks[:, :8], blocks[:, 4:12]])


def test_a_class_from_outside_optzoo_goes_through_dynamo(calls):
    class MyAdam(type(optimizer.create("adam"))):
        pass

    opt = MyAdam(learning_rate=0.01)
    assert not _direct.eligible(opt)
    weights = [torch.randn(70000) for _ in range(2)]
    states = [opt.create_state(i, w) for i, w in enumerate(weights)]
    for _ in range(3):
        opt.update([0, 1], weights, [torch.randn(70000) for _ in range(2)], states)
        calls.mark()
    assert calls.direct == 0 and calls.steps[1:] == [(0, 1)] * 2


def test_a_refused_direct_call_goes_through_dynamo(monkeypatch, calls):
    """The graph asserts its inputs' sizes and strides before it writes: a refused call runs through dynamo."""
    def refuse(self, args):
        raise AssertionError("expected size 300 == 256")

    def refusing_at_step_three(opt, k):
        if k == 2:
            monkeypatch.setattr(_direct.Graph, "call", refuse)
    fast = _mx_run("adam", 3, calls, refusing_at_step_three)
    ref = _mx_run("adam", 3, fused=False)
    assert _equal(fast, ref)
    assert calls.steps[2] == (0, 2)  # the group and the pack refused, each then run through dynamo


def _reads(spec, variant, clip):
    """The instance attributes ``kernel`` reads for one configuration (a recording subclass)."""
    kw = dict(variant)
    if "no_wd" not in spec.flags:
        kw.setdefault("wd", 0.01)
    if clip:
        kw["clip_gradient"] = 0.5
    opt = optimizer.create(spec.name, **kw)
    base, reads = type(opt), set()

    class Recording(base):
        recording = False

        def __getattribute__(self, name):
            if type(self).recording and name in object.__getattribute__(self, "__dict__"):
                reads.add(name)
            return super().__getattribute__(name)

        def kernel(self, *args, **kwargs):
            type(self).recording = True
            try:
                return base.kernel(self, *args, **kwargs)
            finally:
                type(self).recording = False

    opt.__class__ = Recording
    for i, shape in enumerate(spec.shapes):
        w = torch.randn(shape)
        state = opt.create_state(i, w)
        for _ in range(2):
            opt.update(i, w, torch.randn(shape), state)
    return reads


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_kernels_read_only_the_attributes_they_declare(spec):
    declared = set(type(optimizer.create(spec.name))._kernel_reads)
    for variant in spec.variants:
        for clip in (False, True):
            assert _reads(spec, variant, clip) <= declared, (spec.name, variant, clip)


def test_a_size_below_two_is_refused():
    """Dynamo gives sizes 0 and 1 graphs of their own: a graph for dynamic sizes refuses them (before any write)."""
    graph = _direct.Graph()
    graph.fn, graph.places, graph.boxed = (lambda *args: pytest.fail("called")), ((0, None), (0, 0)), False
    with pytest.raises(AssertionError):
        graph([torch.zeros(1)])


def test_states_viewed_into_a_buffer_are_called_directly(monkeypatch, calls):
    """GroupAdaGrad's per-row states of large weights lie end to end in one buffer: their graphs take the storage
    offset as an input too. Called directly, the same bits as through dynamo."""
    shapes = [(300, 250), (260, 400), (512, 200)]

    def run():
        params = _params(shapes=shapes)
        opt = ot.GroupAdaGrad(params, fused=True)
        for k in range(3):
            _grads(params, k)
            opt.step()
            calls.mark()
        return params

    direct = run()
    assert calls.steps[1:] == [(3, 0)] * 2
    monkeypatch.setattr(_direct, "run", lambda key, fn, args: _direct.through(key, fn, args))
    assert _equal(direct, run())


def test_a_packs_call_is_replayed_with_the_reference_numbers(monkeypatch, calls):
    """A pack's compiled call is made again as the last step made it (its inputs kept, the scalars' tensors put in
    their places): no graph key is computed for it, and a new lr (new scalar tensors) or a clip bound (a kernel
    attribute: through dynamo, then replayed again) gives the reference path's numbers."""
    keys, made = [], []  # graph keys computed; their count over each step (both optimizers, the reference's none)
    real_key = engine._key
    monkeypatch.setattr(engine, "_key", lambda *a, **k: keys.append(1) or real_key(*a, **k))

    def change(opt, k):
        if len(made) == k:  # (called for both optimizers before step k: the first call counts step k - 1)
            made.append(len(keys))
            keys.clear()
        for group in opt.param_groups:
            group["lr"] = 0.1 * 0.5 ** (k // 2)
            group["clip_gradient"] = 0.05 if k >= 4 else None

    fast, ref = _run_both(ot.SGD, {"momentum": 0.9}, 6, calls, between=change, shapes=[(256,)] * 5)
    assert _equal(fast, ref)
    assert calls.steps[1:] == [(1, 0), (1, 0), (1, 0), (0, 1), (1, 0)]
    # step 1 (the face's plan's first, with a pack of its own) records the call; 2 and 3 replay it (a new lr at 2);
    # step 4's clip bound: a key computed, the call through dynamo; step 5 replays
    assert made[2:] == [1, 0, 0, 1] and keys == []


def _steady(learn, monkeypatch, steps=4):
    """Adam over SHAPES, ``steps`` steps; without ``learn``, every direct call goes through the wrappers."""
    with monkeypatch.context() as mp:
        if not learn:
            mp.setattr(_direct.Graph, "learn", lambda self, *args: setattr(self, "code", False))
        ps = _params()
        opt = ot.Adam(ps, fused=True)
        for k in range(steps):
            _grads(ps, k)
            opt.step()
    return ps, opt


def test_inductors_code_is_called_without_the_wrappers_with_the_same_numbers_and_versions(monkeypatch, calls):
    """A direct call runs inductor's compiled code itself (learned from a call through dynamo): the numbers, and
    the version counters autograd reads, are those of the call through dynamo's and AOT autograd's wrappers."""
    bare, opt = _steady(True, monkeypatch)
    assert any(site.graph.code for site in opt.mxnet_optimizer(0)._direct.values())
    wrapped, _ = _steady(False, monkeypatch)
    assert _equal(bare, wrapped)
    assert [p._version for p in bare] == [p._version for p in wrapped]


def test_a_weight_saved_for_backward_and_then_stepped_is_caught_by_autograd(monkeypatch):
    """The compiled code writes the weights in place: their version counters move, so a backward through a graph
    that saved a weight before the step raises, as with torch's own optimizers."""
    ps, opt = _steady(True, monkeypatch, steps=3)
    assert any(site.graph.code for site in opt.mxnet_optimizer(0)._direct.values())
    loss = (ps[0] * ps[0]).sum()  # saves ps[0]
    _grads(ps, 3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_profiled_step_keeps_the_wrappers_ranges(monkeypatch):
    """Under the profiler, direct calls go through the wrappers, whose ranges a user's trace shows."""
    ps, opt = _steady(True, monkeypatch, steps=3)
    _grads(ps, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any("CompiledFxGraph" in e.name for e in prof.events())


@pytest.mark.parametrize("merged", [False, True])
def test_inputs_sharing_memory_skip_the_wrappers_only_where_the_code_writes_them(monkeypatch, merged):
    """SGLD's weights in pairs (engine.PAIRS: views of one weight, each an input): inductor's code is called itself
    where it writes the inputs in the places the call wrote (AOT autograd compiled them as inputs of their own); a
    code that writes others (as where AOT merges aliased inputs into one base) keeps the wrappers. The numbers are
    the reference path's either way."""
    if merged:  # as if the code took one merged base in place of the views
        find = _direct._compiled_code

        def compiled_code(fn):
            cfg = find(fn)
            return None if cfg is None else type("Merged", (), {
                "output_strides": cfg.output_strides, "current_callable": cfg.current_callable,
                "mutated_input_idxs": [0]})()
        monkeypatch.setattr(_direct, "_compiled_code", compiled_code)
    monkeypatch.setattr(engine, "_COMPILED", {})

    def run(fused):
        torch.manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 257), (70000,)]]
        opt = ot.SGLD(params, lr=0.01, fused=fused)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
        return [p.detach() for p in params], opt

    ref, _ = run(False)
    got, opt = run(True)
    assert _equal(ref, got)
    sites = list(opt._inner_for(opt.param_groups[0], 0).__dict__["_direct"].values())
    assert len(sites) == 1 and isinstance(sites[0].graph.code, bool) is merged
