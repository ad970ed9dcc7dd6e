"""All or nothing (issue 12), generically: for every public entry point and every bad input class, snapshot ->
call -> the error -> the state bit for bit as before -> a good call gives the numbers of a twin that never saw
the bad input.

Hypothesis draws the optimizer (the spec table), the call form, where in a list the bad input sits, the warm-up
and the bad input itself; nothing branches on an optimizer's name (spec flags only). The snapshot covers the
weights, the states, the per-index counts, ``num_update``, every other attribute of the optimizer, the
scheduler's state, ``param_groups`` and ``opt.state``.
"""
import copy
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import optzoo
import optzoo.torch as ot
from optzoo import lr_scheduler as lrs
from optzoo import optimizer
from optzoo.optimizer.base import _CACHES
from specs import SPECS

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# GroupAdaGrad holds 2-D weights only: every spec's own shapes, repeated for longer lists
SPEC = st.sampled_from(SPECS)


# ---------------------------------------------------------------------------------------------- the snapshot
def freeze(value, depth=0):
    """``value`` as plain, comparable data: tensors as (dtype, shape, device, bytes), objects as their vars."""
    assert depth < 30, "snapshot too deep"
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided or t.is_meta:
            return ("T", str(t.layout), str(t.device), repr(t))
        t = t.cpu().contiguous()
        return ("T", str(t.dtype), tuple(t.shape), bytes(t.view(torch.uint8).flatten().tolist()) if t.numel() else b"")
    if isinstance(value, dict):
        return ("D", sorted(((repr(k), freeze(v, depth + 1)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [freeze(v, depth + 1) for v in value])
    if isinstance(value, torch.Generator):
        return ("G", freeze(value.get_state()))
    if isinstance(value, (bool, int, float, str, type(None))):
        return ("V", repr(value))  # repr: nan equals nan
    if isinstance(value, optimizer.Optimizer):
        return ("O", type(value).__name__, freeze({k: v for k, v in vars(value).items()
                                                   if k not in _CACHES and k != "_index_update_count"}, depth + 1))
    if hasattr(value, "__slots__"):
        return ("S", type(value).__name__, freeze({k: getattr(value, k) for k in value.__slots__}, depth + 1))
    if hasattr(value, "__dict__"):
        return ("A", type(value).__name__, freeze(vars(value), depth + 1))
    return ("R", repr(value))


def opt_snapshot(opt, weights=(), states=()):
    """The optimizer (every attribute, the scheduler's and Gluon parameters' included), weights and states."""
    return freeze({"opt": opt, "counts": opt._index_update_count, "num_update": opt.num_update,
                   "weights": list(weights), "states": list(states)})


def face_snapshot(opt, params):
    return freeze({"groups": opt.param_groups, "state": {k: opt.state[p] for k, p in
                                                         enumerate(q for g in opt.param_groups for q in g["params"])},
                   "params": list(params)})


def trainer_snapshot(trainer, params, skip=()):
    opt = trainer.optimizer
    attrs = {k: v for k, v in vars(opt).items() if k not in _CACHES and k not in skip and k != "_index_update_count"}
    return freeze({"opt": attrs, "type": type(opt).__name__, "states": trainer._updater.states,
                   "params": list(params), "mults": [trainer.lr_mult, trainer.wd_mult]})


# ---------------------------------------------------------------------------------------------- the worlds
def _scheduler():
    return lrs.FactorScheduler(step=1, factor=0.9, base_lr=0.05)


def build(spec, mp, sched, fused, n):
    """An optimizer of ``spec`` (its first variant), ``n`` weights (fp16 under multi_precision) and their states."""
    kwargs = dict(spec.variants[0])
    if "no_wd" not in spec.flags:
        kwargs["wd"] = 0.01
    if sched:
        kwargs["lr_scheduler"] = _scheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizer.create(spec.name, multi_precision=mp, **kwargs)
    opt._fused = fused
    dtype = torch.float16 if mp else torch.float32
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(spec.shapes[k % 2], generator=gen).to(dtype) for k in range(n)]
    states = [opt.create_state_multi_precision(k, w) for k, w in enumerate(ws)]
    return opt, ws, states


def grads_for(ws, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=gen).to(w.dtype) for w in ws]


def _bad_sparse(g):
    """A row-sparse gradient that no optimizer takes: a row out of range (a valid one is accepted where the
    optimizer supports row-sparse gradients, tests/test_sparse.py)."""
    return torch.sparse_coo_tensor(torch.tensor([[g.shape[0] if g.dim() else 1]]), torch.ones((1,) + tuple(g.shape[1:]),
                                   dtype=g.dtype), g.shape if g.dim() else (1,), check_invariants=False)


BAD_GRADS = {
    "shape": (lambda g: torch.zeros(g.numel() + 1, dtype=g.dtype), ValueError),
    "dtype": (lambda g: g.double(), TypeError),
    "sparse": (lambda g: _bad_sparse(g), ValueError),
    "device": (lambda g: g.to("meta"), ValueError),
    "not_a_tensor": (lambda g: g.tolist(), TypeError),
    "complex": (lambda g: g.to(torch.complex64), TypeError),
}
BAD_WEIGHTS = {  # (weight, grad) -> bad (weight, grad)
    "complex": lambda w, g: (w.to(torch.complex64), g.to(torch.complex64)),
    "sparse": lambda w, g: (w.to_sparse(), g),
    "integer": lambda w, g: (w.to(torch.int64), g.to(torch.int64)),
}
BAD_STATES = {  # the good state -> a state the optimizer must refuse (None: not applicable)
    "junk": lambda s, w: "junk",
    "wrapped": lambda s, w: (s, torch.zeros(1)),
    "other_shape": lambda s, w: _reshaped(s),
}


def _reshaped(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros(state.numel() + 1, dtype=state.dtype)
    if isinstance(state, (tuple, list)) and any(isinstance(x, (torch.Tensor, tuple, list)) for x in state):
        return type(state)(_reshaped(x) for x in state)
    return None


CALLS = ["update", "update_multi_precision", "updater"]


def call(kind, target, indices, ws, gs, states, single):
    if single:
        indices, ws, gs, states = indices[0], ws[0], gs[0], states[0]
    if kind == "updater":
        return target(indices, gs, ws)
    return getattr(target, kind)(indices, ws, gs, states)


@st.composite
def worlds(draw, state_bad=False):
    spec = draw(SPEC)
    kind = draw(st.sampled_from(CALLS))
    single = draw(st.booleans())
    n = 1 if single else draw(st.integers(2, 4))
    mp = draw(st.booleans()) and "multi_precision" in optimizer.registry.get_record(spec.name).capabilities
    if kind == "update" and mp:
        kind = "update_multi_precision"  # update on an fp16 weight with an mp state is not a valid call
    return dict(spec=spec, kind=kind, single=single, n=n, mp=mp, sched=draw(st.booleans()),
                fused=draw(st.sampled_from([None, False])), warm=draw(st.integers(0, 2)),
                pos=draw(st.integers(0, n - 1)))


class Twin:
    """One side of the experiment: an optimizer (or an Updater of it), its weights and states."""

    def __init__(self, w):
        self.opt, self.ws, self.states = build(w["spec"], w["mp"], w["sched"], w["fused"], w["n"])
        self.kind, self.single = w["kind"], w["single"]
        self.up = optimizer.get_updater(self.opt) if self.kind == "updater" else None
        for step in range(w["warm"]):
            self.step(100 + step)

    def step(self, seed, gs=None, states=None, ws=None):
        torch.manual_seed(seed)  # stochastic optimizers: the same noise on both twins
        target = self.up if self.up is not None else self.opt
        call(self.kind, target, list(range(len(self.ws))), ws or self.ws, gs or grads_for(self.ws, seed),
             states or self.states, self.single)

    def snapshot(self):
        states = self.up.states if self.up is not None else self.states
        return opt_snapshot(self.opt, self.ws, [states] if self.up is not None else states)


def _good_call_matches(a, b):
    for twin in (a, b):
        twin.step(7)
    assert a.snapshot() == b.snapshot(), "a good call after the failure differs from a twin that never failed"


# ---------------------------------------------------------------------------------------------- MXNet-style calls
@SETTINGS
@given(w=worlds(), bad=st.sampled_from(sorted(BAD_GRADS)))
def test_a_bad_gradient_anywhere_in_a_call_changes_nothing(w, bad):
    a, b = Twin(w), Twin(w)
    make, exc = BAD_GRADS[bad]
    gs = grads_for(a.ws, 7)
    gs[w["pos"]] = make(gs[w["pos"]])
    before = a.snapshot()
    with pytest.raises(exc, match="grad for index"):
        a.step(7, gs=gs)
    assert a.snapshot() == before
    _good_call_matches(a, b)


@SETTINGS
@given(w=worlds(), bad=st.sampled_from(sorted(BAD_WEIGHTS)))
def test_a_bad_weight_anywhere_in_a_call_changes_nothing(w, bad):
    a, b = Twin(w), Twin(w)
    ws, gs = list(a.ws), grads_for(a.ws, 7)
    ws[w["pos"]], gs[w["pos"]] = BAD_WEIGHTS[bad](ws[w["pos"]], gs[w["pos"]])
    before = a.snapshot()
    with pytest.raises(TypeError, match="weight for index"):
        a.step(7, gs=gs, ws=ws)
    assert a.snapshot() == before
    _good_call_matches(a, b)


def test_a_rejected_first_updater_call_with_a_sparse_weight_makes_no_state():
    """The Updater makes the states of new indices before the update's checks: it takes them back."""
    up = optimizer.get_updater(optimizer.create("sgd", momentum=0.9))
    with pytest.raises(TypeError, match="weight for index 0"):
        up(0, torch.ones(4, 3), torch.zeros(4, 3).to_sparse())
    assert up.states == {}


@SETTINGS
@given(w=worlds(), bad=st.sampled_from(sorted(BAD_STATES)))
def test_a_bad_state_anywhere_in_a_call_changes_nothing(w, bad):
    a, b = Twin(w), Twin(w)
    pos = w["pos"]
    store = a.up.states if a.up is not None else a.states
    if a.up is not None and pos not in store:  # no warm-up: the Updater makes its states on the first call
        a.step(5), b.step(5)
    good = store[pos]
    wrong = BAD_STATES[bad](good, a.ws[pos])
    assume(wrong is not None)
    states = list(a.states)
    if a.up is not None:
        a.up.states[pos] = wrong
    else:
        states[pos] = wrong
    before = a.snapshot()
    with pytest.raises((TypeError, ValueError), match="state for index"):
        a.step(7, states=states)
    assert a.snapshot() == before
    if a.up is not None:
        a.up.states[pos] = good
    _good_call_matches(a, b)


def _other_dtype(t):
    return torch.float64 if t.dtype != torch.float64 else torch.float32


#: Changes made in place, on the objects a checked call passed (``.data =``): nothing a caller passes anew.
#: ``(what, new data)``: the last state tensor of the index, or its weight (then its gradient follows).
IN_PLACE = {
    "a state re-bound to another shape": ("state", lambda t: torch.zeros(t.numel() + 1, dtype=t.dtype)),
    "a state re-bound to another dtype": ("state", lambda t: t.data.to(_other_dtype(t))),
    "a weight re-bound to another shape": ("weight", lambda t: torch.zeros((t.shape[0] + 1,) + tuple(t.shape[1:]),
                                                                           dtype=t.dtype)),
}


@SETTINGS
@given(w=worlds(), how=st.sampled_from(sorted(IN_PLACE)))
def test_a_tensor_changed_in_place_after_a_checked_call_is_still_refused(w, how):
    """A call over the same indices and state objects as the last checked one skips the per-index checks
    (``Optimizer._checks_hold``); a state or weight re-bound in place since is still refused by name (the
    state no longer fits), nothing changed."""
    a, b = Twin(w), Twin(w)
    a.step(5), b.step(5)  # a call over these very objects: its checks remembered
    store = a.up.states if a.up is not None else a.states
    leaves = optimizer._tree.leaves(store[w["pos"]])
    assume(leaves)
    what, new = IN_PLACE[how]
    target = leaves[-1] if what == "state" else a.ws[w["pos"]]
    kept = target.data
    target.data = new(target)
    before = a.snapshot()
    with pytest.raises((TypeError, ValueError), match="state for index"):
        a.step(7)
    assert a.snapshot() == before
    target.data = kept
    _good_call_matches(a, b)


@pytest.mark.parametrize("kind", ["update", "updater"])
def test_a_weight_re_bound_onto_another_after_a_checked_call_is_refused(kind):
    """The distinct-weights check is skipped only at the addresses it passed at (``Optimizer._check_distinct``):
    a weight re-bound in place onto another's memory since is refused by name, nothing changed."""
    opt = optimizer.create("adam")
    ws = [torch.randn(5, 3) for _ in range(3)]
    states = [opt.create_state(k, w) for k, w in enumerate(ws)]
    up = optimizer.get_updater(opt) if kind == "updater" else None

    def step(seed):
        gs = grads_for(ws, seed)
        return up([0, 1, 2], gs, ws) if up else opt.update([0, 1, 2], ws, gs, states)
    step(1), step(2)  # checked, then a call over the same objects (the checks skipped)
    ws[2].data = ws[0].data
    before = opt_snapshot(opt, ws, [up.states] if up else states)
    with pytest.raises(ValueError, match="weight for index 2 .* shares memory with the weight for index 0"):
        step(3)
    assert opt_snapshot(opt, ws, [up.states] if up else states) == before


@pytest.mark.parametrize("kind", ["update", "updater"])
def test_a_call_over_the_objects_of_the_last_checked_one_skips_the_per_index_checks(kind, monkeypatch):
    """What the test above relies on: the second of two calls over the same objects runs no per-index state
    check (and a new state object brings them back)."""
    opt = optimizer.create("adam")
    ws = [torch.randn(5, 3) for _ in range(3)]
    gs = [torch.randn(5, 3) for _ in range(3)]
    states = [opt.create_state(k, w) for k, w in enumerate(ws)]
    up = optimizer.get_updater(opt) if kind == "updater" else None
    step = (lambda: up([0, 1, 2], gs, ws)) if up else (lambda: opt.update([0, 1, 2], ws, gs, states))
    step()
    seen = []
    real = type(opt)._check_state
    monkeypatch.setattr(type(opt), "_check_state", lambda self, i, w, s: (seen.append(i), real(self, i, w, s)))
    step()
    assert seen == []
    if up:
        up.states[1] = opt.create_state(1, ws[1])
    else:
        states[1] = opt.create_state(1, ws[1])
    step()
    assert seen == [0, 1, 2]


@SETTINGS
@given(w=worlds(), setter=st.sampled_from(["set_learning_rate", "set_lr_mult", "set_wd_mult"]),
       value=st.sampled_from([float("nan"), float("inf"), -1.0, "0.1", None, [0.1]]))
def test_bad_hyperparameters_through_the_setters_change_nothing(w, setter, value):
    a, b = Twin(w), Twin(w)
    arg = value if setter == "set_learning_rate" else {w["pos"]: value}
    assume(not (setter != "set_learning_rate" and value == -1.0))  # negative multipliers are allowed (MXNet)
    before = a.snapshot()
    with pytest.raises((ValueError, TypeError, UserWarning)):  # UserWarning: a scheduler owns the lr (MXNet)
        getattr(a.opt, setter)(arg)
    assert a.snapshot() == before
    _good_call_matches(a, b)


@SETTINGS
@given(w=worlds())
def test_a_negative_effective_learning_rate_is_refused_or_applied_never_half(w):
    """MXNet allows negative multipliers; an optimizer that cannot take the lr it gives (SGLD: the noise variance)
    refuses the call before any count moves."""
    a, b = Twin(w), Twin(w)
    for twin in (a, b):
        twin.opt.set_lr_mult({w["pos"]: -1.0})
    before = a.snapshot()
    try:
        a.step(7)
    except ValueError as exc:
        assert "lr" in str(exc)
        assert a.snapshot() == before
        for twin in (a, b):
            twin.opt.set_lr_mult({})
        _good_call_matches(a, b)
    else:
        assert "stochastic" not in w["spec"].flags, "a negative noise variance was accepted"


@pytest.mark.parametrize("spec", [s for s in SPECS if "stochastic" in s.flags], ids=lambda s: s.name)
@pytest.mark.parametrize("fused", [None, False], ids=["fast", "reference"])
@pytest.mark.parametrize("kind", CALLS)
def test_a_negative_noise_variance_is_refused_before_any_count_moves(spec, fused, kind):
    w = dict(spec=spec, kind=kind, single=False, n=3, mp=False, sched=True, fused=fused, warm=1, pos=2)
    a, b = Twin(w), Twin(w)
    a.opt.set_lr_mult({2: -1.0})
    before = a.snapshot()
    with pytest.raises(ValueError, match="index 2"):
        a.step(7)
    assert a.snapshot() == before
    a.opt.set_lr_mult({})
    _good_call_matches(a, b)


# ---------------------------------------------------------------------------------------------- Updater.set_states
def _blob_damages():
    def flip(data, k):
        data = bytearray(data)
        data[k % len(data)] ^= 0x5A
        return bytes(data)
    return st.one_of(
        st.integers(0, 10 ** 6).map(lambda k: ("flip", lambda d: flip(d, k))),
        st.integers(0, 10 ** 6).map(lambda k: ("truncate", lambda d: d[:k % len(d)])),
        st.just(("not_bytes", lambda d: d.decode("latin-1"))),
        st.just(("other_optimizer", None)),
    )


@SETTINGS
@given(spec=SPEC, damage=_blob_damages(), dump=st.booleans())
def test_a_damaged_updater_blob_changes_nothing(spec, damage, dump):
    w = dict(spec=spec, kind="updater", single=False, n=2, mp=False, sched=True, fused=None, warm=2, pos=0)
    a, b = Twin(w), Twin(w)
    name, edit = damage
    if edit is None:  # the states of another optimizer (of the same structure or not)
        other = next(s for s in SPECS if s.name != spec.name and "no_wd" not in s.flags)
        up = optimizer.get_updater(optimizer.create(other.name))
        up(0, torch.ones(spec.shapes[0]), torch.zeros(spec.shapes[0]))
        data = up.get_states(dump_optimizer=False)
    else:
        data = edit(a.up.get_states(dump_optimizer=dump))
    before, opt = a.snapshot(), a.up.optimizer
    with pytest.raises((ValueError, TypeError)):
        a.up.set_states(data)
    assert a.up.optimizer is opt and a.snapshot() == before
    _good_call_matches(a, b)


# ---------------------------------------------------------------------------------------------- Trainer
def trainer_world(spec, sched, n=3):
    gen = torch.Generator().manual_seed(0)
    params = [(f"p{k}.weight", torch.nn.Parameter(torch.randn(spec.shapes[k % 2], generator=gen)))
              for k in range(n)]
    kwargs = dict(spec.variants[0])
    if sched:
        kwargs["lr_scheduler"] = _scheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = optzoo.Trainer(params, spec.name, kwargs)
    ps = [p for _, p in params]
    return trainer, ps


def trainer_step(trainer, ps, seed, batch_size=2, method="step", grads=None):
    torch.manual_seed(seed)
    for p, g in zip(ps, grads or grads_for([p.detach() for p in ps], seed)):
        p.grad = g
    if method == "update":
        trainer.allreduce_grads()
    getattr(trainer, method)(batch_size)


@SETTINGS
@given(spec=SPEC, sched=st.booleans(), method=st.sampled_from(["step", "update"]),
       batch_size=st.sampled_from([0, -2, float("nan"), float("inf"), "2", True, None]))
def test_a_bad_batch_size_changes_nothing(spec, sched, method, batch_size):
    (a, pa), (b, pb) = trainer_world(spec, sched), trainer_world(spec, sched)
    for t, ps in ((a, pa), (b, pb)):
        trainer_step(t, ps, 1)
    before = trainer_snapshot(a, pa)
    with pytest.raises(ValueError, match="batch_size"):
        trainer_step(a, pa, 3, batch_size=batch_size, method=method)
    assert trainer_snapshot(a, pa) == before
    trainer_step(a, pa, 3), trainer_step(b, pb, 3)
    assert trainer_snapshot(a, pa) == trainer_snapshot(b, pb)


def _sparse_grad_at(trainer, ps, pos, method):
    grads = grads_for([p.detach() for p in ps], 3)
    grads[pos] = _bad_sparse(grads[pos])
    with pytest.raises(ValueError, match="grad for index"):
        trainer_step(trainer, ps, 3, batch_size=4, method=method, grads=grads)


@SETTINGS
@given(spec=SPEC, sched=st.booleans(), method=st.sampled_from(["step", "update"]), pos=st.integers(0, 2))
def test_a_bad_gradient_in_a_trainer_step_changes_nothing_else(spec, sched, method, pos):
    """Everything (``rescale_grad`` included) as before, and the numbers of a twin after."""
    (a, pa), (b, pb) = trainer_world(spec, sched), trainer_world(spec, sched)
    for t, ps in ((a, pa), (b, pb)):
        trainer_step(t, ps, 1)
    before = trainer_snapshot(a, pa)
    _sparse_grad_at(a, pa, pos, method)
    assert trainer_snapshot(a, pa) == before
    trainer_step(a, pa, 3, batch_size=4), trainer_step(b, pb, 3, batch_size=4)
    assert trainer_snapshot(a, pa) == trainer_snapshot(b, pb)


def test_a_bad_gradient_in_a_trainer_step_leaves_rescale_grad():
    trainer, ps = trainer_world(SPECS[0], False)
    trainer_step(trainer, ps, 1)
    before = trainer.optimizer.rescale_grad
    _sparse_grad_at(trainer, ps, 1, "step")
    assert trainer.optimizer.rescale_grad == before


@SETTINGS
@given(spec=SPEC, setter=st.sampled_from(["set_lr_mult", "set_wd_mult"]),
       value=st.sampled_from([float("nan"), float("inf"), "1", None, True]))
def test_bad_trainer_multipliers_change_nothing(spec, setter, value):
    (a, pa), (b, pb) = trainer_world(spec, False), trainer_world(spec, False)
    before = trainer_snapshot(a, pa)
    with pytest.raises((ValueError, TypeError)):
        getattr(a, setter)({"p1.weight": 2.0, "p0.*": value})
    assert trainer_snapshot(a, pa) == before
    trainer_step(a, pa, 3), trainer_step(b, pb, 3)
    assert trainer_snapshot(a, pa) == trainer_snapshot(b, pb)


@SETTINGS
@given(spec=SPEC, damage=_blob_damages().filter(lambda d: d[0] in ("flip", "truncate")))
def test_a_damaged_trainer_file_changes_nothing(spec, damage, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t.states"
    (a, pa), (b, pb) = trainer_world(spec, True), trainer_world(spec, True)
    for t, ps in ((a, pa), (b, pb)):
        trainer_step(t, ps, 1)
    a.save_states(path)
    path.write_bytes(damage[1](path.read_bytes()))
    trainer_step(a, pa, 2), trainer_step(b, pb, 2)  # the trainer moved on from the file
    before, opt = trainer_snapshot(a, pa), a.optimizer
    with pytest.raises(ValueError, match="t.states"):
        a.load_states(path)
    assert a.optimizer is opt and trainer_snapshot(a, pa) == before
    trainer_step(a, pa, 3), trainer_step(b, pb, 3)
    assert trainer_snapshot(a, pa) == trainer_snapshot(b, pb)


# ---------------------------------------------------------------------------------------------- the torch face
def face_world(spec, groups=2, fused=None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(spec.shapes[k % 2], generator=gen)) for k in range(2 * groups)]
    kwargs = dict(spec.variants[0])
    opt = ot.create(spec.name, [{"params": params[2 * g:2 * g + 2]} for g in range(groups)], fused=fused, **kwargs)
    return opt, params


def face_step(opt, params, seed, grads=None):
    torch.manual_seed(seed)
    for p, g in zip(params, grads or grads_for([p.detach() for p in params], seed)):
        p.grad = g
    opt.step()


GROUP_DAMAGES = {  # the value of a hyperparameter -> a bad one (None: the group has no such key)
    "lr": [float("nan"), -1.0, "0.1", None],
    "weight_decay": [float("nan"), "x"],
    "rescale_grad": [float("inf"), "x"],
    "clip_gradient": [-1.0, "x"],
    "betas": [(2.0, 0.9), (0.9,), "x"],
    "momentum": [1.5, "x"],
    "multi_precision": ["False"],
}


@SETTINGS
@given(spec=SPEC, fused=st.sampled_from([None, False]), g=st.integers(0, 1),
       key=st.sampled_from(sorted(GROUP_DAMAGES)), k=st.integers(0, 3), warm=st.integers(0, 2))
def test_a_bad_hyperparameter_in_a_param_group_changes_nothing(spec, fused, g, key, k, warm):
    (a, pa), (b, pb) = face_world(spec, fused=fused), face_world(spec, fused=fused)
    assume(key in a.param_groups[g])
    bad = GROUP_DAMAGES[key][k % len(GROUP_DAMAGES[key])]
    for step in range(warm):
        face_step(a, pa, 100 + step), face_step(b, pb, 100 + step)
    good = a.param_groups[g][key]
    a.param_groups[g][key] = bad
    for p, gr in zip(pa, grads_for([p.detach() for p in pa], 7)):
        p.grad = gr
    before = face_snapshot(a, pa)
    with pytest.raises((ValueError, TypeError), match=f"param group {g}"):
        a.step()
    assert face_snapshot(a, pa) == before
    a.param_groups[g][key] = good
    face_step(a, pa, 7), face_step(b, pb, 7)
    assert face_snapshot(a, pa) == face_snapshot(b, pb)


@SETTINGS
@given(spec=SPEC, fused=st.sampled_from([None, False]), pos=st.integers(0, 3),
       bad=st.sampled_from(["sparse", "complex_param"]))
def test_a_bad_gradient_in_a_face_step_changes_nothing(spec, fused, pos, bad):
    (a, pa), (b, pb) = face_world(spec, fused=fused), face_world(spec, fused=fused)
    face_step(a, pa, 1), face_step(b, pb, 1)
    grads = grads_for([p.detach() for p in pa], 7)
    if bad == "sparse":
        for p, gr in zip(pa, grads):
            p.grad = gr
        pa[pos].grad = _bad_sparse(grads[pos])
        before = face_snapshot(a, pa)
        with pytest.raises(ValueError, match="grad for index"):
            a.step()
        assert face_snapshot(a, pa) == before
    else:  # a complex parameter in a new group: refused when added, nothing changes
        z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
        before = face_snapshot(a, pa)
        try:
            a.add_param_group({"params": [z]})
        except (TypeError, ValueError):
            assert face_snapshot(a, pa) == before
        else:
            for p, gr in zip(pa, grads):
                p.grad = gr
            z.grad = torch.ones_like(z)
            before = face_snapshot(a, pa)
            with pytest.raises(TypeError, match="floating-point"):
                a.step()
            assert face_snapshot(a, pa) == before
            a.param_groups.pop()
    face_step(a, pa, 7), face_step(b, pb, 7)
    assert face_snapshot(a, pa) == face_snapshot(b, pb)


def _leaf(entry):
    return next((k for k in sorted(entry) if k != "step"), None)


STATE_DICT_DAMAGES = {
    "entry_not_a_dict": lambda sd, g, s: sd["state"].__setitem__(s, 3),
    "leaf_missing": lambda sd, g, s: sd["state"][s].pop(_leaf(sd["state"][s])),
    "leaf_a_dict": lambda sd, g, s: sd["state"][s].__setitem__(_leaf(sd["state"][s]), {"a": 1}),
    "leaf_wrong_shape": lambda sd, g, s: sd["state"][s].__setitem__(_leaf(sd["state"][s]), torch.zeros(7)),
    "leaf_integer": lambda sd, g, s: sd["state"][s].__setitem__(
        _leaf(sd["state"][s]), sd["state"][s][_leaf(sd["state"][s])].long()),
    "leaf_sparse": lambda sd, g, s: sd["state"][s].__setitem__(
        _leaf(sd["state"][s]), sd["state"][s][_leaf(sd["state"][s])].to_sparse()),
    "leaf_meta": lambda sd, g, s: sd["state"][s].__setitem__(
        _leaf(sd["state"][s]), sd["state"][s][_leaf(sd["state"][s])].to("meta")),
    "step_missing": lambda sd, g, s: sd["state"][s].pop("step"),
    "step_negative": lambda sd, g, s: sd["state"][s].__setitem__("step", -1),
    "step_nan": lambda sd, g, s: sd["state"][s].__setitem__("step", float("nan")),
    "step_inf": lambda sd, g, s: sd["state"][s].__setitem__("step", float("inf")),
    "step_str": lambda sd, g, s: sd["state"][s].__setitem__("step", "1"),
    "cyclic_entry": lambda sd, g, s: sd["state"][s].__setitem__("extra", sd["state"][s]),
    "groups_not_a_list": lambda sd, g, s: sd.__setitem__("param_groups", {}),
    "group_not_a_dict": lambda sd, g, s: sd["param_groups"].__setitem__(g, 5),
    "group_missing": lambda sd, g, s: sd["param_groups"].pop(g),
    "params_missing": lambda sd, g, s: sd["param_groups"][g].pop("params"),
    "params_not_a_list": lambda sd, g, s: sd["param_groups"][g].__setitem__("params", 7),
    "params_unhashable": lambda sd, g, s: sd["param_groups"][g].__setitem__(
        "params", [[k] for k in sd["param_groups"][g]["params"]]),
    "params_repeated": lambda sd, g, s: sd["param_groups"][g].__setitem__(
        "params", [sd["param_groups"][g]["params"][0]] * 2),
    "params_shorter": lambda sd, g, s: sd["param_groups"][g]["params"].pop(),
    "lr_nan": lambda sd, g, s: sd["param_groups"][g].__setitem__("lr", float("nan")),
    "lr_str": lambda sd, g, s: sd["param_groups"][g].__setitem__("lr", "abc"),
    "book_not_a_dict": lambda sd, g, s: sd["param_groups"][g].__setitem__("optzoo", 3),
    "num_update_str": lambda sd, g, s: sd["param_groups"][g]["optzoo"].__setitem__("num_update", "abc"),
    "num_update_negative": lambda sd, g, s: sd["param_groups"][g]["optzoo"].__setitem__("num_update", -5),
    "book_values_nan": lambda sd, g, s: sd["param_groups"][g]["optzoo"].update(
        {k: float("nan") for k in sd["param_groups"][g]["optzoo"]}),
    "book_values_lists": lambda sd, g, s: sd["param_groups"][g]["optzoo"].update(
        {k: [1, 2] for k in sd["param_groups"][g]["optzoo"]}),
    "not_a_state_dict": lambda sd, g, s: sd.pop("state"),
}


@SETTINGS
@given(spec=SPEC, fused=st.sampled_from([None, False]), g=st.integers(0, 1), k=st.integers(0, 1),
       damage=st.sampled_from(sorted(STATE_DICT_DAMAGES)), through_bytes=st.booleans())
def test_a_damaged_state_dict_is_a_value_error_and_changes_nothing(spec, fused, g, k, damage, through_bytes):
    (a, pa), (b, pb) = face_world(spec, fused=fused), face_world(spec, fused=fused)
    face_step(a, pa, 1), face_step(b, pb, 1)
    sd = copy.deepcopy(a.state_dict())
    s = sd["param_groups"][g]["params"][k]
    entry = sd["state"].get(s)
    assume(not damage.startswith("leaf_") or (entry is not None and _leaf(entry) is not None))
    assume(not damage.startswith("book_values") or len(sd["param_groups"][g]["optzoo"]) > 0)
    STATE_DICT_DAMAGES[damage](sd, g, s)
    if through_bytes and damage != "cyclic_entry" and damage != "leaf_meta":  # as read back from a file
        buf = io.BytesIO()
        torch.save(sd, buf)
        sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    face_step(a, pa, 2), face_step(b, pb, 2)  # the optimizer moved on from the state dict
    before = face_snapshot(a, pa)
    with pytest.raises(ValueError, match="state_dict"):
        a.load_state_dict(sd)
    assert face_snapshot(a, pa) == before
    face_step(a, pa, 3), face_step(b, pb, 3)
    assert face_snapshot(a, pa) == face_snapshot(b, pb)
