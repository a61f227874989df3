"""``doctor``: is this machine ready to generate, and which presets fit in which memory mode.

:func:`estimate_memory` is the peak GPU memory estimate (also the VRAM figure the ComfyUI frontend shows);
its formula and the origin of every coefficient are documented in BENCHMARKS.md ("Peak memory
estimate"), and ``tests/test_doctor.py`` checks that the two agree. :func:`run_checks` builds the report
of the ``doctor`` command; its exit code is 0 when nothing blocks generation and 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import download as dl
from .errors import PixelWizardError
from .pipeline.memory import GIB, PROFILES, estimate_memory, pinned_host_bytes, swapped_block_layout
from .pipeline.presets import HR_PRESETS, LR_DEFAULTS
from .system import device_kind, resolve_device, rocm_version, unified_memory

log = logging.getLogger("pixelwizard")

def preset_table(frames: int = LR_DEFAULTS.frames, precision: str = "bf16") -> list[dict]:
    """Every preset in every memory mode: the rows of doctor's table."""
    rows = []
    for name, preset in HR_PRESETS.items():
        for mode in PROFILES.values():
            estimate = estimate_memory(preset.width, preset.height, frames, mode=mode, precision=precision)
            rows.append({"preset": name, "width": preset.width, "height": preset.height, "mode": mode.name,
                         "flags": mode.flags, "peak_gib": round(estimate.peak_gib, 1),
                         "peak_stage": estimate.peak_stage, "estimate": estimate})
    return rows


# --- the checks ------------------------------------------------------------------------------------


@dataclass
class Check:
    """One line of the report. ``blocking`` checks that fail make the exit code 1."""

    section: str
    name: str
    ok: bool
    detail: str
    fix: str = ""
    blocking: bool = False


@dataclass
class Gpu:
    index: int
    name: str
    capability: str
    total_bytes: int
    free_bytes: int


@dataclass
class Report:
    """Everything doctor found; ``exit_code`` is 0 when nothing blocks generation, else 1."""

    versions: dict[str, str]
    gpus: list[Gpu]
    checks: list[Check] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    models_dir: str = ""

    @property
    def blockers(self) -> list[Check]:
        return [c for c in self.checks if c.blocking and not c.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.blockers else 0

    def render(self) -> str:
        """The report as text for people."""
        out = ["PixelWizard doctor", ""]
        out += [f"  {name:<14} {value}" for name, value in self.versions.items()]
        out.append("")
        if self.gpus:
            for gpu in self.gpus:
                out.append(f"  GPU {gpu.index}: {gpu.name} (compute {gpu.capability}), "
                           f"{gpu.total_bytes / GIB:.1f} GiB, {gpu.free_bytes / GIB:.1f} GiB free")
        else:
            out.append("  GPUs: none (no CUDA device visible to torch)")
        section = None
        for check in self.checks:
            if check.section != section:
                section = check.section
                out += ["", section]
            mark = "ok  " if check.ok else ("FAIL" if check.blocking else "--  ")
            out.append(f"  {mark} {check.name:<34} {check.detail}")
            if not check.ok and check.fix:
                out.append(f"       -> {check.fix}")
        out += ["", self._memory_table(), ""]
        if self.blockers:
            out.append(f"Not ready: {len(self.blockers)} problem(s) block generation (exit code 1):")
            out += [f"  - {c.name}: {c.fix or c.detail}" for c in self.blockers]
        else:
            out.append("Ready to generate (exit code 0).")
        return "\n".join(out)

    def _memory_table(self) -> str:
        gpu = max(self.gpus, key=lambda g: g.total_bytes) if self.gpus else None
        fits_head = f"fits GPU {gpu.index} ({gpu.total_bytes / GIB:.0f} GiB)" if gpu else "fits (no GPU)"
        lines = ["Memory: estimated peak GPU memory of one run, single GPU (BENCHMARKS.md, 'Peak memory estimate')",
                 f"  {'preset':<16} {'mode':<9} {'peak':>9}  {'largest at':<10} {fits_head:<22} flags"]
        for row in self.memory:
            fits = "-" if gpu is None else ("yes" if row["estimate"].fits(gpu.total_bytes) else "no")
            lines.append(f"  {row['preset'] + ' ' + str(row['width']) + 'x' + str(row['height']):<16} "
                         f"{row['mode']:<9} {row['peak_gib']:>5.1f} GiB  {row['peak_stage']:<10} {fits:<22} "
                         f"{row['flags']}")
        return "\n".join(lines)

    def to_json(self) -> str:
        memory = [{k: v for k, v in row.items() if k != "estimate"} | {"stages_gib": {
            s: round(b / GIB, 2) for s, b in row["estimate"].stages.items()}} for row in self.memory]
        data = {"versions": self.versions, "gpus": [asdict(g) for g in self.gpus],
                "checks": [asdict(c) for c in self.checks], "memory": memory, "models_dir": self.models_dir,
                "exit_code": self.exit_code}
        return json.dumps(data, indent=2)


def _versions() -> dict[str, str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    device = resolve_device("auto")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "CUDA (torch)": torch.version.cuda or "none (CPU build)", "ROCm (torch)": rocm_version() or "none",
            "cuDNN": str(cudnn or "none"), "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
            "device": f"{device_kind(device)} ({device}; --device auto picks it)"
                      + (", unified memory: offloading saves nothing" if unified_memory(device) else "")}


def _gpus() -> list[Gpu]:
    gpus = []
    if not torch.cuda.is_available():
        return gpus
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(Gpu(index, props.name, f"{props.major}.{props.minor}", total, free))
    return gpus


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention in float64, layout [B, L, heads, head_dim]."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2)


def _try_kernel(name: str, run, device: str, dtype: torch.dtype, tolerance: float) -> Check:
    """Run ``run(q, k, v)`` on a tiny problem and compare it with plain attention."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 128, generator=generator).to(device, dtype) for _ in range(3))
    try:
        out = run(q, k, v)
        if isinstance(out, tuple):
            out = out[0]
        expected = _reference_attention(q, k, v)
        error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    except Exception as exc:  # any failure of an optional kernel is reported, not raised
        return Check("Attention backends", name, False, f"fails: {type(exc).__name__}: {exc}"[:300],
                     "the attention backend 'auto' falls back to SDPA; reinstall the package to use it")
    ok = error <= tolerance
    return Check("Attention backends", name, ok, f"works on {device} ({str(dtype)[6:]}, rel. error {error:.1e})"
                 if ok else f"WRONG results on {device}: rel. error {error:.1e}",
                 "" if ok else "uninstall or rebuild it; use --attention sdpa")


def check_attention() -> list[Check]:
    """Every registered attention backend on the CPU and on CUDA (when present), each by running a tiny
    kernel; SDPA must work, the others are optional."""
    from .models.attention import ATTENTION_BACKENDS

    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    checks = []
    for name, backend in ATTENTION_BACKENDS.items():
        for device in devices:
            label = f"{name} ({device})"
            reason = backend.unavailable(torch.device(device))
            if reason is not None:
                if device == "cuda" or len(devices) == 1:  # a CUDA-only backend on the CPU is not news
                    checks.append(Check("Attention backends", label, False, f"not available: {reason}"[:300],
                                        f"optional, for speed: {backend.install_hint}" if backend.install_hint else ""))
                continue
            dtype, tolerance = (torch.float32, 1e-4) if device == "cpu" else (torch.bfloat16, 2e-2)
            check = _try_kernel(label, backend.run, device, dtype, tolerance)
            check.blocking = name == "sdpa"
            checks.append(check)
    return checks


def check_ffmpeg() -> Check:
    """Write and read back a 3-frame mp4 with the ffmpeg of imageio-ffmpeg."""
    from .io.video import VideoWriter, ffmpeg_exe, read_video

    quiet = logging.getLogger("pixelwizard").level
    logging.getLogger("pixelwizard").setLevel(logging.WARNING)  # the writer's "wrote ..." is not news here
    try:
        exe = ffmpeg_exe()
        version = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "doctor.mp4"
            with VideoWriter(path, fps=24) as writer:
                writer.append(torch.linspace(-1, 1, 3 * 64 * 64 * 3).reshape(3, 64, 64, 3))
            frames = read_video(path)
        if tuple(frames.shape) != (3, 64, 64, 3):
            raise PixelWizardError(f"wrote 3 frames of 64x64, read back {tuple(frames.shape)}")
    except Exception as exc:
        return Check("Video", "ffmpeg (imageio-ffmpeg)", False, f"fails: {type(exc).__name__}: {exc}"[:300],
                     "pip install --force-reinstall imageio-ffmpeg", blocking=True)
    finally:
        logging.getLogger("pixelwizard").setLevel(quiet)
    first = " ".join(version.split()[:3]) if version else exe
    return Check("Video", "ffmpeg (imageio-ffmpeg)", True, f"writes and reads mp4 ({first})")


def check_models(root: Path) -> list[Check]:
    """Every known file that is present, checked by its header; then what the 2K and 4K runs miss."""
    checks = []
    for file in dl.known_files():
        path = dl.locate(file, root)
        if path is None:
            continue
        try:
            problem = dl.check_file(file, path)
        except PixelWizardError as exc:
            problem = str(exc)
        checks.append(Check("Model files", file.name, problem is None,
                            f"{path.stat().st_size / 1e9:.2f} GB, keys check out" if problem is None else problem,
                            f"delete it and run: python -m pixelwizard_core download {file.key}"))
    for name, preset in HR_PRESETS.items():
        found, missing = dl.run_files(root, preset.width, preset.height)
        bad = [c for c in checks if not c.ok and any(str(p).endswith(c.name) for p in found.values())]
        ok = not missing and not bad
        detail = "all files present" if ok else (
            "missing: " + ", ".join(f.name for f in missing) if missing else "a file it needs is broken")
        items = " ".join(f.key for f in missing)
        checks.append(Check("Model files", f"files for a {name} run", ok, detail,
                            f"python -m pixelwizard_core download {items} --models {root}" if missing else
                            "replace the broken file (see above)", blocking=name == "2k"))
    return checks


def check_memory(report: Report, frames: int) -> None:
    report.memory = preset_table(frames)
    if not report.gpus:
        report.checks.append(Check(
            "GPU", "CUDA GPU", False, "none: torch sees no CUDA device",
            "2K/4K generation needs an NVIDIA GPU with a CUDA build of torch (see pytorch.org for the install "
            "command); on this machine only `python -m pixelwizard_core generate --demo` runs", blocking=True))
        return
    gpu = max(report.gpus, key=lambda g: g.total_bytes)
    fitting = [row for row in report.memory if row["estimate"].fits(gpu.total_bytes)]
    names = sorted({row["preset"] for row in fitting})
    detail = (f"{', '.join(names)} fit on GPU {gpu.index} ({gpu.total_bytes / GIB:.0f} GiB)" if names
              else f"no preset fits on GPU {gpu.index} ({gpu.total_bytes / GIB:.0f} GiB) in any memory mode")
    report.checks.append(Check("GPU", "presets that fit", bool(names), detail,
                               "use several GPUs (torchrun ... --ulysses_size N) or a smaller --resolution",
                               blocking=True))


def check_pinned_memory() -> Check:
    """The host RAM the block_swap profile page-locks (both DiTs' swapped blocks, also while they wait on the
    CPU), against this machine's RAM: page-locked memory cannot be swapped out."""
    import psutil

    profile = PROFILES["block_swap"]
    pinned, total = pinned_host_bytes(profile.swap_blocks), psutil.virtual_memory().total
    block = swapped_block_layout().nbytes
    return Check("Host memory", "pinned RAM (block_swap)", pinned <= total / 2,
                 f"{pinned / GIB:.1f} GiB page-locked (2 DiTs x {profile.swap_blocks} blocks of {block / 2**20:.0f} MiB, "
                 f"one buffer each) of {total / GIB:.0f} GiB RAM",
                 "stream fewer blocks (--block_swap N) or use the lowvram profile")


def run_checks(models_dir: str | Path | None = None, frames: int = LR_DEFAULTS.frames) -> Report:
    """Run every check (a few seconds; nothing is downloaded) and return the report."""
    root = Path(models_dir).expanduser() if models_dir else dl.default_models_dir()
    report = Report(_versions(), _gpus(), models_dir=str(root))
    check_memory(report, frames)
    report.checks.append(check_pinned_memory())
    report.checks += check_attention()
    report.checks.append(check_ffmpeg())
    report.checks += check_models(root)
    return report
