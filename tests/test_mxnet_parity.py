"""optzoo against MXNet 1.9.1's golden numbers (``tests/fixtures/mxnet``, see ``record_mxnet.py``).

Every case of ``specs.cases()`` replays MXNet's 40 interleaved updates of two parameters from the
recorded initial weights and gradients, and compares after each step the updated weight, every state
tensor (depth first, None skipped; shape and dtype too), the state's nesting and ``num_update``.
MXNet is not needed here: only numpy, torch and the committed fixture files.
"""
from __future__ import annotations

import functools
import json
import math
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import optzoo
from optzoo.optimizer._tree import leaves as _leaves
import specs

FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"
_ADDED_KEYS = ("layout", "num_update", "mxnet_error")  # what the recorder adds to a specs case


def _recorded(name):
    path = FIXTURES / f"{name}.json"
    return json.loads(path.read_text())["cases"] if path.exists() else []


CASES = {c["id"]: c for spec in specs.SPECS for c in _recorded(spec.name)}


@functools.lru_cache(maxsize=None)
def _arrays(name):
    with np.load(FIXTURES / f"{name}.npz") as z:
        return {key: z[key] for key in z.files}


def _tensor(a):
    return torch.from_numpy(np.array(a, copy=True))


# ---------------------------------------------------------------------------------------- tolerances
# fp32 / fp64: optzoo and MXNet's CPU kernels evaluate the same formula in the same precision, but may
# differ by an ulp per operation (operation order, vectorised sqrt/div). Over 20 updates per index
# that stays far below rtol=1e-5 (measured: < 1e-6 of the tensor's largest entry), while a wrong
# formula is off by far more. The atol is relative to the tensor's own largest entry, for entries that
# cancel to ~0; it has no floor at 1, so small states (Adam's v ~ 1e-3, momenta ~ 1e-5) are held to
# the same relative standard as the weights (a floor of 1 let a 1.3e-5 error in Adam's v pass).
# fp16 (only the weights of multi-precision cases, cast from the fp32 master copy): two fp16 ulps
# (2**-10 relative each), since a master copy within 1e-5 may still round to the neighbouring half;
# plus the smallest fp16 subnormal.
# Spec flag "fp16_norms": under multi-precision MXNet takes its norms over the fp16 weight and
# gradient with the squares rounded to fp16 (``multi_sum_sq`` in LARS' aggregated path), which moves
# the fp32 master copy and states by ~2e-4 of their scale; those get 1e-3.
_FP16 = (torch.float16, torch.bfloat16)


def _assert_matches(actual, expected, what, loose=False):
    expected = _tensor(expected)
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, MXNet has {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, MXNet has {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if expected.dtype in _FP16:
        rtol, atol = (2e-3 if expected.dtype == torch.float16 else 2e-2), 1e-6 * scale + 2.0 ** -24
    elif loose:
        rtol, atol = 1e-3, 1e-3 * scale
    else:
        rtol, atol = 1e-5, 1e-6 * scale
    torch.testing.assert_close(actual.detach().cpu(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _layout(state):
    if state is None:
        return "N"
    if isinstance(state, torch.Tensor):
        return "T"
    if isinstance(state, (tuple, list)):
        return "(" + ",".join(_layout(s) for s in state) + ")"
    return type(state).__name__


# ---------------------------------------------------------------------------------------- building
def _build(case):
    """The optzoo optimizer of a case, built exactly as the recorder built MXNet's."""
    kwargs = dict(case["kwargs"])
    if case["scheduler"]:
        sched = case["scheduler"]
        kwargs["lr_scheduler"] = getattr(optzoo.lr_scheduler, sched["class"])(**sched["kwargs"])
    if case["param_dict"]:
        kwargs["param_dict"] = {i: types.SimpleNamespace(lr_mult=lr_m, wd_mult=wd_m)
                                for i, lr_m, wd_m in case["param_dict"]}
    with warnings.catch_warnings():
        # the "cosine" commons overwrite the scheduler's base_lr on purpose
        warnings.filterwarnings("ignore", message=".*has been overwritten", category=UserWarning)
        opt = optzoo.optimizer.create(case["optimizer"], **kwargs)
    if case["lr_mult"]:
        opt.set_lr_mult(dict(case["lr_mult"]))
    if case["wd_mult"]:
        opt.set_wd_mult(dict(case["wd_mult"]))
    return opt


def _usable(case):
    """Load a recorded case; fail on an unexpected MXNet error."""
    case = specs.load_case(case)
    spec = specs.SPEC_BY_NAME[case["optimizer"]]
    if "mxnet_error" in case:
        # MXNet's fp32-state optimizers (AdaGrad, RMSProp, AdaDelta, Ftrl, GroupAdaGrad) reject fp64
        # weights: their kernels require the state dtype to equal the weight dtype.
        if "fp32_state" in spec.flags and case["dtype"] == "float64":
            pytest.skip(f"MXNet 1.9.1 cannot run this case ({case['mxnet_error'].splitlines()[-1]})")
        pytest.fail(f"MXNet 1.9.1 raised on {case['id']}, and the spec does not expect it: {case['mxnet_error']}")
    return case, spec


# ---------------------------------------------------------------------------------------- the replay
def _replay(case, spec):
    """Replay a case's recorded updates on optzoo, checking the noise draws and ``num_update``; yields
    ``(where, weight, state leaves, recorded weight, recorded state leaves)`` after each update."""
    arrays, cid = _arrays(case["optimizer"]), case["id"]
    opt = _build(case)
    weights = [_tensor(arrays[f"{cid}/w_init/{k}"]) for k in (0, 1)]
    states = [opt.create_state_multi_precision(k, weights[k]) for k in (0, 1)]
    for k in (0, 1):
        assert _layout(states[k]) == case["layout"][str(k)], f"state layout of index {k}"

    done = {0: 0, 1: 0}  # updates of each index so far: the row of its recorded arrays
    noise_calls = []
    for step, k in enumerate(case["sequence"]):
        r = done[k]
        done[k] += 1
        where = f"{cid} step {step} (index {k}, its update {r + 1})"
        if "stochastic" in spec.flags:
            noise = _tensor(arrays[f"{cid}/noise/{k}"][r])
            scale = float(arrays[f"{cid}/noise_scale/{k}"][r])

            def _noise(weight, lr, noise=noise, scale=scale, where=where):
                noise_calls.append(where)
                assert tuple(weight.shape) == tuple(noise.shape), f"{where}: noise for shape {tuple(weight.shape)}"
                assert math.isclose(math.sqrt(lr), scale, rel_tol=1e-12), \
                    f"{where}: noise scale sqrt(lr={lr}) differs from MXNet's {scale}"
                return noise.to(device=weight.device, dtype=weight.dtype)

            opt._noise = _noise
        grad = _tensor(arrays[f"{cid}/g/{k}"][r])  # fresh each call, as MXNet's
        opt.update_multi_precision(k, weights[k], grad, states[k])

        if "stochastic" in spec.flags:
            assert len(noise_calls) == step + 1, f"{where}: expected one noise draw per update"
        assert opt.num_update == case["num_update"][step], f"{where}: num_update"
        n_ref = sum(1 for key in arrays if key.startswith(f"{cid}/s/{k}/"))
        yield (where, weights[k], _leaves(states[k]), arrays[f"{cid}/w/{k}"][r],
               [arrays[f"{cid}/s/{k}/{j}"][r] for j in range(n_ref)])


# ---------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case_id", list(CASES))
def test_mxnet_parity(case_id):
    case, spec = _usable(CASES[case_id])
    loose = "fp16_norms" in spec.flags and case["dtype"] == "float16"
    for where, weight, leaves, weight_ref, leaves_ref in _replay(case, spec):
        _assert_matches(weight, weight_ref, f"{where}: weight", loose)
        assert len(leaves) == len(leaves_ref), f"{where}: {len(leaves)} state tensors, MXNet has {len(leaves_ref)}"
        for j, (leaf, ref) in enumerate(zip(leaves, leaves_ref)):
            _assert_matches(leaf, ref, f"{where}: state tensor {j}", loose)


# Bit-exact parity: optzoo computes every formula in MXNet's operation order and precision, with
# MXNet's scalars, square roots and reductions (``optzoo.optimizer._numerics``), so every weight and
# state tensor equals MXNet's bit for bit after every step. Except in the cases a Spec flag names,
# where max|optzoo - MXNet| <= k ulps of the tensor's largest magnitude holds instead (ulps of
# ``unit``, else of the tensor's own dtype), k the largest value measured over the recorded cases
# (over all steps and tensors), rounded up:
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_INT = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
_NOT_BIT_EXACT = {
    # flag: (case dtype it covers, unit, k, measured)
    # the fp32 norms of fp64 tensors are an fp32 ulp or so off, and so is lr', fp32 in MXNet too
    "fp64_norms": ("float64", torch.float32, 2, 1.34),
    # LARS' lambda from fp16 squares moves the momentum buffer by up to ~4e-4 of its largest entry
    "fp16_norms": ("float16", None, 4096, 3041),
    # LAMB's r1 over the fp16 weight: the fp32 master copy moves by ~2e-6 of its largest entry
    "fp16_weight_norm": ("float16", None, 32, 19),
}


def _assert_bit_exact(actual, expected, what, bound):
    expected = _tensor(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: dtype or shape"
    if bound is None:  # bit patterns, so that -0.0 and 0.0 differ too
        bits = _INT[expected.dtype]
        assert torch.equal(actual.contiguous().view(bits), expected.view(bits)), \
            f"{what}: not bit-exact, {int((actual != expected).sum())} of {actual.numel()} elements differ"
        return
    unit, k = bound
    scale = float(expected.double().abs().max())
    ulp = float(np.spacing(np.array(scale, dtype=_NUMPY[unit or expected.dtype])))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= k * ulp, f"{what}: off by {err / ulp:.3g} ulps of {scale:.3g}, the bound is {k}"


@pytest.mark.parametrize("case_id", list(CASES))
def test_mxnet_parity_bit_exact(case_id):
    case, spec = _usable(CASES[case_id])
    bound = next(((unit, k) for flag, (dtype, unit, k, _) in _NOT_BIT_EXACT.items()
                  if flag in spec.flags and case["dtype"] == dtype), None)
    for where, weight, leaves, weight_ref, leaves_ref in _replay(case, spec):
        _assert_bit_exact(weight, weight_ref, f"{where}: weight", bound)
        assert len(leaves) == len(leaves_ref), f"{where}: {len(leaves)} state tensors, MXNet has {len(leaves_ref)}"
        for j, (leaf, ref) in enumerate(zip(leaves, leaves_ref)):
            _assert_bit_exact(leaf, ref, f"{where}: state tensor {j}", bound)


def _list_form_cases():
    """A few cases per spec: unequal multipliers, multi-precision, clipping of the last variant.

    No scheduler: MXNet's LARS reads the scheduler once per call, so its momentum correction makes
    a list call differ from one-by-one calls when the lr changes.
    """
    out = []
    for spec in specs.SPECS:
        last = len(spec.variants) - 1
        out += [f"{spec.name}-v0-mult", f"{spec.name}-v0-fp16_mp", f"{spec.name}-v{last}-clip"]
    return out


@pytest.mark.parametrize("case_id", _list_form_cases())
def test_list_call_equals_one_by_one(case_id):
    """``update_multi_precision([0, 1], ...)`` gives exactly the numbers of two scalar calls."""
    assert case_id in CASES, f"{case_id} is not recorded"
    case, spec = _usable(CASES[case_id])
    arrays, cid = _arrays(case["optimizer"]), case["id"]
    runs = []
    for _ in range(2):
        opt = _build(case)
        if "stochastic" in spec.flags:
            opt._noise = lambda weight, lr: torch.full_like(weight, 0.1 * math.sqrt(lr))
        weights = [_tensor(arrays[f"{cid}/w_init/{k}"]) for k in (0, 1)]
        runs.append((opt, weights, [opt.create_state_multi_precision(k, weights[k]) for k in (0, 1)]))
    (opt_a, w_a, s_a), (opt_b, w_b, s_b) = runs
    for r in range(len(case["sequence"]) // 2):
        g = [_tensor(arrays[f"{cid}/g/{k}"][r]) for k in (0, 1)]
        opt_a.update_multi_precision([0, 1], w_a, [x.clone() for x in g], s_a)
        for k in (0, 1):
            opt_b.update_multi_precision(k, w_b[k], g[k].clone(), s_b[k])
        assert opt_a.num_update == opt_b.num_update, f"{cid} pair {r}: num_update"
        for k in (0, 1):
            ta, tb = [w_a[k]] + _leaves(s_a[k]), [w_b[k]] + _leaves(s_b[k])
            assert len(ta) == len(tb), f"{cid} pair {r}, index {k}: state layouts differ"
            for j, (a, b) in enumerate(zip(ta, tb)):
                assert torch.equal(a, b), f"{cid} pair {r}, index {k}, {'weight' if j == 0 else f'state {j - 1}'}"


@pytest.mark.parametrize("name", [s.name for s in specs.SPECS])
def test_fixture_files_in_sync_with_specs(name):
    """Every spec has its fixture files, recorded from the current case table (else: ``make fixtures``)."""
    for suffix in ("json", "npz"):
        assert (FIXTURES / f"{name}.{suffix}").exists(), f"missing fixture {name}.{suffix}: run `make fixtures`"
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    assert doc["mxnet_version"] == "1.9.1"
    recorded = [specs.load_case({k: v for k, v in c.items() if k not in _ADDED_KEYS}) for c in doc["cases"]]
    expected = [specs.load_case(c) for c in specs.cases(specs.SPEC_BY_NAME[name])]
    assert recorded == expected, f"{name} fixtures are stale: re-run `make fixtures`"
    keys = set(_arrays(name))
    for c in doc["cases"]:
        if "mxnet_error" not in c:
            assert f"{c['id']}/w/0" in keys and f"{c['id']}/w/1" in keys, f"{c['id']}: arrays missing"


def test_no_fixture_without_spec():
    names = {p.stem for p in FIXTURES.glob("*.json")} | {p.stem for p in FIXTURES.glob("*.npz")}
    assert names <= set(specs.SPEC_BY_NAME), f"fixtures without a spec: {sorted(names - set(specs.SPEC_BY_NAME))}"
