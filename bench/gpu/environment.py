"""The environment a run is read against: versions, the device, and its measured ceilings (bf16 matmul
rate, device and host-to-device copy bandwidths: what offload and block swap move through)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from pixelwizard_core.models.attention import resolve_backend

ROOT = Path(__file__).resolve().parents[2]


def _version(*distributions: str) -> str | None:
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _host() -> dict:
    """Host memory and the repository's commit (None where they cannot be read)."""
    env = {}
    try:
        env["host_memory_bytes"] = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        env["host_memory_bytes"] = None
    try:
        env["repo_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["repo_commit"] = None
    return env


def _gpu(device: torch.device) -> dict:
    """The GPU's properties, the SDPA and TF32 switches, and what nvidia-smi says."""
    props = torch.cuda.get_device_properties(device)
    env = dict(gpu=props.name, gpu_total_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
               gpu_multiprocessors=props.multi_processor_count,
               sdpa_backends_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                      "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                      "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                                      "math": torch.backends.cuda.math_sdp_enabled()},
               matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
        env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        env["driver"] = env["nvidia_smi"].split(",")[1].strip() if "," in env["nvidia_smi"] else None
    except (OSError, subprocess.SubprocessError) as error:
        env["nvidia_smi"] = f"not available: {error}"
        env["driver"] = None
    return env


def environment(device: torch.device, attention: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "flash_attn": _version("flash-attn", "flash_attn"),
           "flash_attn_3": _version("flash-attn-3", "flash_attn_3", "flashattn-hopper"),
           "attention_backend_requested": attention, "attention_backend": resolve_backend(attention, device),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    env.update(_host())
    if device.type != "cuda":
        return env
    env.update(_gpu(device))
    env["ceilings"] = ceilings(device)
    return env


def _event_seconds(device: torch.device, fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn()`` between CUDA events, after one untimed call."""
    fn()
    torch.cuda.synchronize(device)
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        begin.record()
        fn()
        finish.record()
        finish.synchronize()
        times.append(begin.elapsed_time(finish) / 1e3)
    return statistics.median(times)


def _matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / _event_seconds(device, lambda: a @ b, 10) / 1e12


def _copy_gbps(device: torch.device, source: str, elements: int = 2**28) -> float:
    """Bytes per second of a copy into the device: from the device (read + write counted), or from pinned or
    pageable host memory (bytes moved)."""
    if source == "device":
        src = torch.randn(elements, device=device)
    else:
        src = torch.randn(elements // 4)
        src = src.pin_memory() if source == "pinned" else src
    dst = torch.empty(src.shape, device=device)
    seconds = _event_seconds(device, lambda: dst.copy_(src, non_blocking=source == "pinned"), 3)
    return src.numel() * 4 * (2 if source == "device" else 1) / seconds / 1e9


def ceilings(device: torch.device) -> dict:
    """The device's measured rates, to read the stage figures against: a bf16 matmul, a device copy, and
    host-to-device copies from pinned and pageable memory (what offload and block swap move through)."""
    out = {}
    try:
        out["bf16_matmul_tflops"] = _matmul_tflops(device)
        out["device_copy_gbps_read_plus_write"] = _copy_gbps(device, "device")
        out["host_to_device_pinned_gbps"] = _copy_gbps(device, "pinned")
        out["host_to_device_pageable_gbps"] = _copy_gbps(device, "pageable")
    except Exception as error:  # noqa: BLE001 - a ceiling that cannot be measured is reported, not fatal
        out["error"] = f"{type(error).__name__}: {error}"[:300]
    torch.cuda.empty_cache()
    return out
