"""The demo's main job: train, tabulate, plot (called by ``optzoo demo``; arguments checked by :mod:`optzoo.cli`)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import optimizer as _optimizer
from . import plots, report, trajectories
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


def run(config: DemoConfig) -> int:
    """Train every requested optimizer, print the table, write loss.png, trajectories.png, results.md/json.

    On the CPU it sets torch's thread count to 1 for the process (it is meant to run as ``optzoo demo``).
    Returns the exit status: 1 if an optimizer failed to train (its row says why), else 0.
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
    files[-1].write_text(report.to_json(results, {k: str(v) for k, v in dataclasses.asdict(config).items()}))
    print(f"\nwrote {', '.join(map(str, files))} in {time.perf_counter() - start:.1f} s")
    return 1 if any(r.error for r in results) else 0

