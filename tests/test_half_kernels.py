"""fp16 weights without a master copy, for the rules whose MXNet kernels compute in the weight dtype (SGD, NAG,
LBSGD): MXNet 1.9.1's bits (``tests/fixtures/half.npz``, recorded by ``tests/fixtures/record_half.py``) on every
path of the executor: the reference path, one tensor compiled in place, the default path's large-tensor call, and
a compiled pack of several tensors.

mshadow's ``half_t`` rounds every operation, the kernels' float parameters included (``lr * wd``,
``momentum + 1``): ``prepare`` hands such products over as fp16 numbers, so the reference path (Python floats, fp32
arithmetic per operation) and the compiled kernels (0-d fp32 tensors, which meet an fp16 tensor as fp16 numbers)
read the same values.
"""
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import engine

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures"))
from record_half import CASES, STEPS  # noqa: E402

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "half.npz")
PARTS = 4  # the pack path: the weight as this many parameters


def run(case, fused, parts=1):
    arrays = {k.split("/", 1)[1]: FIXTURE[k] for k in FIXTURE.files if k.startswith(case["id"] + "/")}
    w0, grads = torch.from_numpy(arrays["w_init"]), torch.from_numpy(arrays["g"])
    params = [torch.nn.Parameter(w.clone()) for w in w0.chunk(parts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Accumulating with float16 ..."
        opt = ot.create(case["optimizer"], params, fused=fused, **case["kwargs"])
    ws, moms = [], []
    for step in range(STEPS):
        for p, g in zip(params, grads[step].chunk(parts)):
            p.grad = g.clone()
        opt.step()
        ws.append(torch.cat([p.detach().clone() for p in params]))
        mom = [opt.mx_state(p) for p in params]
        if mom[0] is not None:
            moms.append(torch.cat(mom))
    return arrays, ws, moms


def assert_mxnet_bits(case, fused, parts=1):
    arrays, ws, moms = run(case, fused, parts)
    for step in range(STEPS):
        expected = torch.from_numpy(arrays["w"][step])
        differ = int((ws[step] != expected).sum())
        assert differ == 0, f"{case['id']} step {step}: {differ} of {expected.numel()} weights differ from MXNet's"
        if "mom" in arrays:
            assert torch.equal(moms[step], torch.from_numpy(arrays["mom"][step])), f"{case['id']} step {step}: mom"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "compiled"])
def test_half_steps_are_mxnets(case, fused):
    assert_mxnet_bits(case, fused)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_half_steps_on_the_default_paths_are_mxnets(case, monkeypatch):
    """The default path's large-tensor call (the tensor counted as large) and its compiled pack."""
    monkeypatch.setattr(engine, "LARGE", 1024)
    assert_mxnet_bits(case, None)
    monkeypatch.setattr(engine, "LARGE", 1 << 16)
    assert_mxnet_bits(case, True, parts=PARTS)
