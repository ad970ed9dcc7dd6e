"""Timing: first call, steady-state median, the in-place triad and copy rooflines, and what machine this is."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ._steps import Timing, time_steps

__all__ = ["Timing", "time_steps", "triad", "copy_bandwidth", "device_sync", "synced", "settle_heap",
           "machine_info", "device_info", "load_average"]

_HEAP_SETTLED = [False]


def settle_heap() -> None:
    """Free one 30 MiB CPU tensor, once per process, before anything is measured.

    glibc serves allocations above its mmap threshold (128 KiB at start) with fresh mappings; freeing a
    mapped block of up to 32 MiB raises that threshold and the trim threshold to its size, as any
    training process soon does. Until then every 1 MiB temporary of an eager kernel is a fresh mapping
    that page-faults (eager steps on one 16M tensor measured up to 6x slower), so which contender ran
    first would decide what the others find."""
    if not _HEAP_SETTLED[0]:
        _HEAP_SETTLED[0] = True
        torch.empty(30 << 18).fill_(0)


def device_sync(device):
    """A callable that waits for ``device``'s queued work, or None where ops are synchronous (CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "synchronize"):
        raise ValueError(f"device {str(device)!r} has no torch.{device.type}.synchronize to time it by")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return module.synchronize  # mps, xpu: their current device


def synced(step, sync):
    """``step`` followed by ``sync()``, so that a host timer around it sees the device's work finish."""
    if sync is None:
        return step

    def call():
        step()
        sync()
    return call


def triad(numel: int, *, repeat: int, budget: float, device="cpu") -> dict:
    """In-place triad ``a += s * b`` on two fp32 vectors: 12 bytes per element (read a, b; write a)."""
    a = torch.ones(numel, device=device)
    b = torch.full((numel,), 0.5, device=device)
    sync = device_sync(device)
    if sync:
        sync()
    timing = time_steps(synced(lambda: a.add_(b, alpha=1e-3), sync), repeat=max(repeat, 10), warmup=2,
                        budget=budget)
    moved = 12 * numel
    return {"elements": numel, "bytes": moved, "ms": timing["ms"], "min_ms": timing["min_ms"],
            "steps": timing["steps"], "gbps": moved / timing["ms"] / 1e6, "best_gbps": moved / timing["min_ms"] / 1e6}


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20, repeat: int = 10) -> dict:
    """``dst.copy_(src)`` of ``nbytes`` (fp32): GB/s = 2 x bytes (read + write) / the median copy time.

    On CUDA each copy is timed by CUDA events recorded around it (device time, no launch latency);
    elsewhere by the host clock with the device synchronized before and after."""
    device = torch.device(device)
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    sync = device_sync(device) or (lambda: None)
    for _ in range(2):  # warm-up: first touch of dst's pages, the allocator, the copy kernel
        dst.copy_(src)
    sync()
    times = []
    for _ in range(max(1, repeat)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))  # ms
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    moved = 2 * numel * 4
    ms = statistics.median(times)
    return {"bytes": numel * 4, "moved": moved, "ms": ms, "min_ms": min(times), "copies": len(times),
            "gbps": moved / ms / 1e6, "best_gbps": moved / min(times) / 1e6,
            "timer": "cuda events" if device.type == "cuda" else "host clock"}


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


def device_info(device) -> dict:
    """What ``device`` is: its type, and for CUDA the card's name, memory and multiprocessors."""
    device = torch.device(device)
    info = {"device": str(device), "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def load_average():
    """The 1-minute load average over the core count (other work on the machine), or None where unknown."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except (OSError, AttributeError):
        return None
