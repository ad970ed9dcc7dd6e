"""One first call, in a fresh process: ``python path/to/_first_call_worker.py JOB_JSON``, never imported.

Run by :mod:`optzoo.bench.first_call` with the inductor cache directory it chose in the environment.
Imports torch and optzoo.torch only, as a user's program does (timed apart), starts the compiler once on a
trivial function (timed apart: the process's one-time cost), builds ``optzoo.torch.create(name, params, ...)``
over ``tensors`` tensors of one shape, and times its first ``step()`` and its second; prints one JSON object on stdout.
"""
import json
import os
import sys
import time

# Run by path, so this folder is sys.path[0]: its modules (load, peers, timing...) would shadow top-level names.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]


def main(job):
    start = time.perf_counter()
    import torch

    import optzoo.torch
    imported = time.perf_counter() - start
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    # the process's one-time compiler start-up (importing inductor, probing the CPU's vector ISA, the C++
    # toolchain's first run), paid once per process whatever it compiles: timed apart from the optimizer's
    # own first step, on a trivial function
    start = time.perf_counter()
    torch.compile(lambda x: x + 1, dynamic=False)(torch.zeros(4, device=device))
    startup = time.perf_counter() - start
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, job["dtype"])
    gen = torch.Generator().manual_seed(job["seed"])
    params = [torch.nn.Parameter(torch.randn(job["shape"], generator=gen).to(device, dtype))
              for _ in range(job.get("tensors", 1))]
    for param in params:
        param.grad = torch.randn(job["shape"], generator=gen).to(device, dtype)
    opt = optzoo.torch.create(job["name"], params, fused=job["fused"], multi_precision=job["multi_precision"],
                              **job["settings"])
    times = []
    for _ in range(2):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return {"import_s": imported, "startup_s": startup, "first_s": times[0], "second_s": times[1],
            "finite": all(bool(torch.isfinite(p).all()) for p in params)}


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    json.dump(main(json.loads(sys.argv[1])), sys.stdout)
