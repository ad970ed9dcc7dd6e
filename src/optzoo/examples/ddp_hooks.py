"""Train the MLP of :mod:`optzoo.examples.train` with plain ``DistributedDataParallel`` and an optzoo comm hook.

Two workers on this machine (gloo on CPU; NCCL when CUDA is available)::

    torchrun --standalone --nproc-per-node 2 -m optzoo.examples.ddp_hooks --hook twobit --threshold 0.5
    torchrun --standalone --nproc-per-node 3 -m optzoo.examples.ddp_hooks --hook signum --lr 0.005

``--hook twobit``: MXNet's 2-bit compression with error feedback (``optzoo.ddp.twobit_hook``) under an
``optzoo.torch.SGD`` with momentum; ``--hook signum``: Signum's majority vote, 1 bit per element
(``optzoo.ddp.signum_vote_hook``); ``--hook none``: DDP's own fp32 all-reduce, for comparison. Without torchrun
it runs as one process. Rank 0 prints the loss and accuracy after every epoch and this worker's bytes per step.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import optzoo
import optzoo.ddp
from optzoo.examples.train import _positive, dataset, model


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m optzoo.examples.ddp_hooks",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--hook", choices=("twobit", "signum", "none"), default="twobit")
    ap.add_argument("--threshold", type=_positive(float, 0.0), default=0.5, help="2-bit threshold (default 0.5)")
    ap.add_argument("--lr", type=_positive(float, 0.0), default=None,
                    help="learning rate (default 0.05 for SGD, 0.005 for Signum)")
    ap.add_argument("--epochs", type=_positive(int, 1), default=5)
    ap.add_argument("--batch-size", type=_positive(int, 1), default=64, help="total batch of one step, all workers")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if "RANK" not in os.environ:  # one process, without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    net = model(seed=rank).to(device)  # DDP broadcasts rank 0's weights
    ddp = DDP(net)
    if args.hook == "signum":
        # each worker steps with its own gradient: rescale_grad = 1 / total batch, as the Trainer's dist_sync
        opt = optzoo.torch.Signum(ddp.parameters(), lr=args.lr or 0.005, momentum=0.9,
                                  rescale_grad=1 / args.batch_size)
        state = optzoo.ddp.SignumVoteState(opt)
        ddp.register_comm_hook(state, optzoo.ddp.signum_vote_hook)
    else:
        # the hooks hand back the mean over the workers: rescale_grad = world / total batch
        opt = optzoo.torch.SGD(ddp.parameters(), lr=args.lr or 0.05, momentum=0.9,
                               rescale_grad=world / args.batch_size)
        state = None
        if args.hook == "twobit":
            state = optzoo.ddp.TwoBitState(args.threshold)
            ddp.register_comm_hook(state, optzoo.ddp.twobit_hook)
    x, y = (t.to(device) for t in dataset())
    order = torch.Generator().manual_seed(1)
    steps = 0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x), generator=order)  # the same order on every worker
        for start in range(0, len(x), args.batch_size):
            mine = torch.tensor_split(perm[start:start + args.batch_size], world)[rank].to(device)
            F.cross_entropy(ddp(x[mine]), y[mine], reduction="sum").backward()
            opt.step()
            opt.zero_grad()
            steps += 1
        with torch.no_grad():
            out = net(x)
            loss, acc = F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch} loss {loss:.6f} accuracy {acc:.4f}", flush=True)
    if rank == 0:
        n = sum(p.numel() for p in net.parameters())
        sent = state.bytes_sent / steps if state is not None else 4.0 * n
        print(f"bytes per step per worker: {sent:.0f} ({args.hook}; fp32 all-reduce: {4 * n})", flush=True)
    del ddp  # DDP's reducer goes before its process group (else a worker may abort at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
