"""The demo's results table (markdown, so it can be pasted into a README) and its JSON dump."""
from __future__ import annotations

import json
import math

__all__ = ["COLUMNS", "NOTES", "format_table", "format_notes", "format_settings", "to_json"]

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


def format_notes(results) -> str:
    names = [r.name for r in results]
    return "\n".join(f"- {n}: {NOTES[n]}" for n in names if n in NOTES)


def to_json(results, config: dict) -> str:
    def clean(x):
        return x if not isinstance(x, float) else float(f"{x:.6g}") if math.isfinite(x) else None
    rows = [{"optimizer": r.name, "settings": r.settings, "final_train_loss": clean(r.final_loss),
             "test_accuracy": clean(r.accuracy), "ms_per_step": clean(r.ms_per_step),
             "state_bytes_per_param": clean(r.state_bytes_per_param), "error": r.error or None, "losses": [clean(v) for v in r.losses]}
            for r in results]
    return json.dumps({"config": config, "results": rows})
