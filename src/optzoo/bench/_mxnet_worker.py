"""MXNet 1.9.1 side of the benchmark: run by MXNet's own Python (``.mxref/bin/python``), never imported.

Reads one JSON job list on stdin, writes one JSON object on stdout. Imports only mxnet, numpy and the
standard library (optzoo and torch are not installed there). Each job runs MXNet's optimizer through
``mx.optimizer.get_updater`` with lists of all indices, as Gluon's Trainer calls it (so MXNet
aggregates where its optimizer does: multi_sgd, multi_lamb, multi_lars), and waits for the engine
(``mx.nd.waitall()``) after every step, timed by ``_steps.time_steps`` as optzoo's side is.
"""
import importlib.util
import json
import os
import sys
import warnings


def _load_time_steps():
    """``_steps.time_steps`` from beside this file (standard library only), without putting this folder
    on ``sys.path`` (its other modules would shadow top-level names)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_steps.py")
    spec = importlib.util.spec_from_file_location("optzoo_bench_steps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.time_steps


time_steps = _load_time_steps()


def run_job(mx, job, cfg):
    dtype = job["dtype"]
    mx.random.seed(cfg["seed"])
    shapes = [tuple(s) for s in job["shapes"]]
    weights = [mx.nd.random.normal(shape=s).astype(dtype) for s in shapes]
    grads = [mx.nd.random.normal(shape=s).astype(dtype) for s in shapes]
    opt = mx.optimizer.create(job["name"], multi_precision=job["multi_precision"], rescale_grad=1.0,
                              **job["settings"])
    updater = mx.optimizer.get_updater(opt)
    indices = list(range(len(shapes)))

    def step():
        updater(indices, grads, weights)
        mx.nd.waitall()

    out = dict(time_steps(step, repeat=cfg["repeat"], warmup=cfg["warmup"], budget=cfg["budget"]))
    out["finite"] = bool(all(mx.nd.contrib.isfinite(w).min().asscalar() for w in weights[:4]))
    return out


def main():
    cfg = json.load(sys.stdin)
    warnings.simplefilter("ignore")
    import mxnet as mx
    results = []
    for job in cfg["jobs"]:
        entry = {"label": job["label"], "workload": job["workload"]}
        try:
            entry.update(run_job(mx, job, cfg))
        except Exception as exc:  # an optimizer MXNet 1.9.1 cannot run: report, go on
            entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        results.append(entry)
        print(f"  mxnet {job['label']:<14} {job['workload']:<9} "
              + (f"{entry['ms']:9.2f} ms" if "ms" in entry else entry["error"]), file=sys.stderr, flush=True)
    json.dump({"version": mx.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
