"""A one-line progress bar on stderr, for long loads, quantization, perplexity and benchmarks."""

from __future__ import annotations

import sys


def progress_bar(label: str):
    """bar(done, total) draws `label [#####.....] done/total` and erases itself when done == total.

    Returns None when stderr is not a terminal (logs and pipes get no bar); callers accept a None bar.
    """
    if not sys.stderr.isatty():
        return None

    def bar(done, total, note: str = ""):
        n = int(30 * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * n}{'.' * (30 - n)}] {done}/{total} {note}   ")
        if done >= total:
            sys.stderr.write("\r" + " " * (len(label) + len(note) + 60) + "\r")
        sys.stderr.flush()

    return bar
