"""Worker bodies for test_dist_sparse.py: row-sparse gradients (``nn.Embedding(sparse=True)``) over the
distributed kvstores.

``dist_sync``: run in spawned processes by ``dist_common.run`` (and, for the one-process references, in the
test process itself with ``world=1``). ``dist_async``: ``python dist_sparse_worker.py INIT_METHOD OUTDIR`` forks
a server (rank 0) and two workers (ranks 1, 2), as dist_async_worker.py does.
"""
import os
import sys
import time
import warnings

import torch

import optzoo

import dist_common

VOCAB, DIM = 1000, 8
EMB, NAMES = "emb.weight", ("emb.weight", "fc.bias", "fc.weight")

#: (name, optimizer, params): the invariance grid (SGD and Adam lazy, AdaGrad lazy as MXNet's, Adam standard)
CONFIGS = [
    ("sgd_mom_lazy", "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3}),
    ("adam_lazy", "adam", {"learning_rate": 0.01, "wd": 1e-3}),
    ("adagrad", "adagrad", {"learning_rate": 0.1}),
    ("adam_standard", "adam", {"learning_rate": 0.01, "wd": 1e-3, "lazy_update": False}),
]

#: Per step, per worker: the ids each sample looks up (3 per sample). Overlapping rows across the workers,
#: a row repeated within a worker, an empty batch on worker 1 (step 2: a gradient without rows) and no
#: backward at all on worker 1 (step 3: no gradient).
IDS = [
    [[[1, 5, 5], [9, 1, 400]], [[5, 7, 7], [999, 0, 1]]],
    [[[2, 3, 4], [2, 2, 2]], [[3, 4, 500], [600, 2, 3]]],
    [[[10, 11, 12], [11, 13, 5]], []],
    [[[7, 8, 9]], None],
]
STEPS = len(IDS)


def model(rank=0):
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(VOCAB, DIM, sparse=True), "fc": torch.nn.Linear(DIM, 1)})
    if rank:  # a different start off rank 0: the Trainer must broadcast rank 0's weights
        with torch.no_grad():
            for p in m.parameters():
                p.add_(rank)
    return m


def targets(step, n):
    return torch.linspace(-1, 1, n) * (step + 1)


def forward_loss(m, ids, y):
    x = m["emb"](torch.tensor(ids, dtype=torch.int64).view(-1, 3)).sum(1)
    return 0.5 * ((m["fc"](x).squeeze(1) - y) ** 2).sum()


def batch_of(step, rank, world):
    """This worker's ids and targets (world 1: the whole batch, workers' slices back to back)."""
    parts = IDS[step]
    ys = targets(step, sum(len(p or []) for p in parts))
    if world == 1:
        ids = [s for p in parts for s in (p or [])]
        return ids, ys
    start = sum(len(p or []) for p in parts[:rank])
    mine = parts[rank]
    return mine, None if mine is None else ys[start:start + len(mine)]


def distinct_rows(step, rank):
    return len({i for s in (IDS[step][rank] or []) for i in s})


def train(rank, world, cfg):
    """``world`` workers each on their slice of every batch: the final weights, every step's bytes_sent,
    and the rows the run touched."""
    _, opt, params = cfg
    m = model(rank)
    kvstore = optzoo.kvstore.create("dist_sync", timeout=30) if world > 1 else "device"
    trainer = optzoo.Trainer(dict(m.named_parameters()), opt, dict(params), kvstore=kvstore)
    sent = []
    for step in range(STEPS):
        for p in m.parameters():
            p.grad = None
        ids, y = batch_of(step, rank, world)
        if ids is not None:
            forward_loss(m, ids, y).backward()
        total = len(IDS[step][0]) + sum(len(p or []) for p in IDS[step][1:])
        trainer.step(total)
        if world > 1:
            assert m["emb"].weight.grad.layout == torch.sparse_coo  # the sum stayed row-sparse
            sent.append(trainer.kvstore.bytes_sent)
    return {"weights": {n: p.detach().clone() for n, p in m.named_parameters()}, "bytes": sent}


def sums(rank, world):
    """allreduce_grads on dyadic gradients (exact in any summation order): the summed gradient of every
    worker; then a worker with a dense gradient for the table (summed densely everywhere)."""
    w = torch.nn.Parameter(torch.zeros(VOCAB, DIM))
    b = torch.nn.Parameter(torch.zeros(3))
    trainer = optzoo.Trainer({EMB: w, "b": b}, "sgd", {"learning_rate": 1.0}, kvstore="dist_sync")
    kv = trainer.kvstore
    out = {"sparse": [], "dense": None, "bytes": []}
    for step in range(STEPS):
        ids = IDS[step][rank]
        w.grad = None if ids is None else _dyadic(ids, rank)
        b.grad = torch.full((3,), 0.25 * (rank + 1))
        before = kv.bytes_sent
        trainer.allreduce_grads()
        out["sparse"].append(w.grad.clone())
        out["bytes"].append(kv.bytes_sent - before)
    w.grad = _dyadic(IDS[0][rank], rank)
    if rank == 1:
        w.grad = w.grad.to_dense()
    trainer.allreduce_grads()
    out["dense"] = w.grad.clone()
    return out


def _dyadic(ids, rank):
    """The gradient of sum(c * emb(ids)) for dyadic c (uncoalesced, as Embedding gives it)."""
    flat = torch.tensor([i for s in ids for i in s], dtype=torch.int64)
    values = (torch.arange(flat.numel() * DIM, dtype=torch.float32).view(-1, DIM) + 1 + 100 * rank) / 8
    return torch.sparse_coo_tensor(flat.unsqueeze(0), values, (VOCAB, DIM), check_invariants=False)


def refusals(rank, world):
    """2-bit compression, the Signum vote and a malformed gradient on one worker: every worker raises (none
    hangs), nothing changes; a good step works afterwards."""
    out = {}
    for kind, opt, extra in (("twobit", "sgd", {"compression_params": {"type": "2bit", "threshold": 0.5}}),
                             ("signum", "signum", {})):
        m = model()
        trainer = optzoo.Trainer(dict(m.named_parameters()), opt, {"learning_rate": 0.1}, kvstore="dist_sync",
                                 **extra)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        if rank == 0:  # the table is row-sparse on rank 0 only: rank 1 has no gradient for it
            forward_loss(m, IDS[0][0], targets(0, 2)).backward()
        else:
            m["fc"].weight.grad, m["fc"].bias.grad = torch.ones(1, DIM), torch.ones(1)
        out[kind] = _raised(lambda: trainer.step(4))
        out[kind + "_unchanged"] = all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())
        out[kind + "_states"] = len(trainer._updater.states)
        trainer.kvstore.close()
    m = model()
    trainer = optzoo.Trainer(dict(m.named_parameters()), "adam", {"learning_rate": 0.1},
                             kvstore=optzoo.kvstore.create("dist_sync", timeout=30))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    forward_loss(m, IDS[0][rank], targets(0, 2)).backward()
    if rank == 1:  # sparse_dim 2: not row-sparse
        m["emb"].weight.grad = m["emb"].weight.grad.coalesce().to_dense().to_sparse(2)
    start = time.monotonic()
    out["bad"] = _raised(lambda: trainer.step(4))
    out["bad_seconds"] = time.monotonic() - start
    out["bad_unchanged"] = all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())
    for p in m.parameters():
        p.grad = None
    forward_loss(m, IDS[0][rank], targets(0, 2)).backward()
    trainer.step(4)
    out["after"] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return out


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return type(exc).__name__, str(exc), tuple(getattr(exc, "ranks", ()))
    return None


def everything(rank, world):
    """Every dist_sync case in one launch (starting processes is the expensive part)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on sparse invariant checks
        return {"train": {cfg[0]: train(rank, world, cfg) for cfg in CONFIGS}, "sums": sums(rank, world),
                "refusals": refusals(rank, world)}


# ============================================================================ dist_async (real processes)
#: Per worker, per push: the rows it looks up; dyadic gradients and lazy plain SGD make every update exact,
#: so the server's final weights do not depend on the order the pushes arrive in.
ASYNC_IDS = {1: [[1, 2, 2], [3], []], 2: [[2, 900], [1, 4], [999]]}
ASYNC_LR = 0.5


def async_init():
    return torch.arange(VOCAB * DIM, dtype=torch.float32).view(VOCAB, DIM) / 16


def async_grad(rank, step):
    ids = torch.tensor(ASYNC_IDS[rank][step], dtype=torch.int64)
    values = torch.full((ids.numel(), DIM), 0.25 * (rank + step + 1))
    return torch.sparse_coo_tensor(ids.unsqueeze(0), values, (VOCAB, DIM), check_invariants=False)


def async_role(rank, world, init_method, outdir):
    from optzoo.kvstore.dist_async import DistAsync, run_server
    if rank == 0:
        stats = run_server(timeout=30, rank=0, world_size=world, init_method=init_method)
        torch.save(stats, os.path.join(outdir, "server.pt"))
        return
    kv = DistAsync(timeout=30, rank=rank, world_size=world, init_method=init_method)
    if rank == int(os.environ.get("ASYNC_LATE_RANK", "0")):  # registers after the other worker's first 2 pushes
        deadline = time.monotonic() + 20
        while kv.server_stats()["pushes_received"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    w = torch.nn.Parameter(async_init() + rank)  # the first registration wins
    b = torch.nn.Parameter(torch.zeros(2))
    trainer = optzoo.Trainer({EMB: w, "b": b}, "sgd", {"learning_rate": ASYNC_LR}, kvstore=kv)
    out = {"after_push": [], "bytes": []}
    for step in range(len(ASYNC_IDS[rank])):
        w.grad, b.grad = async_grad(rank, step), torch.ones(2)
        trainer.step(1)
        out["after_push"].append(w.detach().clone())
        out["bytes"].append(kv.bytes_sent)
    deadline = time.monotonic() + 20
    while kv.server_stats()["pushes_received"] < sum(map(len, ASYNC_IDS.values())):
        if time.monotonic() > deadline:
            raise TimeoutError("the other worker's pushes never arrived")
        time.sleep(0.02)
    kv.pull([0, 1], [b, w])  # trainer order: sorted names ('b', 'emb.weight')
    out["final"] = w.detach().clone()
    kv.close()
    torch.save(out, os.path.join(outdir, f"worker{rank}.pt"))


def _async_child(rank, init_method, outdir):
    torch.set_num_threads(1)
    async_role(rank, 3, init_method, outdir)


def main():
    """Import torch once, then fork the server and the two workers; exit non-zero if one failed."""
    init_method, outdir = sys.argv[1:3]
    pids = {}
    for rank in range(3):
        pids[rank] = dist_common.fork(_async_child, rank, init_method, outdir)
    failed = [r for r, pid in pids.items() if os.waitpid(pid, 0)[1] != 0]
    if failed:
        print(f"ranks failed: {failed}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
