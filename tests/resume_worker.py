"""Shared by test_checkpoints.py and run by it in a fresh process: train, save, resume.

``python resume_worker.py DIR NAME...`` loads, for each optimizer NAME, the weights and trainer states
saved in DIR after 20 steps, trains 20 more steps and writes the final weights to DIR/NAME.final.
"""
import sys

import torch

import optzoo
from optzoo import lr_scheduler
from specs import SPEC_BY_NAME

STEPS = 20


def build(name, weights=None):
    spec = SPEC_BY_NAME[name]
    gen = torch.Generator().manual_seed(0)
    init = weights or [torch.randn(s, generator=gen) for s in spec.shapes]
    params = {f"p{k}.weight": torch.nn.Parameter(w.clone()) for k, w in enumerate(init)}
    kwargs = dict(spec.variants[-1], lr_scheduler=lr_scheduler.FactorScheduler(step=7, factor=0.5, base_lr=0.05))
    if "no_wd" not in spec.flags:
        kwargs["wd"] = 0.01
    trainer = optzoo.Trainer(params, name, kwargs)
    trainer.set_lr_mult({"p1.weight": 0.5})
    if "no_wd" not in spec.flags:
        trainer.set_wd_mult({"p0.weight": 2.0})
    return trainer, list(params.values())


def train(trainer, params, first_step, steps=STEPS):
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        trainer.step(batch_size=2)


def resume(folder, name):
    weights = torch.load(f"{folder}/{name}.weights", weights_only=True)
    trainer, params = build(name, weights)
    trainer.load_states(f"{folder}/{name}.states")
    torch.manual_seed(1234)  # SGLD's noise: the same draws in both processes
    train(trainer, params, STEPS)
    torch.save([p.detach() for p in params], f"{folder}/{name}.final")


if __name__ == "__main__":
    for n in sys.argv[2:]:
        resume(sys.argv[1], n)
