"""The demo's results table: aligned for the terminal (rich), markdown for results.md (to paste into a README),
and its JSON dump."""
from __future__ import annotations

import json
import math

__all__ = ["COLUMNS", "NOTES", "format_table", "format_notes", "format_settings", "format_footnotes", "rich_table",
           "to_json", "SPARSE_COLUMNS", "format_sparse_table", "sparse_rich_table", "sparse_caption",
           "format_sparse_settings", "format_sparse_notes", "sparse_to_json"]

COLUMNS = ("optimizer", "final train loss", "test accuracy", "ms/step", "state B/param", "settings")

#: Why a row looks the way it does, where a reader would otherwise suspect a bug.
NOTES = {
    "adamax": "MXNet's Adamax has no epsilon: the weights of pixels that are blank in every image of a batch "
              "get a zero gradient, so u = 0 and the first step divides 0 by 0 (NaN), as in MXNet 1.9.1 "
              "(torch.optim.Adamax adds eps=1e-8)",
    "dcasgd": "in one process there is no delay to compensate: DCASGD is plain SGD here, up to rounding",
    "sgld": "rescale_grad = the number of training images, so the gradient is the whole data set's (posterior "
            "sampling); the weights keep moving, by design",
    "test": "MXNet's plumbing test optimizer: w += rescale_grad * g (here rescale_grad = -0.05, i.e. SGD)",
}


def _num(x, fmt):
    return "nan" if not math.isfinite(x) else format(x, fmt)


def format_settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


def format_table(results) -> str:
    """One markdown row per result: the full-train-set loss at the end, the held-out accuracy, the median
    ``trainer.step`` time, the optimizer state's bytes per parameter element, and the hyperparameters."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} | | | | {format_settings(r.settings)} |")
            continue
        cells = (r.name, _num(r.final_loss, ".4f"), _num(r.accuracy, ".3f"), _num(r.ms_per_step, ".3f"),
                 _num(r.state_bytes_per_param, ".2f"), format_settings(r.settings))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: :data:`COLUMNS` 1-4 as two-line headers; the caption spells them out
_SHORT = ("final\nloss", "test\nacc.", "ms/\nstep", "state\nB/param")
_CAPTION = ("final loss: cross-entropy on the whole training set after training; test acc.: accuracy on the "
            "held-out images; ms/step: median time of trainer.step; state B/param: optimizer state bytes per "
            "parameter element")


def rich_table(results, title: str = ""):
    """The same rows as :func:`format_table` as a :class:`rich.table.Table`: numbers right-aligned, the settings
    wrapped at their commas within the console's width; a row with a note in :data:`NOTES` gets a footnote mark."""
    from rich import box
    from rich.table import Table
    from rich.markup import escape
    table = Table(*COLUMNS[:1], title=title or None, title_justify="left",
                  caption=_CAPTION, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for c in _SHORT:   # narrow headers leave the settings room in an 80-column terminal
        table.add_column(c, justify="right")
    table.add_column(COLUMNS[-1], overflow="fold")
    marks = _marks(results)
    for r in results:
        name = r.name + (f" [{marks[r.name]}]" if r.name in marks else "")
        settings = escape(format_settings(r.settings))   # a user's values are not rich markup
        if r.error:
            table.add_row(escape(name), f"[red]failed: {escape(r.error)}[/red]", "", "", "", settings)
            continue
        table.add_row(escape(name), _num(r.final_loss, ".4f"), _num(r.accuracy, ".3f"), _num(r.ms_per_step, ".3f"),
                      _num(r.state_bytes_per_param, ".2f"), settings)
    return table


def _marks(results) -> dict:
    return {n: str(k) for k, n in enumerate((r.name for r in results if r.name in NOTES), 1)}


def format_footnotes(results) -> str:
    """:data:`NOTES` for the rows of :func:`rich_table`, numbered as its marks."""
    marks = _marks(results)
    return "\n".join(f"[{k}] {n}: {NOTES[n]}" for n, k in marks.items())


def format_notes(results) -> str:
    names = [r.name for r in results]
    return "\n".join(f"- {n}: {NOTES[n]}" for n in names if n in NOTES)


def to_json(results, config: dict, extra: dict | None = None) -> str:
    """``{"config": ..., "results": [a row per optimizer]}`` plus ``extra``'s keys (the sparse example's
    ``"sparse"``)."""
    def clean(x):
        return x if not isinstance(x, float) else float(f"{x:.6g}") if math.isfinite(x) else None
    rows = [{"optimizer": r.name, "settings": r.settings, "final_train_loss": clean(r.final_loss),
             "test_accuracy": clean(r.accuracy), "ms_per_step": clean(r.ms_per_step),
             "state_bytes_per_param": clean(r.state_bytes_per_param), "error": r.error or None, "losses": [clean(v) for v in r.losses]}
            for r in results]
    return json.dumps({"config": config, "results": rows, **(extra or {})})


# ---------------------------------------------------------------------------------------------- sparse example
#: the sparse example's table (:mod:`.sparse`): two rows per optimizer, its sparse and its dense run
SPARSE_COLUMNS = ("optimizer", "gradient", "train loss", "test loss", "test AUC", "update ms", "step ms", "speed-up",
                  "settings")
_SPARSE_SHORT = ("train\nloss", "test\nloss", "test\nAUC", "update\nms", "step\nms", "speed-\nup")


def _sparse_cells(runs, speedups):
    """``(name, gradient, numbers..., speed-up, settings, error)`` per run; the name, speed-up and settings only
    on an optimizer's first row."""
    seen = set()
    for r in runs:
        first = r.name not in seen
        seen.add(r.name)
        x = speedups.get(r.name, float("nan")) if r.sparse else float("nan")
        numbers = (_num(r.train_loss, ".4f"), _num(r.test_loss, ".4f"), _num(r.test_auc, ".3f"),
                   _num(r.ms_update, ".2f"), _num(r.ms_step, ".2f"))
        yield (r.name if first else "", "sparse" if r.sparse else "dense", *numbers,
               f"{x:.1f}x" if math.isfinite(x) else "", format_settings(r.settings) if first else "", r.error)


def format_sparse_table(runs, speedups: dict) -> str:
    """The sparse example as markdown (``sparse.md``): :data:`SPARSE_COLUMNS`, a row per run."""
    lines = ["| " + " | ".join(SPARSE_COLUMNS) + " |", "|" + "---|" * len(SPARSE_COLUMNS)]
    for *cells, settings, error in _sparse_cells(runs, speedups):
        if error:
            cells = [*cells[:2], f"failed: {error}", *[""] * 5]
        lines.append("| " + " | ".join([*cells, settings]) + " |")
    return "\n".join(lines)


def sparse_caption(bayes_logloss: float, base_logloss: float, n_test: int) -> str:
    """What the sparse table's columns are, and the two losses that frame the test loss."""
    return (f"loss: logloss (binary cross-entropy) after one pass; test: {n_test:,} held-out samples, where the "
            f"hidden model that drew the labels scores {bayes_logloss:.4f} and a constant click rate "
            f"{base_logloss:.4f}; update ms: median time of optimizer.step(); step ms: forward, backward, step() "
            "and zero_grad(); speed-up: dense step ms / sparse step ms. sparse: the table's gradient is row-sparse "
            "and FTRL (lazy=True), Adam (lazy by default) and AdaGrad update only the batch's rows; dense: the "
            "same model with a dense gradient, every row updated. A lazy update is not the dense rule for FTRL "
            "and Adam (the dense one moves rows the batch did not touch), so their losses differ; for AdaGrad "
            "(wd = 0) it is the same update.")


def sparse_rich_table(runs, speedups: dict, caption: str = "", title: str = ""):
    """:func:`format_sparse_table`'s rows but the settings (:func:`format_sparse_settings`) as a
    :class:`rich.table.Table`, numbers right-aligned."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    table = Table(*SPARSE_COLUMNS[:2], title=title or None, title_justify="left", caption=caption or None,
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for c in _SPARSE_SHORT:
        table.add_column(c, justify="right")
    for *cells, _, error in _sparse_cells(runs, speedups):
        if error:
            table.add_row(*map(escape, cells[:2]), f"[red]failed: {escape(error)}[/red]", "", "", "", "", "")
            continue
        table.add_row(*map(escape, cells))
    return table


def format_sparse_settings(runs) -> str:
    """The sparse example's hyperparameters, one optimizer after the other."""
    settings = {r.name: r.settings for r in runs}
    return "settings: " + "; ".join(f"{n} {format_settings(s)}" for n, s in settings.items())


def format_sparse_notes(max_diff: dict) -> str:
    """One line: per optimizer, the largest difference between the sparse and the dense run's trained tables."""
    if not max_diff:
        return ""
    parts = [f"{n} {v:.3g}" + (" (bit-identical)" if v == 0 else "") for n, v in max_diff.items()]
    return "largest |difference| between the tables trained sparse and dense: " + ", ".join(parts)


def sparse_to_json(runs, speedups: dict, max_diff: dict, config: dict, references: dict) -> dict:
    """The sparse example for ``results.json`` (its ``"sparse"`` key)."""
    def clean(x):
        return x if not isinstance(x, float) else float(f"{x:.6g}") if math.isfinite(x) else None
    rows = [{"optimizer": r.name, "gradient": "sparse" if r.sparse else "dense", "settings": r.settings,
             "train_logloss": clean(r.train_loss), "test_logloss": clean(r.test_loss), "test_auc": clean(r.test_auc),
             "ms_per_update": clean(r.ms_update), "ms_per_step": clean(r.ms_step), "error": r.error or None,
             "losses": [clean(v) for v in r.losses]} for r in runs]
    return {"config": config, **{k: clean(v) for k, v in references.items()}, "results": rows,
            "speedup": {k: clean(v) for k, v in speedups.items()},
            "max_table_difference": {k: clean(v) for k, v in max_diff.items()}}
