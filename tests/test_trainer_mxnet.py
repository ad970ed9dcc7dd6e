"""optzoo.Trainer against MXNet 1.9.1's gluon.Trainer: the same MLP, weights and data, 30 steps.

Fixture: tests/fixtures/trainer/ (recorded by tests/fixtures/record_trainer.py in the MXNet side venv).
The error measure is per tensor, max|optzoo - mxnet| / max|mxnet|: weights near zero carry the two
frameworks' gradient rounding (~1e-6 in fp32) as large element-wise relative errors.
"""
import json
import pathlib

import numpy as np
import pytest
import torch

import optzoo
from optzoo import lr_scheduler
from specs import SPEC_BY_NAME

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "trainer"
INDEX = json.loads((FIXTURES / "index.json").read_text())
INPUTS = np.load(FIXTURES / "inputs.npz")
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# fp64 LAMB: MXNet adds fp64 squares into an fp32 accumulator element by element for its norms, which
# optzoo does not emulate in fp64 (spec flag fp64_norms); measured 7.7e-9 after 30 steps
TOLERANCE_FP32_TRUST_RATIO = 1e-7


def mlp(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 5)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(INPUTS[f"w_init/{name}"]))
    return model


def optimizer_params(cfg):
    params = dict(cfg["optimizer_params"])
    sched = params.pop("lr_scheduler", None)
    if sched:
        params["lr_scheduler"] = getattr(lr_scheduler, sched["class"])(**sched["kwargs"])
    return params


@pytest.mark.parametrize("cfg", INDEX["configs"], ids=lambda c: f"{c['name']}-{c['dtype']}")
def test_trainer_equals_gluon_trainer(cfg):
    dtype = getattr(torch, cfg["dtype"])
    model = mlp(dtype)
    trainer = optzoo.Trainer(dict(model.named_parameters()), cfg["optimizer"], optimizer_params(cfg))
    if cfg["lr_mult"]:
        trainer.set_lr_mult(cfg["lr_mult"])
    if cfg["wd_mult"]:
        trainer.set_wd_mult(cfg["wd_mult"])
    ref = np.load(FIXTURES / cfg["file"])
    tol = TOLERANCE[cfg["dtype"]]
    if cfg["dtype"] == "float64" and "fp32_trust_ratio" in SPEC_BY_NAME[cfg["optimizer"]].flags:
        tol = TOLERANCE_FP32_TRUST_RATIO
    xs = torch.from_numpy(INPUTS["x"]).to(dtype)
    ys = torch.from_numpy(INPUTS["y"])
    for step in range(INDEX["steps"]):
        loss = torch.nn.functional.cross_entropy(model(xs[step]), ys[step], reduction="sum")
        loss.backward()
        trainer.step(batch_size=INDEX["batch_size"])
        model.zero_grad()
        assert trainer.learning_rate == pytest.approx(ref["lr"][step], rel=1e-12)
        for name, p in model.named_parameters():
            expected = torch.from_numpy(ref[f"w/{name}"][step])
            err = (p.detach() - expected).abs().max() / expected.abs().max()
            assert err <= tol, f"{cfg['name']} {cfg['dtype']} step {step} {name}: relative error {err:.3g} > {tol}"
