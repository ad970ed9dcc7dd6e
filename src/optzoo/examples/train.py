"""Train a small MLP classifier with optzoo's Trainer, in one process or data-parallel under torchrun.

One process::

    python -m optzoo.examples.train --optimizer nag --param momentum=0.9

Two workers on this machine (each takes half of every batch; the printed losses are the same as one
process's, up to rounding)::

    torchrun --nproc-per-node 2 -m optzoo.examples.train --kvstore dist_sync

With ``--optimizer signum`` the workers send 1-bit signs and step by their majority vote: a different
algorithm from one process's Signum, so its losses differ (e.g. 0.4826 vs 0.4581 after 5 epochs at
``--lr 0.01``).

``--kvstore dist_async`` (under torchrun, at least 3 processes): process rank 0 runs the parameter server,
the others train, each stepping with its own slice's size.

Data: a fixed synthetic 4-class problem (16 features, labels from a random teacher network, seed 0), so
the example needs no download. ``--batch-size`` is the total batch of one step, all workers together
(``trainer.step(batch_size)`` takes the total under ``dist_sync``). Rank 0 prints the mean loss and
accuracy over the data set after every epoch.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import optzoo

FEATURES, CLASSES, SAMPLES = 16, 4, 1024


def dataset(samples=SAMPLES):
    """``(x, y)``: inputs and the labels a random teacher MLP gives them (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, 32, generator=gen), torch.randn(32, CLASSES, generator=gen)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    return x, y


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES))


def _value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m optzoo.examples.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvstore", default="device",
                    help="device (one process), dist_sync, dist_device_sync or dist_async (under torchrun)")
    ap.add_argument("--optimizer", default="sgd", help="a registered optimizer name (default sgd)")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="another optimizer parameter, e.g. --param momentum=0.9 (repeatable)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64, help="total batch of one step, all workers together")
    ap.add_argument("--compression", default=None, metavar="2bit:THRESHOLD",
                    help="MXNet's 2-bit gradient compression, e.g. 2bit:0.5 (dist kvstores)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a worker waits for the others before failing (default $OPTZOO_DIST_TIMEOUT or 300)")
    args = ap.parse_args(argv)
    params = {"learning_rate": args.lr}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--param {item!r}: expected KEY=VALUE")
        params[key] = _value(value)
    args.optimizer_params = params
    args.compression_params = None
    if args.compression:
        kind, _, threshold = args.compression.partition(":")
        args.compression_params = {"type": kind}
        if threshold:
            args.compression_params["threshold"] = float(threshold)
    return args


def main(argv=None):
    args = parse_args(argv)
    distributed = args.kvstore.startswith("dist")
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    if args.kvstore == "dist_async" and rank == 0:  # process rank 0 serves; ranks 1.. train
        stats = optzoo.kvstore.run_server(timeout=args.timeout)
        print(f"server: {stats['updates_applied']} updates applied", flush=True)
        return
    kvstore = args.kvstore
    if distributed:
        kwargs = {} if args.timeout is None else {"timeout": args.timeout}
        if args.compression_params:
            kwargs["compression_params"] = args.compression_params
        kvstore = optzoo.kvstore.create(args.kvstore, **kwargs)
    elif args.compression_params:
        raise SystemExit("--compression needs a dist kvstore")
    # every worker starts from its own random init: the Trainer makes them all the same
    net = model(seed=rank)
    trainer = optzoo.Trainer(net.named_parameters(), args.optimizer, args.optimizer_params, kvstore=kvstore)
    world = trainer.kvstore.num_workers if trainer.kvstore is not None else 1
    rank = trainer.kvstore.rank if trainer.kvstore is not None else 0
    x, y = dataset()
    order = torch.Generator().manual_seed(1)
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x), generator=order)  # the same order on every worker
        for start in range(0, len(x), args.batch_size):
            idx = perm[start:start + args.batch_size]
            mine = torch.tensor_split(idx, world)[rank]  # this worker's slice of the batch
            F.cross_entropy(net(x[mine]), y[mine], reduction="sum").backward()
            # dist_sync sums the workers' gradients: the total batch; dist_async applies every push alone
            trainer.step(len(mine) if args.kvstore == "dist_async" else len(idx))
            net.zero_grad(set_to_none=True)
        with torch.no_grad():  # every worker holds the same weights: evaluate anywhere
            out = net(x)
            loss, acc = F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
        if rank == 0:  # (dist_async: worker 0's current weights)
            print(f"epoch {epoch} loss {loss:.6f} accuracy {acc:.4f}", flush=True)
    if trainer.kvstore is not None and rank == 0:
        print(f"bytes sent per worker: {trainer.kvstore.bytes_sent}", flush=True)
    if trainer.kvstore is not None:
        trainer.kvstore.close()


if __name__ == "__main__":
    main()
