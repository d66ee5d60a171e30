"""Progress bars that tell the truth in a terminal and in a log file.

In a terminal tqdm redraws one line; written to a file or a cluster's log it would append a
segment at every update (tens of kilobytes a minute for a training run), so there it writes at
most one update every LOG_INTERVAL seconds, in plain characters.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between two updates written to a file


def progress_bar(total: float, *, disable: bool = False, **options) -> tqdm:
    """tqdm over `total` units (`options`: desc, unit, initial, ...), throttled when stderr is not a terminal."""
    logged = not sys.stderr.isatty()
    return tqdm(total=total, disable=disable, dynamic_ncols=not logged, ascii=logged or None,
                mininterval=LOG_INTERVAL if logged else 0.1, **options)
