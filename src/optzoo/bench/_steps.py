"""``time_steps``: standard library only, so that MXNet's side (``_mxnet_worker.py``) times the same way."""
import statistics
import time

__all__ = ["Timing", "time_steps"]


class Timing(dict):
    """``first_ms`` (the first call: state creation, compilation), ``ms`` (median of the timed steps),
    ``min_ms``, ``steps`` (how many were timed)."""


def time_steps(step, *, repeat: int, warmup: int, budget: float) -> Timing:
    """Call ``step`` once (timed alone), ``warmup`` more times, then time up to ``repeat`` calls.

    At least ``min(3, repeat)`` calls are timed, fewer only when they would take over ``5 * budget``
    seconds; no more once ``budget`` seconds of timed calls have passed. A warm-up call slower than
    ``budget`` ends the warm-up and counts as a timed call (a step that slow has nothing left to
    warm, and the full-size run stays bounded). Returns milliseconds.
    """
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(warmup):
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            times.append(elapsed)
            break
    spent = sum(times)
    while len(times) < repeat and (spent < budget or (len(times) < min(3, repeat) and spent < 5 * budget)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return Timing(first_ms=first * 1e3, ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                  steps=len(times))
