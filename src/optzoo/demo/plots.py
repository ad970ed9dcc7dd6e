"""The demo's pictures, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Both figures are small multiples by family (:data:`FAMILIES`): 18 curves on one axes cannot be told apart, four
to seven per panel can. An optimizer keeps its colour in both figures and from one run to the next (its place in
its family's list picks a tab10 colour), so ``--optimizers sgd,adam`` draws sgd as the full run does.

Each plotting function returns the :class:`matplotlib.figure.Figure` it drew (tests read it) and saves it as a PNG
when given a path. Sizes in pixels grow with the number of panel rows: :func:`loss_px`, :func:`trajectories_px`;
:data:`LOSS_PX` and :data:`TRAJECTORIES_PX` are the full run's.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["FAMILIES", "family_of", "color_of", "loss_px", "trajectories_px", "LOSS_PX", "TRAJECTORIES_PX",
           "SPARSE_PX", "plot_losses", "plot_trajectories", "plot_sparse", "smooth"]

_DPI = 100

#: family -> its members, in legend order ("momentum" is the trajectories' SGD with momentum). A name in no
#: family (a user-registered optimizer) goes to "other".
FAMILIES = {
    "SGD-like": ("sgd", "momentum", "nag", "signum", "dcasgd", "sgld", "test"),
    "adaptive": ("adam", "nadam", "adamax", "rmsprop", "adagrad", "adadelta", "ftml"),
    "large-batch": ("lbsgd", "lars", "lamb"),
    "sparse / online": ("ftrl", "groupadagrad"),
}
_OTHER = "other"
#: tab10 colour index per name: distinct within a family, and across the seven curves of the trajectories (sgd,
#: momentum, nag, adam, rmsprop, adagrad, adadelta). Index 7, tab10's grey, is left to the context lines.
_COLORS = {"sgd": 0, "momentum": 1, "nag": 2, "signum": 3, "dcasgd": 4, "sgld": 5, "test": 6,
           "adam": 3, "nadam": 8, "adamax": 9, "rmsprop": 4, "adagrad": 5, "adadelta": 6, "ftml": 2,
           "lbsgd": 0, "lars": 1, "lamb": 2, "ftrl": 0, "groupadagrad": 1}
_OTHER_COLORS = (0, 1, 2, 3, 4, 5, 6, 8, 9)
# no "o" (the final-loss dot) and no "X" (divergence) among them
_MARKERS = ("s", "^", "v", "D", "P", "<", ">", "h", "p", "*")


def family_of(name: str) -> str:
    return next((f for f, members in FAMILIES.items() if name in members), _OTHER)


def _index(name: str, others=()) -> int:
    members = FAMILIES.get(family_of(name))
    if members is not None:
        return members.index(name)
    return sorted(set(others) | {name}).index(name)   # "other": by name among the others drawn


def color_of(name: str, others=()):
    """The tab10 colour of ``name`` (``others``: the other unknown names drawn, for a stable order among them)."""
    from matplotlib import colormaps
    if name in _COLORS:
        return colormaps["tab10"](_COLORS[name])
    return colormaps["tab10"](_OTHER_COLORS[_index(name, others) % len(_OTHER_COLORS)])


def _marker_of(name: str, others=()) -> str:
    return _MARKERS[_index(name, others) % len(_MARKERS)]


def _grouped(names) -> dict:
    """``{family: [names]}`` for the families present, in :data:`FAMILIES` order, members in family order."""
    groups = {}
    for f in (*FAMILIES, _OTHER):
        members = [n for n in names if family_of(n) == f]
        if members:
            order = FAMILIES.get(f)
            groups[f] = sorted(members, key=order.index) if order else sorted(members)
    return groups


def _grid(n: int):
    cols = 1 if n == 1 else 2
    return math.ceil(n / cols), cols


def loss_px(n_panels: int) -> tuple:
    """(width, height) of loss.png for ``n_panels`` families."""
    rows, cols = _grid(n_panels)
    return (720 if cols == 1 else 1200, 150 + 330 * rows)


def trajectories_px(n_rows: int) -> tuple:
    """(width, height) of trajectories.png for ``n_rows`` families."""
    return (1500, 150 + 380 * n_rows)


LOSS_PX = loss_px(len(FAMILIES))
TRAJECTORIES_PX = trajectories_px(2)
#: (width, height) of sparse.png
SPARSE_PX = (1200, 520)


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


def _what_ran(names) -> str:
    if len(names) > 5:
        return f"{len(names)} optimizers"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _diverged_at(r):
    """The 1-based step whose batch loss is the first non-finite one (the update before it broke the weights),
    ``len(losses)`` when only the final loss is, None for a run that stayed finite."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(r.losses, dtype=np.float64)))
    if bad.size:
        return int(bad[0]) + 1
    return len(r.losses) if r.diverged and r.losses else None


def plot_losses(results, path=None, steps_per_epoch: int = 1):
    """Training loss per step on a log scale, one panel per family (:data:`FAMILIES`) present in ``results``.

    A line is the batch cross-entropy's trailing mean over one epoch (the y label says so); the dot at its end is
    the loss on the whole training set after training (the table's number). In each panel the other panels'
    optimizers are drawn in light grey, for comparison, without legend entries. A run that diverged is drawn up
    to its last finite value and ends in an X at the step where the loss became NaN; a run that failed to train
    has no line and is named in its panel. Returns the figure; saves it to ``path`` when given.
    """
    from matplotlib.lines import Line2D
    names = [r.name for r in results]
    unknown = [n for n in names if family_of(n) == _OTHER]
    groups = _grouped(names)
    rows, cols = _grid(len(groups))
    fig = _figure(loss_px(len(groups)))
    window = max(1, steps_per_epoch)
    steps = max((len(r.losses) for r in results), default=0)
    epochs = steps / steps_per_epoch if steps_per_epoch else 0
    curves = {r.name: smooth(r.losses, window) for r in results}
    x_of = {r.name: np.arange(1, len(r.losses) + 1) / steps_per_epoch for r in results}
    by_name = {r.name: r for r in results}
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.remove()
    for k, (ax, (family, members)) in enumerate(zip(axes, groups.items())):
        for n in names:   # context: everyone else, grey and unlabelled, underneath
            if n not in members:
                ax.plot(x_of[n], curves[n], color="0.8", lw=0.8, zorder=1)
        failed = []
        for n in members:
            r = by_name[n]
            if r.error:
                failed.append(n)
                continue
            color, marker = color_of(n, unknown), _marker_of(n, unknown)
            x, y = x_of[n], curves[n]
            every = max(1, len(y) // 5)
            style = dict(color=color, lw=1.6, zorder=3)
            at = _diverged_at(r)
            if at is None:
                ax.plot(x, y, marker=marker, ms=5, markevery=(_index(n, unknown) * every // 8, every),
                        label=n, **style)
                if math.isfinite(r.final_loss):
                    ax.plot(x[-1], r.final_loss, "o", color=color, mec="black", ms=6, zorder=4)
                continue
            finite = np.isfinite(y[:at - 1])
            y_last = y[:at - 1][finite][-1] if finite.any() else 2.302585   # ln 10: the untrained loss
            xs = np.append(x[:at - 1][finite], at / steps_per_epoch)
            ys = np.append(y[:at - 1][finite], y_last)
            if len(xs) == 1:   # NaN from the first update on: a stub, so that the X has a line to end
                xs, ys = np.array([0.0, xs[0]]), np.array([y_last, y_last])
            ax.plot(xs, ys, marker="X", ms=11, mec="black", markevery=[len(xs) - 1],
                    label=f"{n}: diverged at step {at}", **style)
        if failed:
            ax.text(0.98, 0.02, "failed to train (see the table): " + ", ".join(failed), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=8, color="firebrick")
        ax.set_title(f"{family} ({len(members)})", fontsize=11, loc="left", fontweight="bold")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if any(not by_name[n].error for n in members):
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        if k % cols == 0:
            ax.set_ylabel(f"training loss (cross-entropy, log scale)\ntrailing mean over 1 epoch = {window} steps",
                          fontsize=9)
        if k >= len(groups) - cols:
            ax.set_xlabel("epoch")
            ax.tick_params(labelbottom=True)
    fig.suptitle(f"optzoo demo: {_what_ran(names)} through optzoo.Trainer, a 64-64-10 MLP on the 8x8 digits, "
                 f"{epochs:g} epochs", fontsize=12)
    key = [Line2D([], [], color="0.8", lw=1.2, label="the other panels' optimizers")] if len(groups) > 1 else []
    key += [Line2D([], [], ls="", marker="o", color="0.5", mec="black", ms=6,
                   label="loss on the whole training set at the end (the table's number)")]
    if any(_diverged_at(r) is not None and not r.error for r in results):
        key.append(Line2D([], [], ls="", marker="X", color="0.5", mec="black", ms=9, label="diverged here"))
    fig.legend(handles=key, loc="upper center", bbox_to_anchor=(0.5, 1 - 36 / fig.bbox.height), ncol=len(key),
               fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.09 if cols == 2 else 0.14, right=0.98, bottom=60 / fig.bbox.height,
                        top=1 - 92 / fig.bbox.height, hspace=0.25, wspace=0.05)
    if path is not None:
        _save(fig, path)
    return fig


def _label(curve: str) -> str:
    return "sgd + momentum" if curve == "momentum" else curve


def plot_trajectories(functions, paths, path=None):
    """Rows: the families (:data:`FAMILIES`) of the curves drawn; columns: the test functions. Each panel has the
    contours of log(1 + f), each optimizer's path from the start (o) to its last point (x), and the minimum (a star).
    Within a panel the longest path (the one that zig-zags most) is drawn first and widest, each next one on top
    and thinner, so that where paths share a valley floor every one still shows as a coloured edge; the paths are
    also a little transparent. One legend, under the panels, for the whole figure.

    ``paths``: ``{function key: {curve: (steps+1, 2) array}}``. Returns the figure; saves it to ``path`` when given.
    """
    from matplotlib.lines import Line2D
    from .trajectories import CURVES
    keys = list(paths)
    curves = list(dict.fromkeys(c for per in paths.values() for c in per))
    unknown = [c for c in curves if family_of(c) == _OTHER]
    groups = _grouped(curves)
    fig = _figure(trajectories_px(len(groups)))
    axes = fig.subplots(len(groups), len(keys), squeeze=False)
    grids = {}
    for key in keys:
        fn = functions[key]
        gx, gy = np.meshgrid(np.linspace(*fn.xlim, 200), np.linspace(*fn.ylim, 200))
        grids[key] = gx, gy, np.log1p(fn(gx, gy))
    for i, (family, members) in enumerate(groups.items()):
        for j, key in enumerate(keys):
            ax, fn = axes[i, j], functions[key]
            ax.contour(*grids[key], levels=25, cmap="Greys", linewidths=0.6, alpha=0.6, zorder=1)
            drawn = {c: np.asarray(paths[key][c]) for c in members if c in paths[key]}
            drawn = {c: p[np.all(np.isfinite(p), axis=1)] for c, p in drawn.items()}
            length = {c: float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) for c, p in drawn.items()}
            for z, c in enumerate(sorted(drawn, key=lambda c: -length[c])):
                p, color = drawn[c], color_of(c, unknown)
                ax.plot(p[:, 0], p[:, 1], color=color, lw=1.3 + 1.1 * (len(drawn) - 1 - z), alpha=0.85, zorder=2 + z,
                        solid_capstyle="round", label=_label(c))
                ax.plot(p[-1, 0], p[-1, 1], "x", color=color, ms=9, mew=2.5, zorder=20)
            ax.plot(*fn.start, "o", color="black", ms=6, zorder=21)
            ax.plot(*fn.minimum, "*", color="gold", mec="black", ms=15, zorder=19)
            ax.set_xlim(*fn.xlim)
            ax.set_ylim(*fn.ylim)
            if i == 0:
                steps = max(len(p) for p in paths[key].values()) - 1
                ax.set_title(f"{fn.name}: {fn.formula}\nfrom {fn.start}, {steps} steps; minimum {fn.minimum}",
                             fontsize=9)
            if j == 0:
                ax.set_ylabel(family, fontsize=12, fontweight="bold")
    asked = list(dict.fromkeys(CURVES.get(c, c) for c in curves))
    fig.suptitle(f"optzoo demo: the paths of {_what_ran(asked)} on three test functions "
                 "(MXNet-style API, exact gradients)", fontsize=12)
    handles = [Line2D([], [], color=color_of(c, unknown), lw=2, label=_label(c))
               for members in groups.values() for c in members]
    handles += [Line2D([], [], ls="", marker="o", color="black", ms=6, label="start"),
                Line2D([], [], ls="", marker="x", color="0.3", ms=9, mew=2.5, label="end (in its path's colour)"),
                Line2D([], [], ls="", marker="*", color="gold", mec="black", ms=14, label="minimum")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=70 / fig.bbox.height, top=1 - 80 / fig.bbox.height,
                        wspace=0.15, hspace=0.12)
    if path is not None:
        _save(fig, path)
    return fig


def plot_sparse(runs, path=None, *, bayes_logloss=None, base_logloss=None, samples_per_step: int = 1, title=""):
    """The sparse example (:mod:`.sparse`) in two panels. Left: each run's batch logloss per step, an optimizer's
    sparse run solid, its dense run dashed (same colour), with the hidden model's and the constant click rate's
    held-out logloss as grey lines. Right: the median ms per training step, sparse and dense bars side by side per
    optimizer, the ``optimizer.step()`` part darker, the speed-up (dense / sparse) written above. A run that
    failed has no line and no bar. Returns the figure; saves it to ``path`` when given."""
    from matplotlib.patches import Patch
    fig = _figure(SPARSE_PX)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = list(dict.fromkeys(r.name for r in runs))
    unknown = [n for n in names if n not in _COLORS]
    for r in runs:
        if r.error or not r.losses:
            continue
        x = np.arange(1, len(r.losses) + 1) * samples_per_step
        # the dense line dashed on top of the solid sparse one: where they agree (AdaGrad) both still show
        ax.plot(x, r.losses, color=color_of(r.name, unknown), lw=2.2 if r.sparse else 1.3,
                ls="-" if r.sparse else (0, (4, 3)), marker="o" if r.sparse else None, ms=3.5,
                alpha=0.75 if r.sparse else 1.0, zorder=2 if r.sparse else 3,
                label=f"{r.name}, {'sparse' if r.sparse else 'dense'}")
    for level, text in ((bayes_logloss, "hidden model"), (base_logloss, "constant click rate")):
        if level is not None and math.isfinite(level):
            ax.axhline(level, color="0.55", lw=1, ls=":", zorder=1)
            ax.text(1.0, level, f"{text} (held out) ", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=8, color="0.35")
    ax.set_xlabel("training samples seen" if samples_per_step > 1 else "step")
    ax.set_ylabel("batch logloss (binary cross-entropy)")
    ax.set_title("training loss: sparse (solid) and dense (dashed) gradient", fontsize=11, loc="left")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9, ncol=2)
    by = {(r.name, r.sparse): r for r in runs if not r.error}
    width, tops = 0.38, []
    for i, n in enumerate(names):
        color = color_of(n, unknown)
        for j, sparse in enumerate((True, False)):
            r = by.get((n, sparse))
            if r is None or not math.isfinite(r.ms_step):
                continue
            xpos = i + (j - 0.5) * width
            bx.bar(xpos, r.ms_step, width, color=color, alpha=0.45 if sparse else 0.25, edgecolor=color,
                   hatch=None if sparse else "//")
            if math.isfinite(r.ms_update):
                bx.bar(xpos, min(r.ms_update, r.ms_step), width, color=color, alpha=0.9, edgecolor=color)
            tops.append(r.ms_step)
        s, d = by.get((n, True)), by.get((n, False))
        for r in (s, d):
            if r is not None and math.isfinite(r.ms_step):
                bx.text(i + (-0.5 if r is s else 0.5) * width, r.ms_step, f"{r.ms_step:.1f}", ha="center",
                        va="bottom", fontsize=8)
        if s is not None and d is not None and s.ms_step > 0 and math.isfinite(d.ms_step / s.ms_step):
            bx.text(i, max(s.ms_step, d.ms_step) + 0.09 * max(tops), f"{d.ms_step / s.ms_step:.1f}x",
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
    bx.set_xticks(range(len(names)), [f"{n}\nsparse | dense" for n in names], fontsize=9)
    bx.set_ylim(0, 1.45 * max(tops, default=1.0))
    bx.set_ylabel("ms per training step (median)")
    bx.set_title("time per step (bold: dense / sparse)", fontsize=11, loc="left")
    bx.grid(True, axis="y", alpha=0.3)
    bx.legend(handles=[Patch(facecolor="0.35", label="optimizer.step()"),
                       Patch(facecolor="0.85", edgecolor="0.4",
                             label="forward, backward, zero_grad(); dense: hatched")],
              loc="upper left", fontsize=8, framealpha=0.9)
    fig.suptitle(title or "optzoo demo: the sparse example", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.84, wspace=0.18)
    if path is not None:
        _save(fig, path)
    return fig
