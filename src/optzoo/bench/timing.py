"""Timing: first call, steady-state median, the in-place triad roofline, and what machine this is."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from ._steps import Timing, time_steps

__all__ = ["Timing", "time_steps", "triad", "machine_info", "load_average"]


def triad(numel: int, *, repeat: int, budget: float) -> dict:
    """In-place triad ``a += s * b`` on two fp32 vectors: 12 bytes per element (read a, b; write a)."""
    a = torch.ones(numel)
    b = torch.full((numel,), 0.5)
    timing = time_steps(lambda: a.add_(b, alpha=1e-3), repeat=max(repeat, 10), warmup=2, budget=budget)
    moved = 12 * numel
    return {"elements": numel, "bytes": moved, "ms": timing["ms"], "min_ms": timing["min_ms"],
            "steps": timing["steps"], "gbps": moved / timing["ms"] / 1e6, "best_gbps": moved / timing["min_ms"] / 1e6}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    from .. import __version__
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "optzoo": __version__, "git": _git_revision()}


def load_average():
    """The 1-minute load average over the core count (other work on the machine), or None where unknown."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (OSError, AttributeError):
        return None
