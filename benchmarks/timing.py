"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def median_time(function, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up (allocator, kernel selection)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
