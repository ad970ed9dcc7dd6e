"""Generic tests over the spec table: bad input, list form, dtypes, devices, Updater round trip, docs.

Nothing here branches on an optimizer's name: behaviour differences are spec flags.
"""
import builtins
import copy

import pytest
import torch

from optzoo import optimizer
from optzoo.optimizer import registry
from optzoo.optimizer._tree import leaves
from specs import SPECS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def spec_params(with_variants=False):
    if with_variants:
        return [pytest.param(spec, v, id=f"{spec.name}-v{i}") for spec in SPECS for i, v in enumerate(spec.variants)]
    return [pytest.param(spec, id=spec.name) for spec in SPECS]


def make(spec, variant, **extra):
    kwargs = dict(variant)
    if "no_wd" not in spec.flags:
        kwargs.setdefault("wd", 0.01)
    kwargs.update(extra)
    return optimizer.create(spec.name, **kwargs)


def tensors(spec, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in spec.shapes]
    gs = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in spec.shapes]
          for _ in range(6)]
    return ws, gs


# ---------------------------------------------------------------------------------------------- the table
def test_every_registered_optimizer_has_a_spec_entry():
    names = {s.name for s in SPECS}
    assert set(optimizer.list_optimizers()) <= names, set(optimizer.list_optimizers()) - names


def test_every_spec_entry_is_registered():
    assert {s.name for s in SPECS} <= set(optimizer.list_optimizers())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec", spec_params())
def test_bad_constructor_arguments(spec):
    for kwargs, exc, needle in spec.bad:
        with pytest.raises(getattr(builtins, exc), match=needle):
            optimizer.create(spec.name, **kwargs)


COMMON_BAD = [({"learning_rate": -0.1}, ValueError, "learning_rate=-0.1"),
              ({"clip_gradient": -1.0}, ValueError, "clip_gradient=-1.0"),
              ({"wd": float("nan")}, ValueError, "wd=nan"),
              ({"rescale_grad": "x"}, ValueError, "rescale_grad='x'"),
              ({"begin_num_update": -1}, ValueError, "begin_num_update=-1"),
              ({"no_such_option": 1}, TypeError, "'no_such_option'"),
              ({"lr_scheduler": 0.1}, TypeError, "lr_scheduler=0.1")]


@pytest.mark.parametrize("spec", spec_params())
@pytest.mark.parametrize("kwargs,exc,needle", COMMON_BAD, ids=[next(iter(c[0])) for c in COMMON_BAD])
def test_bad_base_arguments(spec, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        optimizer.create(spec.name, **kwargs)


def snapshot(opt, ws, states):
    return ([w.clone() for w in ws], [[t.clone() for t in leaves(s)] for s in states],
            copy.deepcopy(opt._all_index_update_counts), opt.num_update)


def assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for sa, sb in zip(before[1], after[1]):
        assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert before[2:] == after[2:]


def _bad_sparse(g):
    """A row-sparse gradient that no optimizer takes: a row out of range (a valid one is accepted where the
    optimizer supports row-sparse gradients, tests/test_sparse.py)."""
    return torch.sparse_coo_tensor(torch.tensor([[g.shape[0] if g.dim() else 1]]), torch.ones((1,) + tuple(g.shape[1:]),
                                   dtype=g.dtype), g.shape if g.dim() else (1,), check_invariants=False)


BAD_GRADS = {
    "shape": (lambda w, g: torch.zeros(w.numel() + 1, dtype=w.dtype), ValueError, "shape"),
    "dtype": (lambda w, g: g.double(), TypeError, "dtype torch.float64"),
    "sparse": (lambda w, g: _bad_sparse(g), ValueError, "out of range"),
    "device": (lambda w, g: g.to("meta"), ValueError, "is on meta: expected the weight's device cpu"),
    "not_tensor": (lambda w, g: g.tolist(), TypeError, "grad for index 1"),
}


@pytest.mark.parametrize("spec", spec_params())
@pytest.mark.parametrize("bad", sorted(BAD_GRADS))
def test_bad_grad_rejected_before_anything_changes(spec, bad):
    """A bad second gradient in a list call leaves the first weight, every state and the counts unchanged."""
    make_grad, exc, needle = BAD_GRADS[bad]
    opt = make(spec, spec.variants[0], multi_precision=True)
    ws, gs = tensors(spec)
    states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
    before = snapshot(opt, ws, states)
    grads = [gs[0][0], make_grad(ws[1], gs[0][1])]
    for call in (opt.update, opt.update_multi_precision):
        with pytest.raises(exc, match=needle):
            call([0, 1], ws, grads, states)
        assert_unchanged(before, snapshot(opt, ws, states))


@pytest.mark.parametrize("spec", spec_params())
def test_integer_weight_rejected(spec):
    opt = make(spec, spec.variants[0])
    w = torch.zeros(spec.shapes[0], dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        opt.update(0, w, w.clone(), None)


@pytest.mark.parametrize("spec", spec_params())
def test_state_from_another_optimizer_or_shape_rejected(spec):
    ws, gs = tensors(spec)
    # a variant that has a state (SGD without momentum has none)
    opt = next((o for o in (make(spec, v) for v in spec.variants) if o.create_state(0, ws[0]) is not None),
               make(spec, spec.variants[0]))
    own = opt.create_state(0, ws[0])
    before = ws[0].clone()
    foreign = []
    for other in SPECS:
        if other.name != spec.name:
            state = make(other, other.variants[-1]).create_state(0, ws[0])
            if state is not None and own is not None:
                foreign.append(state)
    if own is not None:
        foreign.append(opt.create_state(1, ws[0][:1]))          # a state of another shape
    for state in foreign:
        with pytest.raises(TypeError, match="state for index 0"):
            opt.update(0, ws[0], gs[0][0], state)
    assert torch.equal(ws[0], before)


# ---------------------------------------------------------------------------------------------- list form
@pytest.mark.parametrize("spec,variant", spec_params(with_variants=True))
def test_list_form_equals_one_by_one(spec, variant):
    results = []
    for listed in (True, False):
        torch.manual_seed(7)  # stochastic optimizers draw the same noise in the same order
        opt = make(spec, variant)
        ws, gs = tensors(spec)
        states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
        for grads in gs:
            if listed:
                opt.update_multi_precision([0, 1], ws, grads, states)
            else:
                for i in range(2):
                    opt.update_multi_precision(i, ws[i], grads[i], states[i])
        results.append(ws + [t for s in states for t in leaves(s)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("spec", spec_params())
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_multi_precision_equals_fp32_on_the_master_copy(spec, low):
    """Under multi_precision the update runs in fp32 on the master copy: it must equal an fp32 run started
    from the same (rounded) values, and the low-precision weight must be the master copy rounded."""
    if "multi_precision" not in registry.get_record(spec.name).capabilities:
        pytest.skip("no multi-precision support")
    ws_low, gs_low = tensors(spec, low)
    runs = []
    for mp in (True, False):
        torch.manual_seed(3)
        opt = make(spec, spec.variants[-1], multi_precision=mp)
        ws = [w.clone() for w in ws_low] if mp else [w.float() for w in ws_low]
        states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
        for grads in gs_low:
            for i in range(2):
                opt.update_multi_precision(i, ws[i], grads[i] if mp else grads[i].float(), states[i])
        runs.append((ws, states, opt))
    (ws_mp, st_mp, opt_mp), (ws_32, st_32, _) = runs
    for i in range(2):
        master, inner = opt_mp._split_mp(st_mp[i])
        assert master.dtype == torch.float32 and ws_mp[i].dtype == low
        assert torch.equal(master, ws_32[i])
        assert torch.equal(ws_mp[i], master.to(low))
        for a, b in zip(leaves(inner), leaves(st_32[i])):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("spec", spec_params())
def test_float64_runs_in_float64(spec):
    opt = make(spec, spec.variants[-1])
    ws, gs = tensors(spec, torch.float64)
    states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
    for grads in gs:
        opt.update_multi_precision([0, 1], ws, grads, states)
    assert all(w.dtype == torch.float64 and torch.isfinite(w).all() for w in ws)


@CUDA
@pytest.mark.parametrize("spec", spec_params())
def test_cuda_matches_cpu_and_state_lives_on_the_weight_device(spec):
    out = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        opt = make(spec, spec.variants[-1])
        ws, gs = tensors(spec, device=device)
        states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
        assert all(t.device == ws[0].device for s in states for t in leaves(s))
        for grads in gs:
            opt.update_multi_precision([0, 1], ws, grads, states)
        out.append([w.cpu() for w in ws])
    if "stochastic" not in spec.flags:
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Updater
@pytest.mark.parametrize("spec", spec_params())
def test_updater_states_round_trip_exactly(spec):
    """Train 3 steps, dump (with the optimizer), train 3 more; versus load into a fresh Updater, train 3."""
    def run(updater, ws, grads_list):
        for grads in grads_list:
            updater([0, 1], grads, ws)

    torch.manual_seed(11)
    ws, gs = tensors(spec)
    up = optimizer.get_updater(make(spec, spec.variants[-1], rescale_grad=0.5))
    run(up, ws, gs[:3])
    blob, ws_saved = up.get_states(dump_optimizer=True), [w.clone() for w in ws]
    rng = torch.get_rng_state()
    run(up, ws, gs[3:])

    torch.set_rng_state(rng)
    fresh = optimizer.get_updater(optimizer.create(spec.name))
    fresh.set_states(blob)
    assert type(fresh.optimizer) is type(up.optimizer)
    assert fresh.optimizer.num_update == up.optimizer.num_update - 3 * ("no_count" not in spec.flags)
    run(fresh, ws_saved, gs[3:])
    for a, b in zip(ws, ws_saved):
        assert torch.equal(a, b)
    for i in (0, 1):
        for a, b in zip(leaves(up.states[i]), leaves(fresh.states[i])):
            assert torch.equal(a, b)


def test_updater_rejects_garbage_states():
    up = optimizer.get_updater(optimizer.SGD())
    with pytest.raises(ValueError, match="could not be read"):
        up.set_states(b"not a state dump")


def test_updater_aggregates_by_dtype_like_mxnet(monkeypatch):
    opt = optimizer.SGD(momentum=0.9)
    calls = []
    real = opt._update_calls  # what the Updater hands over: the lists of MXNet's update calls
    monkeypatch.setattr(opt, "_update_calls", lambda chunks, *a: (calls.extend(chunks), real(chunks, *a))[1])
    up = optimizer.get_updater(opt)
    ws = [torch.zeros(2, dtype=torch.float64 if k % 2 else torch.float32) for k in range(7)]
    up(list(range(7)), [torch.ones_like(w) for w in ws], ws)
    assert calls == [[0, 2, 4, 6], [1, 3, 5]]  # aggregate_num 4, grouped by dtype in insertion order


# ---------------------------------------------------------------------------------------------- docs
@pytest.mark.parametrize("rec", registry.records(), ids=lambda r: r.name)
def test_docstring_states_the_update_rule(rec):
    doc = rec.cls.__doc__ or ""
    assert ".. math::" in doc, f"{rec.cls.__name__} docstring has no update rule"
    assert "torch" in doc, f"{rec.cls.__name__} docstring does not say how it relates to torch.optim"
