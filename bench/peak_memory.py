"""Peak anonymous resident memory of this process while a block runs (Linux), for the bench scripts.

RssAnon leaves out file-backed pages (mmap'd weight files), so it counts what the code itself holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


@contextmanager
def peak_extra_rss(interval: float = 0.002) -> Iterator[dict]:
    """Samples every ``interval`` s; on exit the yielded dict holds ``bytes`` (peak above the start)
    and ``seconds`` (wall time of the block)."""
    result, base, peak, stop = {}, anon_rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anon_rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        stop.set()
        thread.join()
        result["bytes"] = max(peak[0], anon_rss()) - base
