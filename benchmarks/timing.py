"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def first_and_median_time(function, repeats: int) -> tuple[float, float]:
    """(Seconds of the first call, which pays for allocation and kernel selection; median seconds
    of `repeats` calls after it.)"""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def median_time(function, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up (allocator, kernel selection)."""
    return first_and_median_time(function, repeats)[1]
