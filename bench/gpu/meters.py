"""Memory meters: the device's allocator on CUDA; on the CPU the process's own memory stands for it.

CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after ``reset_peak_memory_stats``.

CPU (``--small``): there is one memory, so the device's is emulated: each mode runs in a fresh process
that holds exactly the models the mode keeps on the device (see ``models.ModelPool``). Memory is RssAnon
above the process start (after the one-time cost of building models, tens of MB of Python objects, is
paid); the peak is the larger of RssAnon sampled every 2 ms (bench/peak_memory.py's method) and the
high-water mark VmHWM, reset through /proc/self/clear_refs (bench/memory_estimate.py's), less the
file-backed resident set. The process runs with ``HOST_MALLOC_ENV`` (``cli`` re-executes itself with it)
so that freed tensors leave the resident set at once.
"""

from __future__ import annotations

import gc
import re
import threading
import time
from pathlib import Path
from typing import Protocol

import torch

# glibc reads these only at process start: every allocation over 64 KiB is its own mapping, so freed tensors
# leave the resident set at once and the resident set measures live memory
HOST_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


class Meter(Protocol):
    """What the harness asks of a memory meter (bytes throughout)."""

    method: str

    def sync(self) -> None: ...
    def allocated(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...
    def reserved_peak(self) -> int: ...
    def free(self) -> None: ...


class CudaMeter:
    """Allocated / peak-allocated device memory of the PyTorch caching allocator."""

    method = "torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self.sync()
        return torch.cuda.max_memory_allocated(self.device)

    def reserved_peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def _status_bytes(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+)", text, re.MULTILINE).group(1)) * 1024


class HostMeter:
    """The process's anonymous resident memory (RssAnon: what the code allocated, without the pages of
    shared libraries that fault in as new kernels run) above its start.

    The peak since ``reset_peak`` is the larger of two lower bounds of the true one: RssAnon sampled every
    2 ms by a thread (it can miss a short peak) and the kernel's high-water mark VmHWM, reset through
    /proc/self/clear_refs (no gaps), less the file-backed part of the resident set now (which only grows)."""

    def __init__(self) -> None:
        gc.collect()
        self.base = _status_bytes("RssAnon")
        self._sampler: tuple[threading.Thread, threading.Event, list[int]] | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self.method = ("RssAnon above the process start; peak: max of RssAnon sampled every 2 ms"
                       + (" and VmHWM (reset via /proc/self/clear_refs) minus the file-backed resident set"
                          if self._hwm else ""))

    def sync(self) -> None:
        pass

    def allocated(self) -> int:
        return _status_bytes("RssAnon") - self.base

    def reset_peak(self) -> None:
        self._stop_sampler()
        if self._hwm:
            Path("/proc/self/clear_refs").write_text("5")
        stop, peak = threading.Event(), [_status_bytes("RssAnon")]

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _status_bytes("RssAnon"))
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        self._sampler = (thread, stop, peak)

    def peak(self) -> int:
        anon = _status_bytes("RssAnon")
        best = max(anon, self._sampler[2][0] if self._sampler else anon)
        if self._hwm:
            best = max(best, _status_bytes("VmHWM") - (_status_bytes("VmRSS") - anon))
        return best - self.base

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler[1].set()
            self._sampler[0].join()
            self._sampler = None

    def reserved_peak(self) -> int:
        return self.peak()

    def free(self) -> None:
        gc.collect()
