"""Values at the public boundary (issue 12): hyperparameters are stored as plain Python numbers and bools (so a
saved optimizer loads), strings are not bools, a failed constructor leaves its scheduler alone, and aliased or
repeated weights in one list call are refused before anything changes.

Generic over the registry and the spec table: nothing branches on an optimizer's name.
"""
import copy
import re
import warnings

import numpy as np
import pytest
import torch

from optzoo import lr_scheduler as lrs
from optzoo import optimizer
from optzoo.optimizer import registry
from optzoo.optimizer.base import _CACHES
from specs import SPECS

NAMES = [spec.name for spec in SPECS]
PLAIN = (bool, int, float, str, type(None))


def _non_plain(value, path="opt"):
    """The paths inside ``value`` that are not plain Python data (numbers, bools, str, None, containers)."""
    if isinstance(value, PLAIN):
        return []
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_plain(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [p for k, v in value.items()
                for p in _non_plain(k, f"{path} key {k!r}") + _non_plain(v, f"{path}[{k!r}]")]
    return [f"{path}: {type(value).__module__}.{type(value).__name__}"]


def _hyperparameters(opt):
    """vars(opt) without what is not a hyperparameter or count (the scheduler and Gluon parameters are objects)."""
    return {k: v for k, v in vars(opt).items() if k not in ("lr_scheduler", "param_dict", "_index_update_count")}


def _numpy_like(value, k):
    """``value`` as one of the numpy / torch forms a user may hand over, cycling through them with ``k``."""
    if isinstance(value, bool):
        return [np.bool_(value), np.array(value), torch.tensor(value)][k % 3]
    if isinstance(value, int):
        return [np.int64(value), np.int32(value), np.array(value), torch.tensor(value)][k % 4]
    if isinstance(value, float):
        return [np.float64(value), np.float32(value), np.array(value), torch.tensor(value, dtype=torch.float64)][k % 4]
    if isinstance(value, str):
        return np.str_(value)
    return value


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.uint8).clone() if t.numel() else t.detach().cpu().clone()


def _snapshot(opt, weights, states):
    """Everything a rejected update must leave as it was, bit for bit."""
    flat = []

    def walk(s):
        if isinstance(s, torch.Tensor):
            flat.append(_bits(s))
        elif isinstance(s, (list, tuple)):
            for x in s:
                walk(x)
    walk(states)
    return ([_bits(w) for w in weights], flat, copy.deepcopy(opt._all_index_update_counts), opt.num_update,
            copy.deepcopy({k: v for k, v in _hyperparameters(opt).items() if k not in _CACHES}))


def _same(a, b):
    (wa, sa, ca, na, ha), (wb, sb, cb, nb, hb) = a, b
    assert len(wa) == len(wb) and all(torch.equal(x, y) for x, y in zip(wa, wb)), "weights changed"
    assert len(sa) == len(sb) and all(torch.equal(x, y) for x, y in zip(sa, sb)), "states changed"
    assert (ca, na) == (cb, nb), "update counts changed"
    assert ha.keys() == hb.keys() and all(
        ha[k] == hb[k] for k in ha if not isinstance(ha[k], torch.Tensor)), "optimizer attributes changed"


# ------------------------------------------------------------------------------------- 1. plain numbers
def test_numpy_hyperparameters_are_stored_as_python_numbers():
    opt = optimizer.create("adam", learning_rate=np.float64(0.01), beta1=np.float32(0.8), beta2=np.array(0.99),
                           epsilon=torch.tensor(1e-6, dtype=torch.float64), wd=np.int64(0),
                           rescale_grad=np.float16(0.5), clip_gradient=torch.tensor(0.25),
                           begin_num_update=np.int64(3), multi_precision=np.bool_(True), lazy_update=np.array(False))
    expected = {"lr": (float, 0.01), "beta1": (float, float(np.float32(0.8))), "beta2": (float, 0.99),
                "epsilon": (float, 1e-6), "wd": (int, 0), "rescale_grad": (float, 0.5),
                "clip_gradient": (float, 0.25), "begin_num_update": (int, 3), "num_update": (int, 3),
                "multi_precision": (bool, True), "lazy_update": (bool, False)}
    for attr, (kind, value) in expected.items():
        got = getattr(opt, attr)
        assert type(got) is kind and got == value, (attr, got)
    # the constructor call kept for safe dumps is plain too
    assert _non_plain(opt._init_args) == []
    assert type(opt._init_args[1]["learning_rate"]) is float and type(opt._init_args[1]["multi_precision"]) is bool


@pytest.mark.parametrize("name", NAMES)
def test_every_constructor_default_given_as_numpy_is_stored_plain(name):
    """Each optimizer's own keyword defaults (and the base ones) passed as numpy scalars, 0-d arrays or 0-d
    tensors: every attribute is plain Python data afterwards."""
    record = registry.get_record(name)
    kwargs = {k: _numpy_like(v, i) for i, (k, v) in enumerate(record.defaults().items()) if v is not None}
    kwargs.update(rescale_grad=np.float32(2.0), begin_num_update=np.array(1), multi_precision=np.bool_(False))
    if "wd" not in kwargs and name != "groupadagrad":
        kwargs["wd"] = np.float64(0.01)
    opt = optimizer.create(name, **kwargs)
    assert _non_plain(_hyperparameters(opt)) == []
    assert _non_plain(opt._init_args) == []
    assert type(opt.rescale_grad) is float and opt.rescale_grad == 2.0
    assert type(opt.begin_num_update) is int and opt.begin_num_update == 1


def test_setters_store_python_numbers():
    opt = optimizer.create("sgd", param_idx2name={np.int64(0): np.str_("fc_weight"), 1: "fc_bias"})
    assert list(opt.idx2name) == [0, 1] and all(type(k) is int for k in opt.idx2name)
    assert type(opt.idx2name[0]) is str
    opt.set_learning_rate(np.float32(0.5))
    assert type(opt.lr) is float and opt.lr == 0.5
    opt.set_learning_rate(torch.tensor(0.25))
    assert type(opt.lr) is float and opt.lr == 0.25
    opt.set_lr_mult({np.int64(0): np.float64(2.0), "fc_bias": np.array(3)})
    assert opt.lr_mult == {0: 2.0, "fc_bias": 3}
    assert [type(k) for k in opt.lr_mult] == [int, str] and [type(v) for v in opt.lr_mult.values()] == [float, int]
    opt.set_wd_mult({np.int32(1): np.float32(0.5)})
    assert opt.wd_mult == {"fc_bias": 0.0, 1: 0.5} and type(list(opt.wd_mult)[1]) is int
    assert _non_plain(_hyperparameters(opt)) == []


@pytest.mark.parametrize("bad, shown", [
    (np.array([0.01]), r"array\(\[0.01\]\)"),
    (torch.tensor([0.01]), r"tensor\(\[0.0100\]\)"),
    (np.zeros((1, 1)), r"array\(\[\[0.\]\]\)"),
])
def test_arrays_with_dimensions_are_refused_by_name(bad, shown):
    shape = tuple(bad.shape)
    kind = "a tensor" if isinstance(bad, torch.Tensor) else "an array"
    with pytest.raises(ValueError, match=rf"^learning_rate={shown} is invalid: expected a finite real number or "
                                         rf"None, got {kind} of shape {re_tuple(shape)} \(only a 0-d array"):
        optimizer.create("adam", learning_rate=bad)
    with pytest.raises(ValueError, match=rf"^beta1={shown} is invalid: expected a finite real number, got {kind}"):
        optimizer.create("adam", beta1=bad)
    opt = optimizer.create("adam", learning_rate=0.1)
    opt.set_lr_mult({0: 2.0})
    with pytest.raises(ValueError, match=rf"^lr={shown} is invalid"):
        opt.set_learning_rate(bad)
    with pytest.raises(ValueError, match=rf"^lr_mult\[1\]={shown} is invalid: expected a finite real number, got"):
        opt.set_lr_mult({0: 3.0, 1: bad})
    with pytest.raises(ValueError, match=rf"^wd_mult\['b'\]={shown} is invalid"):
        opt.set_wd_mult({"b": bad})
    assert (opt.lr, opt.lr_mult, opt.wd_mult) == (0.1, {0: 2.0}, {})  # nothing changed
    with pytest.raises(ValueError, match=rf"^base_lr={shown} is invalid: expected a finite real number, got {kind}"):
        lrs.FactorScheduler(step=2, base_lr=bad)


def re_tuple(shape):
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("bad", [np.float64("nan"), np.float32("inf"), torch.tensor(float("nan")),
                                 np.complex128(1j), np.array("0.1"), np.datetime64("2020-01-01")])
def test_non_finite_or_non_real_numpy_values_are_refused(bad):
    with pytest.raises(ValueError, match=r"^learning_rate=.* is invalid: expected a finite real number or None$"):
        optimizer.create("sgd", learning_rate=bad)
    with pytest.raises(ValueError, match=r"^momentum=.* is invalid: expected a finite real number$"):
        optimizer.create("sgd", momentum=bad)


def test_integer_checks_read_numpy_integers_and_refuse_floats():
    assert type(optimizer.create("lbsgd", batch_scale=np.int64(2)).batch_scale) is int
    with pytest.raises(ValueError, match=r"^batch_scale=np.float64\(2.0\) is invalid: expected an integer >= 1$"):
        optimizer.create("lbsgd", batch_scale=np.float64(2.0))
    with pytest.raises(ValueError, match=r"^begin_num_update=np.True_ is invalid: expected an integer >= 0$"):
        optimizer.create("sgd", begin_num_update=np.True_)
    assert optimizer.create("lbsgd", warmup_strategy=np.str_("sqrt")).warmup_strategy == "sqrt"
    assert type(optimizer.create("lbsgd", warmup_strategy=np.str_("sqrt")).warmup_strategy) is str


def test_schedulers_store_python_numbers():
    scheds = [
        lrs.FactorScheduler(step=np.int64(5), factor=np.float32(0.5), stop_factor_lr=np.float64(1e-3),
                            base_lr=np.array(0.1), warmup_steps=torch.tensor(2), warmup_begin_lr=np.float16(0.0),
                            warmup_mode=np.str_("linear")),
        lrs.MultiFactorScheduler(step=[np.int64(3), np.int32(6)], factor=np.array(0.5), base_lr=np.float64(0.1)),
        lrs.PolyScheduler(max_update=np.int64(20), base_lr=np.float32(0.5), pwr=np.float64(2), final_lr=np.array(0),
                          warmup_steps=np.int8(2), warmup_begin_lr=torch.tensor(0.125)),
        lrs.CosineScheduler(max_update=torch.tensor(10), base_lr=np.float64(0.2), final_lr=np.float64(0.01)),
    ]
    for s in scheds:
        assert _non_plain(vars(s), type(s).__name__) == []
    f = scheds[0]
    assert (f.step, f.factor, f.stop_factor_lr, f.base_lr, f.warmup_steps, f.warmup_mode) == (5, 0.5, 1e-3, 0.1, 2,
                                                                                              "linear")
    assert type(scheds[1].step[0]) is int and type(scheds[2].power) is float and type(scheds[2].final_lr) is int
    assert scheds[2].warmup_begin_lr == 0.125 and type(scheds[2].warmup_begin_lr) is float
    with pytest.raises(ValueError, match=r"^warmup_steps=array\(\[2\]\) is invalid: expected an integer >= 0, got an"):
        lrs.PolyScheduler(max_update=20, warmup_steps=np.array([2]))
    with pytest.raises(ValueError, match=r"^warmup_mode=array\(\['linear'\], dtype='<U6'\) is invalid: expected "
                                         r"one of 'linear', 'constant', got an array of shape \(1,\)"):
        lrs.CosineScheduler(max_update=20, warmup_mode=np.array(["linear"]))


def _step(updater, weights, grads):
    updater(list(range(len(weights))), grads, weights)


def test_numpy_hyperparameters_round_trip_through_the_updater():
    """``create('adam', learning_rate=np.float64(0.01))`` and numpy multipliers and scheduler values: the
    Updater's dump loads (torch.load(weights_only=True) refuses numpy scalars) and steps identically."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    gs = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(3)]

    def build():
        sched = lrs.FactorScheduler(step=np.int64(1), factor=np.float32(0.5), base_lr=np.float64(0.01))
        opt = optimizer.create("adam", learning_rate=np.float64(0.01), beta1=np.float32(0.8), wd=np.array(0.01),
                               lr_scheduler=sched)
        opt.set_lr_mult({np.int64(1): np.float64(0.5)})
        opt.set_wd_mult({0: np.float32(2.0)})
        return opt

    ref = optimizer.get_updater(build())
    w_ref = [w.clone() for w in ws]
    for g in gs:
        _step(ref, w_ref, g)

    first = optimizer.get_updater(build())
    w_run = [w.clone() for w in ws]
    _step(first, w_run, gs[0])
    blob = first.get_states(dump_optimizer=True)
    second = optimizer.get_updater(optimizer.create("sgd"))
    second.set_states(blob)
    opt = second.optimizer
    assert type(opt).__name__ == "Adam" and type(opt.lr) is float and opt.lr == 0.01
    assert type(opt.beta1) is float and opt.beta1 == float(np.float32(0.8))
    assert opt.lr_mult == {1: 0.5} and type(opt.wd_mult[0]) is float
    assert type(opt.lr_scheduler.factor) is float and opt.lr_scheduler.base_lr == first.optimizer.lr_scheduler.base_lr
    for g in gs[1:]:
        _step(second, w_run, g)
    for a, b in zip(w_run, w_ref):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- 2. strings are not bools
def _bool_flags():
    """(optimizer, flag) for every boolean keyword of every registered optimizer (the base's multi_precision
    included): found from the constructors' defaults, so a new flag is covered when it is added."""
    out = []
    for name in NAMES:
        flags = {k for k, v in registry.get_record(name).defaults().items() if isinstance(v, bool)}
        out += [(name, flag) for flag in sorted(flags | {"multi_precision"})]
    return out


BOOL_FLAGS = _bool_flags()


def test_the_bool_flags_are_found():
    assert {("rmsprop", "centered"), ("lamb", "bias_correction"), ("lars", "momentum_correction"),
            ("lars", "lazy_update"), ("adam", "lazy_update"), ("sgd", "lazy_update"),
            ("adam", "multi_precision"), ("lbsgd", "multi_precision")} <= set(BOOL_FLAGS)


@pytest.mark.parametrize("name, flag", BOOL_FLAGS)
@pytest.mark.parametrize("bad", ["False", "True", "0", "", 2, -1, 0.0, 1.5, None, [True], np.float64(1.0)])
def test_a_bool_flag_refuses_anything_but_a_bool(name, flag, bad):
    with pytest.raises(TypeError,
                       match=rf"^{flag}={re.escape(repr(bad))} is invalid: expected a bool \(True or False\)$"):
        optimizer.create(name, **{flag: bad})


@pytest.mark.parametrize("name, flag", BOOL_FLAGS)
def test_a_bool_flag_accepts_bools_numpy_bools_and_0_1(name, flag):
    for value, expected in [(True, True), (False, False), (np.True_, True), (np.False_, False), (1, True),
                            (0, False), (np.int64(1), True), (np.array(False), False), (torch.tensor(True), True)]:
        got = getattr(optimizer.create(name, **{flag: value}), flag)
        assert type(got) is bool and got is expected, (value, got)


def test_rmsprop_centered_string_is_not_centered_training():
    """The issue's case: centered='False' trained centered RMSProp; now it is refused, and False trains plain."""
    with pytest.raises(TypeError, match=r"^centered='False' is invalid: expected a bool \(True or False\)$"):
        optimizer.create("rmsprop", centered="False")
    assert optimizer.create("rmsprop", centered=np.False_).create_state(0, torch.zeros(3)) is not None
    assert len(optimizer.create("rmsprop", centered=np.False_).create_state(0, torch.zeros(3))) == 1


# ------------------------------------------------------------------------------------- 3. schedulers untouched
def _bad_cases():
    cases = [pytest.param(spec.name, kwargs, exc, text, id=f"{spec.name}-{'-'.join(kwargs)}={list(kwargs.values())[0]}")
             for spec in SPECS for kwargs, exc, text in spec.bad]
    cases += [pytest.param(name, {flag: "False"}, "TypeError", flag, id=f"{name}-{flag}-str")
              for name, flag in BOOL_FLAGS]
    cases += [pytest.param(name, {"rescale_grad": np.array([1.0])}, "ValueError", "rescale_grad", id=f"{name}-rg-array")
              for name in NAMES]
    return cases


@pytest.mark.parametrize("name, kwargs, exc, text", _bad_cases())
def test_a_failed_constructor_leaves_its_scheduler_unchanged(name, kwargs, exc, text):
    sched = lrs.PolyScheduler(max_update=20, base_lr=0.1, final_lr=0.01, warmup_steps=2, warmup_begin_lr=0.05)
    before = copy.deepcopy(vars(sched))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[exc], match=text):
            optimizer.create(name, learning_rate=0.5, lr_scheduler=sched, **kwargs)
    assert vars(sched) == before
    assert not [w for w in caught if "overwritten" in str(w.message)]


def test_the_issue_case_and_the_good_call_after_it():
    s = lrs.FactorScheduler(step=2, base_lr=0.1)
    with pytest.raises(ValueError, match=r"^beta1=2.0 is invalid: expected a value in \[0, 1\)$"):
        optimizer.create("adam", learning_rate=0.5, lr_scheduler=s, beta1=2.0)
    assert s.base_lr == 0.1 and vars(s) == vars(lrs.FactorScheduler(step=2, base_lr=0.1))
    with pytest.warns(UserWarning, match="overwritten"):
        opt = optimizer.create("adam", learning_rate=np.float64(0.5), lr_scheduler=s, beta1=0.8)
    assert s.base_lr == 0.5 and type(s.base_lr) is float and opt.learning_rate == 0.5


# ------------------------------------------------------------------------------------- 4. aliased weights
def _setup(name, dtype=torch.float32, mp=False, n=3):
    opt = optimizer.create(name, **({"multi_precision": True} if mp else {}))
    gen = torch.Generator().manual_seed(1)
    shapes = (list(registry_shapes(name)) * n)[:n]
    ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
    return opt, ws, gs, states


def registry_shapes(name):
    return next(spec.shapes for spec in SPECS if spec.name == name)


def _warm(opt, ws, gs, states, call):
    """One good step first, so counts, states and the optimizer's Python state are not at their start."""
    getattr(opt, call)(list(range(len(ws))), ws, [g * 0.5 for g in gs], states)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("call", ["update", "update_multi_precision"])
@pytest.mark.parametrize("fused", [None, False])
def test_the_same_weight_twice_in_one_list_call_is_refused_and_nothing_changes(name, call, fused):
    opt, ws, gs, states = _setup(name)
    opt._fused = fused
    _warm(opt, ws, gs, states, call)
    before = _snapshot(opt, ws, states)
    weights = [ws[0], ws[1], ws[0]]
    with pytest.raises(ValueError, match=r"^weight for index 2 \(position 2\) is the same tensor as the weight for "
                                         r"index 0 \(position 0\): expected distinct, non-overlapping weights in one "
                                         r"list call$"):
        getattr(opt, call)([0, 1, 2], weights, [gs[0], gs[1], gs[0]], [states[0], states[1], states[0]])
    _same(before, _snapshot(opt, ws, states))


@pytest.mark.parametrize("name", NAMES)
def test_a_repeated_index_in_one_list_call_is_refused_and_nothing_changes(name):
    opt, ws, gs, states = _setup(name)
    _warm(opt, ws, gs, states, "update")
    before = _snapshot(opt, ws, states)
    with pytest.raises(ValueError, match=r"^index 1 is repeated at positions 1 and 2 of the list: expected each "
                                         r"index once per call \(one update per parameter\)$"):
        opt.update([0, 1, np.int64(1)], ws, gs, states)
    _same(before, _snapshot(opt, ws, states))


def test_overlapping_views_are_refused_distinct_views_of_one_buffer_are_not():
    opt, ws, gs, states = _setup("sgd", n=2)
    buf = torch.randn(20)
    a, b = buf[:12].view(3, 4), buf[8:13]
    before = _snapshot(opt, [buf], states)
    with pytest.raises(ValueError, match=r"^weight for index 'b' \(position 1\) shares memory with the weight for "
                                         r"index 'a' \(position 0\)"):
        opt.update(["a", "b"], [a, b], [torch.ones(3, 4), torch.ones(5)], [None, None])
    _same(before, _snapshot(opt, [buf], states))
    # strided views whose spans interleave are refused too (the check compares byte spans)
    with pytest.raises(ValueError, match="shares memory with"):
        opt.update([0, 1], [buf[0::2], buf[1::2]], [torch.ones(10), torch.ones(10)], [None, None])
    # views that do not overlap are two parameters: the same numbers as two separate tensors
    opt2 = optimizer.create("sgd", learning_rate=0.1)
    ref = optimizer.create("sgd", learning_rate=0.1)
    x, y = buf[:12].view(3, 4), buf[12:17]
    xs, ys = x.clone(), y.clone()
    g1, g2 = torch.randn(3, 4), torch.randn(5)
    opt2.update([0, 1], [x, y], [g1, g2], [None, None])
    ref.update([0, 1], [xs, ys], [g1, g2], [None, None])
    assert torch.equal(x, xs) and torch.equal(y, ys)


@pytest.mark.parametrize("name", ["sgd", "adam", "lamb"])
def test_aliased_fp16_weights_under_multi_precision_are_refused(name):
    opt, ws, gs, states = _setup(name, dtype=torch.float16, mp=True)
    _warm(opt, ws, gs, states, "update_multi_precision")
    before = _snapshot(opt, ws, states)
    with pytest.raises(ValueError, match=r"^weight for index 'y' \(position 1\) is the same tensor as the weight "
                                         r"for index 'x' \(position 0\)"):
        opt.update_multi_precision(["x", "y"], [ws[0], ws[0]], [gs[0], gs[0]], [states[0], states[0]])
    _same(before, _snapshot(opt, ws, states))


@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_after_a_rejected_aliased_call_a_good_call_gives_the_numbers_of_an_untouched_optimizer(name):
    opt, ws, gs, states = _setup(name)
    ref, ws_ref, gs_ref, states_ref = _setup(name)
    _warm(opt, ws, gs, states, "update")
    _warm(ref, ws_ref, gs_ref, states_ref, "update")
    with pytest.raises(ValueError):
        opt.update([0, 1, 2], [ws[0], ws[1], ws[0]], gs, states)
    opt.update([0, 1, 2], ws, gs, states)
    ref.update([0, 1, 2], ws_ref, gs_ref, states_ref)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ws, ws_ref))
    assert opt.num_update == ref.num_update and opt._all_index_update_counts == ref._all_index_update_counts


def test_the_updater_refuses_aliased_weights_before_stepping():
    opt = optimizer.create("adam")
    up = optimizer.get_updater(opt)
    w, g = torch.randn(3), torch.randn(3)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"^weight for index 1 \(position 1\) is the same tensor as the weight for "
                                         r"index 0 \(position 0\)"):
        up([0, 1], [g, g], [w, w])
    assert torch.equal(w, w0) and opt.num_update == 0 and opt._index_update_count == {}
