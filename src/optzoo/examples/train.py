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
import math
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
    """A ``--param`` value: JSON (``0.9``, ``true``, ``null``), Python's ``True`` / ``False`` / ``None`` spellings,
    or else the text itself (the optimizer's checks refuse what it cannot take, naming it)."""
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _positive(kind, low):
    """An argparse type: a finite ``kind`` (int or float) >= ``low`` (> 0 when ``low`` is 0.0)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (low == 0.0 and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected "
                                             + (f"an integer >= {low}" if kind is int else "a finite number > 0"))
        return value
    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def parse_args(argv=None):
    """The arguments, every one checked (optimizer and hyperparameters, kvstore, compression) before any
    work starts: a bad one ends with argparse's usage, a message naming it and exit status 2."""
    ap = argparse.ArgumentParser(prog="python -m optzoo.examples.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvstore", default="device",
                    help="device (one process), dist_sync, dist_device_sync or dist_async (under torchrun)")
    ap.add_argument("--optimizer", default="sgd", help="a registered optimizer name (default sgd)")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="another optimizer parameter, e.g. --param momentum=0.9 (repeatable)")
    ap.add_argument("--epochs", type=_positive(int, 1), default=5)
    ap.add_argument("--batch-size", type=_positive(int, 1), default=64,
                    help="total batch of one step, all workers together")
    ap.add_argument("--compression", default=None, metavar="2bit:THRESHOLD",
                    help="MXNet's 2-bit gradient compression, e.g. 2bit:0.5 (dist kvstores)")
    ap.add_argument("--timeout", type=_positive(float, 0.0), default=None,
                    help="seconds a worker waits for the others before failing (default $OPTZOO_DIST_TIMEOUT or 300)")
    args = ap.parse_args(argv)
    try:
        kind = optzoo.kvstore.normalize(args.kvstore)
    except (ValueError, NotImplementedError) as exc:
        ap.error(f"--kvstore {args.kvstore!r}: {exc}")
    if kind in optzoo.kvstore.DIST_KINDS:
        args.kvstore = kind
    params = {"learning_rate": args.lr}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--param {item!r}: expected KEY=VALUE")
        params[key] = _value(value)
    try:  # the optimizer's own checks: an unknown name or a bad value is named now, not after a traceback
        optzoo.optimizer.create(args.optimizer, **params)
    except (ValueError, TypeError) as exc:
        ap.error(f"--optimizer {args.optimizer!r} with {params}: {exc}")
    args.optimizer_params = params
    args.compression_params = None
    if args.compression:
        if kind not in optzoo.kvstore.DIST_KINDS:
            ap.error(f"--compression {args.compression!r}: needs a dist kvstore (--kvstore dist_sync)")
        ctype, _, threshold = args.compression.partition(":")
        if ctype != "2bit":
            ap.error(f"--compression {args.compression!r}: expected 2bit or 2bit:THRESHOLD")
        args.compression_params = {"type": ctype}
        if threshold:
            try:
                value = float(threshold)
            except ValueError:
                value = float("nan")
            if not (math.isfinite(value) and value > 0):
                ap.error(f"--compression {args.compression!r}: the threshold {threshold!r} is invalid: "
                         "expected a finite number > 0")
            args.compression_params["threshold"] = value
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
