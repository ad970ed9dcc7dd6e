"""The demo's pictures, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Both figures are saved at a fixed size in pixels (:data:`LOSS_PX`, :data:`TRAJECTORIES_PX`, as (width, height)).
"""
from __future__ import annotations

import numpy as np

__all__ = ["LOSS_PX", "TRAJECTORIES_PX", "plot_losses", "plot_trajectories", "smooth"]

_DPI = 100
LOSS_PX = (1000, 600)
TRAJECTORIES_PX = (1500, 500)


def _figure(px):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(px[0] / _DPI, px[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    """Write ``fig`` as an 8-bit palette PNG: a quarter of the RGBA file's size for line drawings, with no
    visible loss (Pillow comes with matplotlib)."""
    from PIL import Image
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, format="PNG", optimize=True)


def smooth(values, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (fewer at the start); NaN and inf stay visible as NaN."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _styles(n):
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return [(cmap(i % 10), ("-", "--", ":")[i // 10 % 3]) for i in range(n)]


def plot_losses(results, path, steps_per_epoch: int) -> None:
    """Training loss (batch cross-entropy, trailing mean over one epoch) per step, log scale, one line per
    optimizer; a run that diverged is drawn up to its last finite value and marked in the legend."""
    fig = _figure(LOSS_PX)
    ax = fig.add_axes((0.07, 0.09, 0.72, 0.84))
    window = max(1, steps_per_epoch)
    for r, (color, ls) in zip(results, _styles(len(results))):
        y = smooth(r.losses, window)
        label = r.name + (" (failed)" if r.error else " (diverged)" if r.diverged else "")
        ax.plot(np.arange(1, len(y) + 1) / steps_per_epoch, y, color=color, ls=ls, lw=1.4, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("optzoo demo: a 64-64-10 MLP on the 8x8 digits, every optimizer through optzoo.Trainer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    _save(fig, path)


def plot_trajectories(functions, paths, path) -> None:
    """One panel per test function: contours of log(1 + f) and each optimizer's path from the start (o) to its
    last point (x); the minimum is a star. ``paths``: ``{function key: {curve: (steps+1, 2) array}}``."""
    fig = _figure(TRAJECTORIES_PX)
    keys = list(paths)
    curves = sorted({c for per in paths.values() for c in per}, key=lambda c: list(paths[keys[0]]).index(c))
    styles = dict(zip(curves, _styles(len(curves))))
    for k, key in enumerate(keys):
        fn = functions[key]
        ax = fig.add_subplot(1, len(keys), k + 1)
        xs, ys = np.linspace(*fn.xlim, 200), np.linspace(*fn.ylim, 200)
        gx, gy = np.meshgrid(xs, ys)
        ax.contour(gx, gy, np.log1p(fn(gx, gy)), levels=25, cmap="Greys", linewidths=0.6, alpha=0.7)
        for curve, p in paths[key].items():
            p = np.asarray(p)
            p = p[np.all(np.isfinite(p), axis=1)]
            color, ls = styles[curve]
            ax.plot(p[:, 0], p[:, 1], color=color, ls=ls, lw=1.1, label=curve)
            ax.plot(p[-1, 0], p[-1, 1], "x", color=color, ms=6)
        ax.plot(*fn.start, "o", color="black", ms=5)
        ax.plot(*fn.minimum, "*", color="gold", mec="black", ms=14)
        steps = max(len(p) for p in paths[key].values()) - 1
        ax.set_title(f"{fn.name}: {fn.formula}\nfrom {fn.start}, {steps} steps; minimum {fn.minimum}", fontsize=9)
        ax.set_xlim(*fn.xlim)
        ax.set_ylim(*fn.ylim)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.87, wspace=0.15)
    _save(fig, path)


