"""MXNet 1.9.1 parity of list (aggregated) updates through the Updater, bit for bit.

MXNet's Updater hands the optimizers whose ``aggregate_num`` is > 0 (SGD, LARS, LAMB: spec flag
"aggregated") lists of indices, one update call per ``aggregate_num`` of them; state kept per call (LARS's
momentum correction reads the learning rate once per call) then depends on that cut. The fixtures
(``tests/fixtures/aggregated.*``, recorded by ``record_mxnet.py`` from ``specs.aggregated_cases()``) hold
MXNet's weights and states after every Updater call; here ``optzoo.optimizer.get_updater`` replays them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import optzoo
import specs
from test_mxnet_parity import _assert_bit_exact, _build, _layout, _leaves, _tensor

FIXTURE = Path(__file__).parent / "fixtures" / "aggregated"
_ADDED_KEYS = ("layout", "num_update", "mxnet_error")  # what the recorder adds to a specs case


def _doc():
    return json.loads(FIXTURE.with_suffix(".json").read_text())


CASES = {c["id"]: c for c in _doc()["cases"]}


@functools.lru_cache(maxsize=None)
def _arrays():
    with np.load(FIXTURE.with_suffix(".npz")) as z:
        return {key: z[key] for key in z.files}


@pytest.mark.parametrize("case_id", list(CASES))
def test_aggregated_parity_bit_exact(case_id):
    case = specs.load_case(CASES[case_id])
    assert "mxnet_error" not in case, f"MXNet 1.9.1 raised on {case_id}: {case.get('mxnet_error')}"
    arrays, n = _arrays(), len(case["shapes"])
    opt = _build(case)
    updater = optzoo.optimizer.get_updater(opt)
    weights = [_tensor(arrays[f"{case_id}/w_init/{k}"]) for k in range(n)]
    for step, call in enumerate(case["calls"]):
        where = f"{case_id} step {step} (call {call})"
        updater(list(call), [_tensor(arrays[f"{case_id}/g/{k}"][step]) for k in call], [weights[k] for k in call])
        assert opt.num_update == case["num_update"][step], f"{where}: num_update"
        for k in range(n):
            assert _layout(updater.states[k]) == case["layout"][str(k)], f"{where}: state layout of index {k}"
            _assert_bit_exact(weights[k], arrays[f"{case_id}/w/{k}"][step], f"{where}: weight {k}", None)
            leaves = _leaves(updater.states[k])
            n_ref = sum(1 for key in arrays if key.startswith(f"{case_id}/s/{k}/"))
            assert len(leaves) == n_ref, f"{where}: index {k} has {len(leaves)} state tensors, MXNet {n_ref}"
            for j, leaf in enumerate(leaves):
                _assert_bit_exact(leaf, arrays[f"{case_id}/s/{k}/{j}"][step], f"{where}: state {k}.{j}", None)


def _aggregated_variants():
    return [pytest.param(s.name, vi, id=f"{s.name}-v{vi}")
            for s in specs.SPECS if "aggregated" in s.flags for vi in range(len(s.variants))]


@pytest.mark.parametrize("name, vi", _aggregated_variants())
def test_identical_parameters_stay_identical(name, vi):
    """Two equal parameters with equal gradients, stepped by one Updater call (one MXNet update call)
    under a scheduler that changes the lr every step, stay equal: every index of a call is treated alike."""
    sched = optzoo.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.1)
    opt = optzoo.optimizer.create(name, **dict(specs.SPEC_BY_NAME[name].variants[vi], lr_scheduler=sched,
                                               learning_rate=0.1))
    updater = optzoo.optimizer.get_updater(opt)
    gen = torch.Generator().manual_seed(vi)
    w = torch.randn(3, 4, generator=gen)
    weights = [w.clone(), w.clone()]
    for step in range(6):
        g = torch.randn(3, 4, generator=gen)
        updater([0, 1], [g.clone(), g.clone()], weights)
        assert torch.equal(weights[0], weights[1]), f"{name} v{vi} step {step}: the weights differ"
        for j, (a, b) in enumerate(zip(_leaves(updater.states[0]), _leaves(updater.states[1]))):
            assert torch.equal(a, b), f"{name} v{vi} step {step}: state tensor {j} differs"


def test_aggregated_fixtures_in_sync_with_specs():
    """The fixture was recorded from the current case table (else: ``make fixtures``)."""
    doc = _doc()
    assert doc["mxnet_version"] == "1.9.1"
    recorded = [specs.load_case({k: v for k, v in c.items() if k not in _ADDED_KEYS}) for c in doc["cases"]]
    assert recorded == [specs.load_case(c) for c in specs.aggregated_cases()], \
        "aggregated fixtures are stale: re-run `make fixtures`"


@pytest.mark.parametrize("spec", specs.SPECS, ids=lambda s: s.name)
def test_aggregated_flag_matches_the_optimizer(spec):
    """The spec flag, the registry capability and the Updater's behaviour (aggregate_num > 0) agree."""
    record = optzoo.optimizer.get_record(spec.name)
    flagged = "aggregated" in spec.flags
    assert ("aggregated" in record.capabilities) == flagged, f"{spec.name}: registry capability vs spec flag"
    assert (record.cls.aggregate_num > 0) == flagged, f"{spec.name}: aggregate_num {record.cls.aggregate_num}"


@pytest.mark.parametrize("name, vi", _aggregated_variants())
def test_trainer_fast_path_cuts_lists_as_the_updater(name, vi):
    """The Trainer's default path gives the numbers of its reference path (``fused=False``: the Updater,
    cutting the step into calls of aggregate_num) for more parameters than one call takes, under a
    scheduler that changes the lr every step (LARS: momentum correction in the step's first call only)."""
    def train(fused):
        gen = torch.Generator().manual_seed(vi)
        params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in enumerate(specs.AGG_SHAPES)}
        sched = optzoo.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.1)
        kw = dict(specs.SPEC_BY_NAME[name].variants[vi], learning_rate=0.1, lr_scheduler=sched)
        trainer = optzoo.Trainer(params, name, kw, fused=fused)
        for _ in range(4):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            trainer.step(2)
        return [p.detach() for p in params.values()]

    for k, (fast, reference) in enumerate(zip(train(None), train(False))):
        assert torch.equal(fast, reference), f"{name} v{vi}: parameter {k} differs"
