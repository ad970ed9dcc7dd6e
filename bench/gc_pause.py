"""Mean and median step time, and the garbage collections a step triggers, with and without optzoo's pause of
Python's cyclic collector (``optzoo._gc``), next to torch's fused Adam, on many small parameters.

    .venv/bin/python bench/gc_pause.py [--params 2000] [--size 1024] [--steps 60]

Each optimizer runs its steps in a row (not paired): the means include the collections, which a median hides.
"""
import argparse
import contextlib
import gc
import statistics
import time

import torch

import optzoo.torch as ot


def params(n, size):
    out = [torch.nn.Parameter(torch.randn(size)) for _ in range(n)]
    for p in out:
        p.grad = torch.randn(size)
    return out


def measure(opt, steps):
    seen = {}
    started = {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            n, t = seen.get(info["generation"], (0, 0.0))
            seen[info["generation"]] = (n + 1, t + time.perf_counter() - started["t"])

    opt.step()
    gc.callbacks.append(callback)
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    finally:
        gc.callbacks.remove(callback)
    return times, seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    print(f"{args.params} parameters of {args.size} elements, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    runs = [("optzoo Adam (collector held off)", lambda p: ot.Adam(p), None),
            ("optzoo Adam (collector not held off)", lambda p: ot.Adam(p), contextlib.nullcontext),
            ("torch Adam(fused=True)", lambda p: torch.optim.Adam(p, fused=True), None)]
    for label, make, pause in runs:
        saved = ot._gc_paused
        if pause is not None:
            ot._gc_paused = pause
        try:
            times, seen = measure(make(params(args.params, args.size)), args.steps)
        finally:
            ot._gc_paused = saved
        collections = ", ".join(f"gen{g}: {n} ({t * 1e3:.0f} ms)" for g, (n, t) in sorted(seen.items())) or "none"
        print(f"{label:40s} mean {statistics.mean(times) * 1e3:6.1f} ms  median "
              f"{statistics.median(times) * 1e3:6.1f} ms  max {max(times) * 1e3:6.1f} ms  collections: {collections}")


if __name__ == "__main__":
    main()
