"""Peak anonymous resident memory of this process while a block runs (Linux), for the bench scripts.

RssAnon leaves out file-backed pages (mmap'd weight files), so it counts what the code itself holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def anon_rss(fields: tuple[str, ...] = ("RssAnon",)) -> int:
    """Bytes of the named /proc/self/status fields, summed (RssShmem adds /dev/shm pages this process maps)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) * 1024
    if len(values) != len(fields):
        raise RuntimeError(f"no {fields} in /proc/self/status (Linux only)")
    return sum(values.values())


@contextmanager
def peak_extra_rss(interval: float = 0.002, fields: tuple[str, ...] = ("RssAnon",)) -> Iterator[dict]:
    """Samples every ``interval`` s; on exit the yielded dict holds ``bytes`` (peak above the start)
    and ``seconds`` (wall time of the block)."""
    result, base, peak, stop = {}, anon_rss(fields), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anon_rss(fields))
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
        result["bytes"] = max(peak[0], anon_rss(fields)) - base
