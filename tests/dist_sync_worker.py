"""Worker bodies for test_dist_sync.py, run in spawned processes by dist_common.run (and, for the
one-process references, in the test process itself with ``world=1``)."""
import time

import torch

import optzoo
from dist_common import freeze_me, kill_me, mark

BATCH, STEPS = 12, 4
NAMES = ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")

#: (name, optimizer, params, fused, bucket_bytes): the invariance grid
CONFIGS = [
    ("sgd", "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3}, None, 64),
    ("adam", "adam", {"learning_rate": 0.01, "wd": 1e-3}, False, None),
    ("lamb", "lamb", {"learning_rate": 0.01, "wd": 1e-2}, None, 64),
    ("lbsgd", "lbsgd", {"learning_rate": 0.1, "momentum": 0.9, "batch_scale": 2, "warmup_epochs": 2,
                        "updates_per_epoch": 2}, None, None),
    ("lars", "lars", {"learning_rate": 0.1, "momentum": 0.9, "eta": 0.01, "wd": 1e-3}, False, 100),
    ("nag", "nag", {"learning_rate": 0.05, "momentum": 0.9}, None, None),
    ("adamc", "adam", {"learning_rate": 0.01, "wd": 1e-3}, True, None),
]


def init_weights():
    gen = torch.Generator().manual_seed(3)
    return {"fc1.weight": torch.randn(5, 6, generator=gen) * 0.5, "fc1.bias": torch.randn(5, generator=gen) * 0.1,
            "fc2.weight": torch.randn(3, 5, generator=gen) * 0.5, "fc2.bias": torch.zeros(3)}


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)


def loss_fn(p, x, y):
    h = torch.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
    return 0.5 * ((h @ p["fc2.weight"].T + p["fc2.bias"] - y) ** 2).sum()


def train(rank, world, cfg):
    """``world`` workers each on their slice of every batch; the final weights."""
    _, opt, params, fused, bucket_bytes = cfg
    # a different start off rank 0: the Trainer must broadcast rank 0's weights
    p = {n: torch.nn.Parameter(w + rank) for n, w in init_weights().items()}
    kvstore = "device"
    if world > 1:
        kvstore = optzoo.kvstore.create("dist_sync", timeout=30, **({"bucket_bytes": bucket_bytes}
                                                                    if bucket_bytes else {}))
    trainer = optzoo.Trainer(p, opt, dict(params), kvstore=kvstore, fused=fused)
    k = BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        loss_fn(p, x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]).backward()
        trainer.step(BATCH)
        for w in p.values():
            w.grad = None
    return {n: w.detach().clone() for n, w in p.items()}


def signum(rank, world, momentum):
    """Three Signum/SignSGD steps on per-worker random gradients: everything the test needs to recompute
    the vote (weights before each step, this worker's gradients and momenta) and the bytes sent."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, 37))
    v = torch.nn.Parameter(torch.linspace(2, 3, 6).view(2, 3))
    trainer = optzoo.Trainer({"w": w, "v": v}, "signum",
                             {"learning_rate": 0.1, "momentum": momentum, "wd": 0.01, "wd_lh": 0.02},
                             kvstore="dist_sync")
    gen = torch.Generator().manual_seed(10 + rank)
    out = {"before": [], "grads": [], "moms": [], "bytes": [], "after": None}
    for step in range(3):
        grads = {"w": torch.randn(37, generator=gen), "v": torch.randn(2, 3, generator=gen)}
        grads["w"][0] = 0.0  # a zero on every worker: sent as +1
        out["before"].append({"w": w.detach().clone(), "v": v.detach().clone()})
        out["grads"].append(grads)
        w.grad, v.grad = grads["w"].clone(), grads["v"].clone()
        trainer.step(4)
        states = trainer._updater.states
        out["moms"].append({"w": None if states[1] is None else states[1].clone(),
                            "v": None if states[0] is None else states[0].clone()})
        out["bytes"].append(trainer.kvstore.bytes_sent)
    out["after"] = {"w": w.detach().clone(), "v": v.detach().clone()}
    return out


def twobit(rank, world, threshold):
    """Three SGD steps (lr 1, batch 1) with 2-bit compression on exactly representable gradients: the
    summed gradients every worker received, its own gradients, the bytes sent."""
    w = torch.nn.Parameter(torch.zeros(21))
    v = torch.nn.Parameter(torch.zeros(2, 5))
    trainer = optzoo.Trainer({"w": w, "v": v}, "sgd", {"learning_rate": 1.0},
                             kvstore="dist_sync", compression_params={"type": "2bit", "threshold": threshold})
    gen = torch.Generator().manual_seed(20 + rank)
    out = {"grads": [], "sums": [], "bytes": [], "after": None}
    for step in range(3):
        grads = {"w": torch.randint(-48, 49, (21,), generator=gen) / 64.0,
                 "v": torch.randint(-48, 49, (2, 5), generator=gen) / 64.0}
        out["grads"].append(grads)
        w.grad, v.grad = grads["w"].clone(), grads["v"].clone()
        trainer.step(1)
        out["sums"].append({"w": w.grad.clone(), "v": v.grad.clone()})
        out["bytes"].append(trainer.kvstore.bytes_sent)
    out["after"] = {"w": w.detach().clone(), "v": v.detach().clone()}
    return out


def mismatch(rank, world):
    """The last rank builds another model: every rank's Trainer must refuse to start, naming it."""
    p = {"w": torch.nn.Parameter(torch.zeros(3 + (rank == world - 1)))}
    try:
        optzoo.Trainer(p, "sgd", kvstore="dist_sync")
    except optzoo.kvstore.DistributedError as exc:
        return exc.ranks, str(exc)
    return None


def numerics(rank, world, path):
    """Everything numeric in one launch (starting processes is the expensive part)."""
    return {"mismatch": mismatch(rank, world),
            "train": {cfg[0]: train(rank, world, cfg) for cfg in CONFIGS}, "partial": partial(rank, world, path),
            "signum": signum(rank, world, 0.9), "signsgd": signum(rank, world, 0.0),
            "twobit": twobit(rank, world, 0.5)}


def fault(rank, world, victim, how, timeout):
    """Train until step 2, where ``victim`` is SIGKILLed (``how='kill'``), SIGSTOPped (``'freeze'``) or
    sleeps; the others must raise."""
    p = {"w": torch.nn.Parameter(torch.ones(8))}
    trainer = optzoo.Trainer(p, "sgd", {"learning_rate": 0.1},
                             kvstore=optzoo.kvstore.create("dist_sync", timeout=timeout))
    for step in range(4):
        if step == 2 and rank == victim:
            if how == "kill":
                kill_me()
            if how == "freeze":
                freeze_me()
            time.sleep(60)
        mark()
        p["w"].grad = torch.ones(8)
        trainer.step(1)
    return "finished"


def partial(rank, world, path):
    """A gradient only rank 0 has, the allreduce_grads + update split, and a checkpoint round trip."""
    import os
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    trainer = optzoo.Trainer({"a": a, "b": b}, "sgd", {"learning_rate": 1.0, "momentum": 0.5},
                             kvstore="dist_sync")
    out = {"a": [], "b": []}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # b is fresh on rank 0: no stale warning anywhere
        for step in range(3):
            a.grad = torch.full((3,), float(rank + 1 + step))
            b.grad = torch.full((2,), 10.0 * (step + 1)) if rank == 0 else None
            if step == 1:
                trainer.allreduce_grads()
                trainer.update(1)
            else:
                trainer.step(1)
            out["a"].append(a.detach().clone())
            out["b"].append(b.detach().clone())
    trainer.save_states(path)
    out["saved_visible"] = os.path.exists(path)  # save_states waits for rank 0's write
    trainer.load_states(path)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    trainer.step(1)
    out["resumed"] = (a.detach().clone(), b.detach().clone())
    return out
