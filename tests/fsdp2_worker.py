"""Worker of test_fsdp2.py: every optimizer of the spec table steps FSDP2-sharded (DTensor) parameters."""
import torch
import torch.distributed as dist

import optzoo.torch as ot
from specs import SPECS

STEPS = 3


def hyper(spec):
    kw = dict(spec.variants[0])
    if "no_wd" not in spec.flags:
        kw["wd"] = 0.01
    return kw


def shapes(spec):
    """The spec's shapes with more rows, so that two processes each hold part of every parameter."""
    return [(s[0] * 3,) + tuple(s[1:]) for s in spec.shapes]


def grads(spec, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in shapes(spec)]


def init(spec):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in shapes(spec)]


def single(spec, fused=False):
    """One process on the full tensors: the weights after STEPS steps (seeded: SGLD's noise keys)."""
    torch.manual_seed(11)
    params = [torch.nn.Parameter(w) for w in init(spec)]
    opt = ot.create(spec.name, params, fused=fused, **hyper(spec))
    for step in range(STEPS):
        for p, g in zip(params, grads(spec, step)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def sharded(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for spec in SPECS:
        torch.manual_seed(11)  # every process draws SGLD's keys as one process would
        module = torch.nn.Module()
        module.params = torch.nn.ParameterList([torch.nn.Parameter(w) for w in init(spec)])
        fully_shard(module, mesh=mesh)
        params = list(module.parameters())
        opt = ot.create(spec.name, params, **hyper(spec))
        for step in range(STEPS):
            for p, g in zip(params, grads(spec, step)):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        state_types = sorted({type(v).__name__ for st in opt.state.values() for v in st.values()})
        out[spec.name] = {"weights": [p.full_tensor() for p in params], "state_types": state_types}
    dist.barrier()
    return out
