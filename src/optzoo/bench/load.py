"""The "shared machine" workload's neighbours: one CPU-bound process per core, for a bounded time.

The spinners are plain ``python -I -S -c`` processes, not ``multiprocessing`` workers: a spawned worker
would import the bench package (and torch) before spinning, and a forked one would copy a process whose
thread pools are already running. Each spins in pure Python, exits by itself after ``limit_s`` or as
soon as its parent (the bench) is gone, and :func:`busy_cores` ends them all when its block exits,
however it exits.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

__all__ = ["busy_cores", "Load"]

# Checks the clock and the parent every ~20k additions (about a millisecond), so it stays CPU-bound.
_SPIN = """
import os, sys, time
parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])
sys.stdout.write("spinning\\n")
sys.stdout.flush()
x = 0
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(20000):
        x += 1
"""


class Load:
    """The running spinners: ``processes`` started, ``alive()`` still spinning."""

    def __init__(self, procs, limit_s):
        self._procs = procs
        self.processes = len(procs)
        self.limit_s = limit_s

    def alive(self) -> int:
        return sum(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list:
        return [p.pid for p in self._procs]


@contextlib.contextmanager
def busy_cores(n: int | None = None, limit_s: float = 3600.0):
    """Run ``n`` (default ``os.cpu_count()``) busy-loop processes for the block; yields a :class:`Load`.

    Returns once every spinner has started its loop. Each stops by itself after ``limit_s`` seconds or
    when the bench process dies; on leaving the block they are terminated (killed after 5 s)."""
    n = (os.cpu_count() or 1) if n is None else int(n)
    if n < 0 or limit_s <= 0:
        raise ValueError(f"busy_cores(n={n}, limit_s={limit_s}) is invalid: expected n >= 0 and limit_s > 0")
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _SPIN, str(float(limit_s))],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL))
        for p in procs:
            p.stdout.readline()  # "spinning" (or "" if it died at start: alive() tells)
        yield Load(procs, limit_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
