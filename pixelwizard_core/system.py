"""What differs between Windows, macOS and Linux, in one place: memory statistics, signals, devices.

Nothing here imports a POSIX-only module at import time (``resource`` is imported inside the function
that needs it), so every module of the library imports on Windows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from .errors import ConfigError

log = logging.getLogger("pixelwizard")

# Signals that ask a long-running command to stop, where the platform has them: SIGINT (Ctrl-C), SIGTERM
# (timeout, docker stop, systemd, Slurm, torchrun), SIGHUP (a closed terminal; POSIX only) and SIGBREAK
# (Ctrl-Break; Windows only).
STOP_SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")


def stop_signals() -> list[signal.Signals]:
    """The stop signals this platform has."""
    return [getattr(signal, name) for name in STOP_SIGNAL_NAMES if hasattr(signal, name)]


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived; raised in the main thread so every ``with``/``finally`` cleans up."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first stop signal into :class:`StopRequested` for the block (main thread only; elsewhere the
    block runs unchanged), so open outputs are aborted by their context managers; handlers restored after.
    Later signals are ignored until the block ends: a second Ctrl-C must not interrupt the abort itself
    (ffmpeg being stopped, a temporary file being removed) and leave a half-written file behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def raise_stop(signum: int, frame: object) -> None:
        if stopping:
            return  # the first stop is unwinding: let its clean-up finish
        stopping.append(signum)
        raise StopRequested(signum)

    previous = {}
    for sig in stop_signals():
        try:
            previous[sig] = signal.signal(sig, raise_stop)
        except (OSError, ValueError):  # not settable here (e.g. an embedded interpreter)
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun): its WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes, on every platform (0 if unknown)."""
    if sys.platform == "win32":
        return _psutil_peak()
    try:
        import resource  # POSIX only: imported here, never at module level
    except ImportError:
        return _psutil_peak()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _psutil_peak() -> int:
    try:
        import psutil
    except ImportError:
        return 0
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)  # peak on Windows, else the current RSS


# --- devices ---------------------------------------------------------------------------------------

DEVICE_CHOICES = ("auto", "cuda", "cuda:N", "mps", "cpu")


def trim_host_memory() -> bool:
    """Give freed heap memory back to the system where the C library keeps it (glibc: ``malloc_trim``; model
    weights of a few MB each come from its heap, which otherwise keeps the pages after they are freed).
    Whether anything was trimmed; a no-op elsewhere (Windows, macOS and musl return freed pages themselves
    or have no such call)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def rocm_version() -> str | None:
    """The HIP version of a ROCm build of torch (AMD GPUs report as "cuda"), else None."""
    return getattr(torch.version, "hip", None) or None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (a CUDA/ROCm GPU, else Apple's MPS, else the CPU), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``,
    checked against what this machine has."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: choose one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec!r}: this torch build sees no CUDA/ROCm GPU; use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec!r}: there are {torch.cuda.device_count()} GPUs (cuda:0.."
                              f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not mps_available():
        raise ConfigError(f"--device {spec!r}: Apple's MPS backend is not available here; use --device auto or cpu")
    elif device.type not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device {spec!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return device


def device_kind(device: torch.device) -> str:
    """A name for people: "CUDA", "ROCm", "MPS" or "CPU"."""
    if device.type == "cuda":
        return "ROCm" if rocm_version() else "CUDA"
    return {"mps": "MPS"}.get(device.type, "CPU")


def unified_memory(device: torch.device) -> bool:
    """Whether the device shares the host's memory (Apple silicon): offloading to the CPU saves nothing there."""
    return device.type == "mps"


def supported_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype``, or fp16 where the device cannot hold bf16 (MPS before macOS 14), saying so."""
    if dtype == torch.bfloat16 and device.type == "mps" and not mps_supports_bf16():
        log.warning("bf16 needs macOS 14 or newer on Apple's MPS; using fp16")
        return torch.float16
    return dtype


def mps_supports_bf16() -> bool:
    """bf16 on MPS needs macOS 14 (Sonoma) or newer."""
    if not mps_available():
        return False
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True
