"""optzoo.lr_scheduler against MXNet 1.9.1: its unit tests' values, recorded golden sequences, bad input."""
import copy
import json
import math
import pathlib
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optzoo
from optzoo import lr_scheduler as lrs
from optzoo.lr_scheduler import (CosineScheduler, FactorScheduler, LRScheduler, MultiFactorScheduler,
                                 PolyScheduler)

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "schedulers.json").read_text())
CASES = {c["name"]: c for c in FIXTURE["cases"]}
RTOL = 1e-12


def close(actual, expected, rtol=RTOL):
    return abs(actual - expected) <= rtol * abs(expected)


# --------------------------------------------------------------- MXNet's own scheduler tests, closed forms
def test_mxnet_factor_scheduler():
    f = FactorScheduler(100, 0.1, stop_factor_lr=1e-4, base_lr=1, warmup_steps=20, warmup_begin_lr=0.1,
                        warmup_mode="constant")
    assert f(0) == 0.1 and f(10) == 0.1
    assert f(21) == 1
    assert close(f(101), 1 * 0.1)
    assert close(f(201), 1 * 0.1 * 0.1)
    assert f(1000) == 1e-4  # 1e-9 would be next: clamped to stop_factor_lr


def test_mxnet_multifactor_scheduler():
    f = MultiFactorScheduler([15, 25], 0.1, base_lr=0.1, warmup_steps=10, warmup_begin_lr=0.05,
                             warmup_mode="linear")
    assert f(0) == 0.05
    assert close(f(5), 0.05 + (0.1 - 0.05) * 5 / 10)
    assert f(15) == 0.1  # the decay for step 15 happens at n = 16
    assert close(f(16), 0.1 * 0.1) and close(f(20), 0.1 * 0.1)
    assert close(f(26), 0.1 * 0.1 * 0.1) and close(f(100), 0.1 * 0.1 * 0.1)


def test_mxnet_poly_scheduler():
    f = PolyScheduler(1000, base_lr=3, pwr=2, final_lr=0, warmup_steps=100, warmup_begin_lr=0,
                      warmup_mode="linear")
    assert f(0) == 0 and close(f(50), 1.5) and f(100) == 3
    assert close(f(101), 3 * (1 - 1 / 900) ** 2) and f(101) < f(100)
    assert close(f(500), 3 * (1 - 400 / 900) ** 2) and f(500) < 1.6
    assert f(1000) == 0


def test_mxnet_cosine_scheduler():
    f = CosineScheduler(1000, base_lr=3, final_lr=0.1)
    assert f(0) == 3 and f(1000) == 0.1
    assert close(f(500), 0.1 + (3 - 0.1) * (1 + math.cos(math.pi / 2)) / 2) and f(500) > 1.5


# ------------------------------------------------------------------------------ MXNet golden sequences
def _build(case):
    sched = getattr(lrs, case["class"])(**case["kwargs"])
    if case["learning_rate"] is not None:
        sched.base_lr = case["learning_rate"]  # what Optimizer(learning_rate=X, lr_scheduler=S) does
    return sched


def _assert_vars(actual, expected):
    assert sorted(actual) == sorted(expected)  # MXNet's attribute names, nothing more
    for key, want in expected.items():
        got = actual[key]
        assert type(got) is type(want), (key, got, want)
        assert (close(got, want) if isinstance(want, float) else got == want), (key, got, want)


def test_fixture_covers_every_class():
    assert FIXTURE["mxnet_version"] == "1.9.1"
    assert {c["class"] for c in CASES.values()} == set(lrs.__all__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mxnet_golden(name):
    case = CASES[name]
    sched = _build(case)
    _assert_vars(vars(sched), case["init_vars"])
    call = sched.get_warmup_lr if case["class"] == "LRScheduler" else sched
    for n, want in zip(case["calls"], case["values"]):
        got = call(n)
        assert type(got) is type(want) and close(got, want), (n, got, want)
    _assert_vars(vars(sched), case["final_vars"])


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    (LRScheduler, dict(base_lr=-0.1), "base_lr"),
    (LRScheduler, dict(base_lr=float("nan")), "base_lr"),
    (LRScheduler, dict(base_lr="0.1"), "base_lr"),
    (LRScheduler, dict(base_lr=0.1, warmup_begin_lr=0.2), "warmup_begin_lr"),
    (LRScheduler, dict(warmup_begin_lr=-0.01), "warmup_begin_lr"),
    (LRScheduler, dict(warmup_steps=-1), "warmup_steps"),
    (LRScheduler, dict(warmup_steps=2.0), "warmup_steps"),
    (LRScheduler, dict(warmup_steps=True), "warmup_steps"),
    (LRScheduler, dict(warmup_mode="cosine"), "warmup_mode"),
    (FactorScheduler, dict(step=0), "step"),
    (FactorScheduler, dict(step=2.5), "step"),
    (FactorScheduler, dict(step=5, factor=1.1), "factor"),
    (FactorScheduler, dict(step=5, factor=-0.5), "factor"),
    (FactorScheduler, dict(step=5, stop_factor_lr=-1e-8), "stop_factor_lr"),
    (FactorScheduler, dict(step=5, warmup_steps=-3), "warmup_steps"),
    (FactorScheduler, dict(step=5, base_lr=0.1, warmup_begin_lr=0.5), "warmup_begin_lr"),
    (MultiFactorScheduler, dict(step=[]), "step"),
    (MultiFactorScheduler, dict(step=10), "step"),
    (MultiFactorScheduler, dict(step=[0, 5]), "step[0]"),
    (MultiFactorScheduler, dict(step=[5, 5]), "step"),
    (MultiFactorScheduler, dict(step=[10, 5]), "step"),
    (MultiFactorScheduler, dict(step=[5, 7.5]), "step[1]"),
    (MultiFactorScheduler, dict(step=[5], factor=2), "factor"),
    (MultiFactorScheduler, dict(step=[5], warmup_mode="exp"), "warmup_mode"),
    (PolyScheduler, dict(max_update=0), "max_update"),
    (PolyScheduler, dict(max_update=10.0), "max_update"),
    (PolyScheduler, dict(max_update=10, warmup_steps=10), "max_update"),
    (PolyScheduler, dict(max_update=10, warmup_steps=12), "max_update"),
    (PolyScheduler, dict(max_update=10, pwr=-1), "pwr"),
    (PolyScheduler, dict(max_update=10, final_lr=-0.1), "final_lr"),
    (PolyScheduler, dict(max_update=10, base_lr=-1), "base_lr"),
    (CosineScheduler, dict(max_update=-5), "max_update"),
    (CosineScheduler, dict(max_update=5, warmup_steps=5), "max_update"),
    (CosineScheduler, dict(max_update=5, final_lr=float("inf")), "final_lr"),
    (CosineScheduler, dict(max_update=5, warmup_steps=1.5), "warmup_steps"),
]


@pytest.mark.parametrize("cls, kwargs, arg", BAD, ids=[f"{c.__name__}-{a}-{i}" for i, (c, _, a) in enumerate(BAD)])
def test_bad_input_names_argument(cls, kwargs, arg):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{arg}=") and "expected" in message, message


@pytest.mark.parametrize("cls, kwargs, arg", [b for b in BAD if b[0] is not LRScheduler])
def test_bad_input_stores_nothing(cls, kwargs, arg):
    sched = {FactorScheduler: lambda: FactorScheduler(3, 0.5, base_lr=0.2),
             MultiFactorScheduler: lambda: MultiFactorScheduler([2, 4], 0.5, base_lr=0.2),
             PolyScheduler: lambda: PolyScheduler(30, base_lr=0.2, warmup_steps=3),
             CosineScheduler: lambda: CosineScheduler(30, base_lr=0.2, warmup_steps=3)}[cls]()
    sched(7)
    before = copy.deepcopy(vars(sched))
    with pytest.raises(ValueError, match=re.escape(f"{arg}=")):
        sched.__init__(**kwargs)
    assert vars(sched) == before


def test_warmup_lr_outside_warmup_and_abstract_call():
    sched = LRScheduler(base_lr=0.1, warmup_steps=4)
    with pytest.raises(ValueError, match="num_update=4"):
        sched.get_warmup_lr(4)
    with pytest.raises(NotImplementedError):
        sched(0)


# --------------------------------------------------------------------- state: plain attributes, dumps
def test_factor_catch_up_matches_closed_form():
    # Resuming at a large num_update: MXNet's loop ends with count = the largest multiple of step below n.
    for kwargs in (dict(step=7, factor=1), dict(step=7, factor=0.1, stop_factor_lr=1e-3),
                   dict(step=1, factor=0.5, stop_factor_lr=0)):
        n = 10**6 + 3
        sched = FactorScheduler(base_lr=1.0, **kwargs)
        lr = sched(n)
        assert sched.count == (n - 1) // kwargs["step"] * kwargs["step"] and type(sched.count) is int
        assert lr == {1: 1.0, 0.1: 1e-3, 0.5: 0.0}[kwargs["factor"]]


@pytest.mark.parametrize("name", ["factor_warmup_linear", "multifactor_warmup_linear", "poly_overwrite_jump",
                                  "cosine_warmup_constant"])
def test_dump_and_restore_midway(name):
    """A scheduler restored as Updater.get_states does (class name + vars) continues identically."""
    case = CASES[name]
    sched = _build(case)
    half = len(case["calls"]) // 2
    for n in case["calls"][:half]:
        sched(n)
    blob = json.loads(json.dumps({"class": type(sched).__name__, "vars": vars(sched)}))  # plain values only
    restored = getattr(lrs, blob["class"]).__new__(getattr(lrs, blob["class"]))
    restored.__dict__.update(blob["vars"])
    for n, want in zip(case["calls"][half:], case["values"][half:]):
        assert restored(n) == sched(n) and close(restored(n), want)


def test_optimizer_overwrites_base_lr_only_and_updater_dump_keeps_state():
    sched = CosineScheduler(20, base_lr=0.1, final_lr=0.01, warmup_steps=4, warmup_begin_lr=0.02)
    with pytest.warns(UserWarning, match="overwritten"):
        opt = optzoo.create("sgd", learning_rate=0.5, lr_scheduler=sched)
    assert sched.base_lr == 0.5 and sched.warmup_final_lr == 0.1 and sched.base_lr_orig == 0.1
    updater = optzoo.get_updater(opt)
    w, g = torch.ones(3), torch.full((3,), 0.5)
    for _ in range(6):
        updater(0, g, w)
    assert opt.num_update == 6 and sched.base_lr == sched(6)
    fresh = optzoo.get_updater(optzoo.create("sgd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.set_states(updater.get_states(dump_optimizer=True))
    restored = fresh.optimizer.lr_scheduler
    assert type(restored) is CosineScheduler and vars(restored) == vars(sched)
    want = 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * (7 - 4) / 16)) / 2  # from base_lr_orig, not 0.5
    assert close(restored(7), want)


# ---------------------------------------------------------------------------------------------- properties
lr_value = st.floats(0, 10, allow_nan=False, allow_infinity=False)
calls = st.lists(st.integers(0, 300), min_size=1, max_size=40)


def _ulps(x, k=4):
    # final + (base - final) * 1 rounds up to one ulp above base (hypothesis finds it): allow a few ulps.
    return k * math.ulp(x)


@settings(max_examples=150, deadline=None)
@given(base=lr_value, frac=st.floats(0, 1), warmup=st.integers(0, 40), span=st.integers(1, 200),
       pwr=st.floats(0, 5), cosine=st.booleans(), ns=calls)
def test_poly_cosine_stay_between_final_and_base(base, frac, warmup, span, pwr, cosine, ns):
    final = base * frac
    sched = (CosineScheduler(warmup + span, base_lr=base, final_lr=final, warmup_steps=warmup) if cosine else
             PolyScheduler(warmup + span, base_lr=base, pwr=pwr, final_lr=final, warmup_steps=warmup))
    last = None
    for n in ns:
        lr = sched(n)
        lo = 0.0 if n < warmup else final  # linear warmup from 0 up to base
        assert lo - _ulps(lo) <= lr <= base + _ulps(base), (n, lr)
        last = lr if warmup <= n <= warmup + span else last
    if last is not None:  # past max_update: the value of the last in-range call
        assert sched(warmup + span + 1) == last


@settings(max_examples=150, deadline=None)
@given(base=lr_value, factor=st.floats(0, 1), stop=st.floats(0, 1), step=st.integers(1, 30),
       warmup=st.integers(0, 40), ns=calls)
def test_factor_is_closed_form_of_running_max(base, factor, stop, step, warmup, ns):
    sched = FactorScheduler(step, factor, stop_factor_lr=stop, base_lr=base, warmup_steps=warmup)
    seen = 0
    for n in ns:
        lr = sched(n)
        if n < warmup:
            assert lr == base * n / warmup or close(lr, base * n / warmup)
            continue
        seen = max(seen, n)
        want = base
        for _ in range(max(seen - 1, 0) // step):  # decays at n = step + 1, 2 step + 1, ...
            want = want * factor if want * factor >= stop else stop
        assert lr == want, (n, seen, lr, want)


@settings(max_examples=150, deadline=None)
@given(base=lr_value, factor=st.floats(0, 1), steps=st.sets(st.integers(1, 250), min_size=1, max_size=6),
       warmup=st.integers(0, 40), ns=calls)
def test_multifactor_is_closed_form_of_running_max(base, factor, steps, warmup, ns):
    steps = sorted(steps)
    sched = MultiFactorScheduler(steps, factor, base_lr=base, warmup_steps=warmup, warmup_mode="constant")
    seen = 0
    for n in ns:
        lr = sched(n)
        if n < warmup:
            assert lr == 0
            continue
        seen = max(seen, n)
        want = base
        for _ in (s for s in steps if s < seen):
            want *= factor
        assert lr == want, (n, seen, lr, want)
