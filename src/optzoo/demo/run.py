"""The demo's main job: train, tabulate, plot (called by ``optzoo demo``; arguments checked by :mod:`optzoo.cli`)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import optimizer as _optimizer
from . import plots, report, sparse, trajectories
from .data import split
from .train import DigitsMLP, Result, settings_for, train

__all__ = ["DemoConfig", "run"]


@dataclasses.dataclass
class DemoConfig:
    """What ``optzoo demo`` was asked for (already checked)."""
    optimizers: list
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    out: Path = Path("demo-out")
    device: str = "cpu"
    fused: object = None
    trajectory_steps: int | None = None   # None: each function's own number of steps
    #: the sparse example's size (None: no sparse example); it runs the requested ones of sparse.OPTIMIZERS
    sparse_size: sparse.SparseConfig | None = dataclasses.field(default_factory=sparse.SparseConfig)


def _progress():
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    # 72 columns: fits an 80-column terminal
    return Progress(TextColumn("{task.description:<30}"), BarColumn(bar_width=16), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                    transient=False)


def _failed(name, error):
    nan = float("nan")
    return Result(name, settings_for(name), [], nan, nan, nan, nan, error=f"{type(error).__name__}: {error}")


def _paths(progress, curves, steps):
    """Every function's trajectories for ``curves`` (``steps`` updates, or each function's own number)."""
    fns = trajectories.FUNCTIONS
    n_steps = {key: fn.steps if steps is None else steps for key, fn in fns.items()}
    task = progress.add_task("paths", total=sum(n_steps.values()) * len(curves))
    paths = {}
    for key, fn in fns.items():
        paths[key] = {}
        for c in curves:
            progress.update(task, description=f"paths: {fn.name}, {c}")
            paths[key][c] = trajectories.trajectory(fn, c, n_steps[key],
                                                    on_step=lambda: progress.advance(task)).numpy()
    return paths


def _sparse(progress, names, size, seed, device):
    """The sparse example for ``names`` (a sparse and a dense run each): ``(data, runs, max_diff)``."""
    task = progress.add_task("sparse example", total=2 * len(names) * size.steps)
    started = []

    def on_run(name, is_sparse):   # also right after a run that failed part-way
        progress.update(task, description=f"sparse: {name}, {'sparse' if is_sparse else 'dense'}",
                        completed=len(started) * size.steps)
        started.append(name)
    result = sparse.run_example(names, size, seed=seed, device=device, on_step=lambda: progress.advance(task),
                                on_run=on_run)
    progress.update(task, completed=2 * len(names) * size.steps)
    return result


def run(config: DemoConfig) -> int:
    """Train every requested optimizer, print the table, write loss.png, trajectories.png, results.md/json; then
    the sparse example (:mod:`.sparse`) for the requested ones of FTRL, Adam, AdaGrad: its table, sparse.png,
    sparse.md and the ``"sparse"`` key of results.json.

    On the CPU it sets torch's thread count to 1 for the process (it is meant to run as ``optzoo demo``).
    Returns the exit status: 1 if an optimizer failed to train (its row says why, in either table), else 0.
    """
    start = time.perf_counter()
    device = torch.device(config.device)
    if device.type == "cpu":
        # 64x64 matrices: a second thread only adds synchronisation (measured on 2 busy cores: 5 epochs of
        # SGD in 0.04 s with one thread, 0.07-1.4 s with two)
        torch.set_num_threads(1)
    data = split(config.seed).to(device)
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    per_run = config.epochs * steps_per_epoch
    everything = set(_optimizer.list_optimizers()) <= set(config.optimizers)
    curves = trajectories.curves_for(config.optimizers, everything)
    results, paths = [], {}
    with _progress() as progress:
        task = progress.add_task("training", total=len(config.optimizers) * per_run)
        for name in config.optimizers:
            progress.update(task, description=f"training: {name}")
            try:
                results.append(train(name, data, epochs=config.epochs, batch_size=config.batch_size,
                                     seed=config.seed, fused=config.fused, on_step=lambda: progress.advance(task)))
            except Exception as e:  # a user-registered optimizer may not train this network: report, go on
                results.append(_failed(name, e))
            progress.update(task, completed=len(results) * per_run)
        if curves:
            paths = _paths(progress, curves, config.trajectory_steps)
        sparse_names = [n for n in sparse.OPTIMIZERS if n in config.optimizers] if config.sparse_size else []
        if sparse_names:
            # the seed draws the data, the initial weights; the batches are the data's order
            ctr, sparse_runs, max_diff = _sparse(progress, sparse_names, config.sparse_size, config.seed, device)

    from rich.console import Console
    console = Console(highlight=False)
    n_params = sum(p.numel() for p in DigitsMLP().parameters())
    console.print(f"optzoo demo: 8x8 digits, {len(data.x_train)} training / {len(data.x_test)} held-out images; "
                  f"MLP 64-64-10 ({n_params} parameters); {config.epochs} epochs of {steps_per_epoch} batches of "
                  f"{config.batch_size}; seed {config.seed}; device {device} ({torch.get_num_threads()} CPU "
                  f"thread(s)); fused={config.fused}", markup=False)
    console.print(report.rich_table(results))
    footnotes = report.format_footnotes(results)
    if footnotes:
        console.print(footnotes, markup=False)
    table = report.format_table(results)
    notes = report.format_notes(results)
    out = Path(config.out)
    files = [out / "loss.png", out / "results.md", out / "results.json"]
    plots.plot_losses(results, files[0], steps_per_epoch)
    if curves:
        files.insert(1, out / "trajectories.png")
        plots.plot_trajectories(trajectories.FUNCTIONS, paths, files[1])
    else:
        print(f"\n(no trajectories: they are drawn for {', '.join(sorted(set(trajectories.CURVES.values())))})")
    files[-2].write_text(table + "\n" + (f"\n{notes}\n" if notes else ""))
    extra, failed = {}, any(r.error for r in results)
    if sparse_names:
        extra["sparse"] = _report_sparse(console, out, files, config, ctr, sparse_runs, max_diff)
        failed = failed or any(r.error for r in sparse_runs)
    else:
        print(f"\n(no sparse example: it runs {', '.join(sparse.OPTIMIZERS)})")
    files[-1].write_text(report.to_json(results, {k: str(v) for k, v in dataclasses.asdict(config).items()}, extra))
    print(f"\nwrote {', '.join(map(str, files))} in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _report_sparse(console, out, files, config, ctr, runs, max_diff) -> dict:
    """Print the sparse example's table, write sparse.png and sparse.md (listed in ``files`` before the
    results); returns its part of results.json."""
    size = config.sparse_size
    names = list(dict.fromkeys(r.name for r in runs))
    speedups = {n: sparse.speedup(runs, n) for n in names}
    n_params = size.rows * size.dim + sum(p.numel() for p in sparse.CTRModel(1, size.dim, size.hidden, False).mlp
                                          .parameters())
    what = (f"{len(sparse.FIELDS)} hashed fields -> {size.rows:,} x {size.dim} embedding bag -> MLP "
            f"{size.dim}-{size.hidden}-1 ({n_params:,} parameters); one pass of {size.steps} steps of {size.batch} "
            f"samples")
    console.print(f"\nsparse example: click-through model on generated data, {what}; a batch touches "
                  f"{ctr.rows_per_batch(size.batch):,.0f} rows on average; seed {config.seed}", markup=False)
    caption = report.sparse_caption(ctr.bayes_logloss, ctr.base_logloss, len(ctr.y_test))
    console.print(report.sparse_rich_table(runs, speedups, caption))
    notes = report.format_sparse_notes(max_diff)
    console.print(report.format_sparse_settings(runs) + (f"\n{notes}" if notes else ""), markup=False)
    png, md = out / "sparse.png", out / "sparse.md"
    plots.plot_sparse(runs, png, bayes_logloss=ctr.bayes_logloss, base_logloss=ctr.base_logloss,
                      samples_per_step=size.batch,
                      title=f"optzoo demo, the sparse example: {', '.join(names)} with a row-sparse gradient "
                            f"(lazy update) and with the dense gradient of the same model\n"
                            f"a click-through model on generated data: {len(sparse.FIELDS)} hashed fields, a "
                            f"{size.rows:,} x {size.dim} embedding bag, an MLP {size.dim}-{size.hidden}-1; "
                            f"{size.steps} steps of {size.batch} samples")
    md.write_text(f"Sparse example: {what}.\n\n{report.format_sparse_table(runs, speedups)}\n\n{caption}\n"
                  + (f"\n{notes}\n" if notes else ""))
    files[-2:-2] = [png, md]
    return report.sparse_to_json(runs, speedups, max_diff, dataclasses.asdict(size),
                                 {"bayes_logloss": ctr.bayes_logloss, "base_logloss": ctr.base_logloss,
                                  "n_test": len(ctr.y_test)})

