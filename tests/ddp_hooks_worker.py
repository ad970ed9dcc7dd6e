"""Worker bodies for test_ddp_hooks.py (spawned by dist_common.run): the same small MLP trained with DDP and an
optzoo.ddp comm hook, and with ``optzoo.Trainer(kvstore='dist_sync')``, on the same slices of the same batches."""
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import optzoo
import optzoo.ddp

BATCH, STEPS, HIDDEN, THRESHOLD = 12, 4, 16, 0.5
SMALL = 1e-4  # bucket_cap_mb: ~100 bytes, one or two parameters a bucket (buckets rebuilt after step 1)
SGD = ("SGD", "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3})
SIGNUM = ("Signum", "signum", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "wd_lh": 0.02})
SIGNSGD = ("Signum", "signum", {"learning_rate": 0.1, "momentum": 0.0, "wd": 0.01})
#: name -> (optimizer, hook, DDP arguments)
CONFIGS = {
    "twobit": (SGD, "twobit", {}),
    "twobit_small_static_view": (SGD, "twobit", {"bucket_cap_mb": SMALL, "static_graph": True,
                                                 "gradient_as_bucket_view": True}),
    "signum": (SIGNUM, "vote", {}),
    "signum_small_static_view": (SIGNUM, "vote", {"bucket_cap_mb": SMALL, "static_graph": True,
                                                  "gradient_as_bucket_view": True}),
    "signsgd": (SIGNSGD, "vote", {"bucket_cap_mb": SMALL}),
    # a process group of its own (not the default one), for DDP and the hook's state
    "twobit_own_group": (SGD, "twobit", {"process_group": "own"}),
    "signum_own_group": (SIGNUM, "vote", {"process_group": "own"}),
}
#: the collectives the hooks may call, watched during the training steps
WATCHED = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all_single", "send", "isend")


class MLP(torch.nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, HIDDEN), torch.nn.Linear(HIDDEN, 3)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # another start off rank 0: DDP and the Trainer must both broadcast rank 0's
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + rank)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def local_batch(rank, world, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)
    k = BATCH // world
    return x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]


def loss_fn(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum()  # summed over the local slice


def weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@contextlib.contextmanager
def counting(calls):
    """Record ``(name, bytes, dtype)`` of every watched torch.distributed call made in the block."""
    saved = {}
    for name in WATCHED:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            t = args[1] if _name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter",
                                     "reduce_scatter_tensor", "all_to_all_single") else args[0]
            t = t[0] if isinstance(t, (list, tuple)) else t
            group = kwargs.get("group", args[2] if _name == "all_gather_single" and len(args) > 2 else None)
            calls.append((_name, t.numel() * t.element_size(), str(t.dtype),
                          "default" if group is None or group is dist.group.WORLD else "own"))
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapper)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def trainer_run(rank, world, cfg):
    (_, name, params), hook, _ = cfg
    model = MLP(rank)
    compression = {"type": "2bit", "threshold": THRESHOLD} if hook == "twobit" else None
    trainer = optzoo.Trainer(dict(model.named_parameters()), name, dict(params), kvstore="dist_sync",
                             compression_params=compression)
    for step in range(STEPS):
        loss_fn(model, *local_batch(rank, world, step)).backward()
        trainer.step(BATCH)
        for p in model.parameters():
            p.grad = None
    return {"weights": weights(model), "bytes": trainer.kvstore.bytes_sent}


def ddp_run(rank, world, cfg):
    (face, _, params), hook, ddp_kwargs = cfg
    module = MLP(rank)
    group = None
    if ddp_kwargs.get("process_group") == "own":  # every rank makes it, in the same order
        group = dist.new_group(list(range(world)), backend="gloo")
        ddp_kwargs = dict(ddp_kwargs, process_group=group)
    model = DDP(module, **ddp_kwargs)
    if hook == "twobit":
        # the mean comes back: rescale_grad = world / total batch gives the Trainer's 1 / total batch on the sum
        opt = getattr(optzoo.torch, face)(model.parameters(), rescale_grad=world / BATCH, **params)
        state, fn = optzoo.ddp.TwoBitState(THRESHOLD, process_group=group), optzoo.ddp.twobit_hook
    else:  # each worker's own gradient: the Trainer's rescale_grad
        opt = getattr(optzoo.torch, face)(model.parameters(), rescale_grad=1 / BATCH, **params)
        state, fn = optzoo.ddp.SignumVoteState(opt, process_group=group), optzoo.ddp.signum_vote_hook
    buckets = []

    def watched(state, bucket):  # the bucket sizes, to check bytes_sent against the packing rule
        buckets.append(bucket.buffer().numel())
        return fn(state, bucket)
    if "bucket_cap_mb" in ddp_kwargs:
        model.register_comm_hook(state, watched)
    else:  # the hook itself (DDP checks its signature); one bucket a step
        model.register_comm_hook(state, fn)
        buckets = [sum(p.numel() for p in module.parameters())] * STEPS
    calls, bytes_sent, nonzero = [], [], []
    with counting(calls):
        for step in range(STEPS):
            loss_fn(model, *local_batch(rank, world, step)).backward()
            nonzero.append(sum(int((p.grad != 0).sum()) for p in module.parameters()))
            opt.step()
            opt.zero_grad()
            bytes_sent.append(state.bytes_sent)
    out = {"weights": weights(module), "bytes": bytes_sent, "calls": calls, "buckets": buckets, "nonzero": nonzero}
    if hook == "twobit":
        out["residuals"] = {n: state.residuals[p].clone() for n, p in module.named_parameters()}
    if hook == "vote":  # a step after a backward under no_sync (no vote) is refused before anything changes
        with model.no_sync():
            loss_fn(model, *local_batch(rank, world, 0)).backward()
        before = weights(module)
        try:
            opt.step()
            out["no_sync"] = None
        except RuntimeError as exc:
            out["no_sync"] = str(exc)
        out["unchanged"] = all(torch.equal(before[n], w) for n, w in weights(module).items())
    return out


def run_all(rank, world):
    return {name: {"trainer": trainer_run(rank, world, cfg), "ddp": ddp_run(rank, world, cfg)}
            for name, cfg in CONFIGS.items()}
