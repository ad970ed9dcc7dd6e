"""``time_steps``: standard library only, so that MXNet's side (``_mxnet_worker.py``) times the same way."""
import statistics
import time

__all__ = ["Timing", "time_steps", "time_paired"]


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


def time_paired(step, ref_step, *, repeat: int, warmup: int, budget: float) -> Timing:
    """``time_steps`` for ``step``, with ``ref_step`` timed right before each timed ``step`` call.

    Adds ``ref_ms`` (median of the reference's calls) and ``ratio``: the median over the pairs of
    ``step`` time / ``ref_step`` time. Two calls a few milliseconds apart see the same machine, so the
    ratio holds where the machine's own speed drifts between measurements (on a shared 2-core VM the same
    kernel measured 12 ms and 8 ms a minute apart).
    """
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    ref_step()
    pairs, spent = [], 0.0
    for k in range(warmup + repeat):
        start = time.perf_counter()
        ref_step()
        mid = time.perf_counter()
        step()
        end = time.perf_counter()
        if k < warmup and end - mid <= budget:
            continue
        pairs.append((end - mid, mid - start))
        spent += end - mid
        if len(pairs) >= min(3, repeat) and spent >= budget or spent >= 5 * budget:
            break
    times = [t for t, _ in pairs]
    return Timing(first_ms=first * 1e3, ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                  steps=len(times), ref_ms=statistics.median(r for _, r in pairs) * 1e3,
                  ratio=statistics.median(t / r for t, r in pairs))
