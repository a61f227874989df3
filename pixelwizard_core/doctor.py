"""``doctor``: is this machine ready to generate, and which presets fit in which memory mode.

:func:`estimate_memory` is the peak GPU memory estimate (also the VRAM figure the ComfyUI frontend shows);
its formula and the origin of every coefficient are documented in BENCHMARKS.md ("Peak memory
estimate"), and ``tests/test_doctor.py`` checks that the two agree. :func:`run_checks` builds the report
of the ``doctor`` command; its exit code is 0 when nothing blocks generation and 1 otherwise.
"""

from __future__ import annotations

import importlib
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
from .errors import ConfigError, PixelWizardError
from .pipeline.presets import HR_PRESETS, LR_DEFAULTS, StageSettings, latent_frames
from .pipeline.tiled_decode import plan_tiles

log = logging.getLogger("pixelwizard")

GIB = 2**30

# --- the memory estimate (BENCHMARKS.md, "Peak memory estimate") ------------------------------------
# Parameter counts, from the manifests of the released files (tests/manifests/*.json).
DIT_PARAMS = 4_999_787_712
DIT_BLOCK_LINEAR_PARAMS = 4_907_335_680  # weights of the 30 blocks' Linears: what "fp8" stores in 1 byte
DIT_BLOCKS = 30
DIT_BLOCK_PARAMS = 163_656_704  # one block, everything (blocks.0.*): what block swap moves per block
HR_DT_PARAMS = 10_229_760  # dt_embedding, in the DiT's precision
HR_ADAPTER_PARAMS = 93_649_152  # spatial_adapter (anchor injector), kept in float32
T5_PARAMS = 5_680_910_336
VAE_PARAMS = 704_688_668  # the whole VAE is loaded (encoder too)

# Activation coefficients (BENCHMARKS.md, "Peak memory estimate": how each was measured or counted).
DIT_BYTES_PER_TOKEN = 51_200  # 50 KiB: lean DiT forward, batch 1, bf16 (measured slope 49.8 KiB)
DIT_CHUNK_BYTES = 536_870_912  # 512 MiB: one token chunk's FFN work (models.dit.FFN_CHUNK_BYTES; measured 217)
SAMPLER_BYTES_PER_TOKEN = 4_608  # 6 float32 latents of 768 B per token kept by the sampling loop (counted)
T5_ACTIVATION_BYTES = 536_870_912  # 512 MiB: umT5 on prompt + negative prompt, 2 x 512 tokens (measured 458)
VAE_CACHE_BYTES_PER_LATENT_PIXEL = 1_827_200  # float32 causal caches of the decoder (exact count; bf16: half)
VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL = 2_932_736  # activations while one latent frame decodes, float32 VAE
VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL = 1_527_808  # ... bf16 VAE (measured: a little more than half)
HEADROOM_BYTES = 1_610_612_736  # 1.5 GiB: CUDA context and allocator slack, added before comparing with a GPU
HEADROOM_FRACTION = 0.05  # ... plus this share of the estimate (fragmentation)

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 2}


@dataclass(frozen=True)
class MemoryMode:
    """A placement policy and the generate flags that select it."""

    name: str
    offload: bool  # idle models wait on the CPU
    t5_cpu: bool  # the text encoder runs on the CPU
    decode_order: str  # "frame" (all tiles' caches on the GPU) or "tile" (one tile at a time)
    vae_precision: str
    flags: str = ""
    description: str = ""
    swap_blocks: int = 0  # DiT blocks streamed from the CPU while the DiT runs (block swap)


MEMORY_MODES: dict[str, MemoryMode] = {
    "resident": MemoryMode("resident", False, False, "frame", "fp32", "--offload_model false",
                           "all four models stay on the GPU (fastest when it fits)"),
    "offload": MemoryMode("offload", True, False, "frame", "fp32", "--offload_model true",
                          "one model on the GPU at a time (the default on a GPU)"),
    "lowvram": MemoryMode("lowvram", True, True, "tile", "bf16",
                          "--offload_model true --t5_cpu --decode_order tile --vae_dtype bf16",
                          "also: text encoder on the CPU, one decode tile at a time, bf16 VAE"),
    "blockswap": MemoryMode("blockswap", True, True, "tile", "bf16",
                            "--offload_model true --t5_cpu --decode_order tile --vae_dtype bf16 --block_swap 10",
                            "lowvram, and the DiTs stream their last 10 blocks from the CPU while sampling",
                            swap_blocks=10),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of a run, per stage (bytes); ``peak`` is the largest."""

    stages: dict[str, int]
    mode: str

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def fits(self, gpu_bytes: int) -> bool:
        """Whether the estimate, with headroom, fits a GPU of ``gpu_bytes`` total memory."""
        return self.peak * (1 + HEADROOM_FRACTION) + HEADROOM_BYTES <= gpu_bytes


def weight_bytes(role: str, precision: str = "bf16", vae_precision: str = "fp32") -> int:
    """Bytes of a model's weights on the device, as the loader places them."""
    size = PRECISION_BYTES[precision]
    if role in ("lr", "hr"):
        dit = DIT_PARAMS * size
        if precision == "fp8":
            dit -= DIT_BLOCK_LINEAR_PARAMS  # those weights take 1 byte instead of 2
        return dit + (HR_DT_PARAMS * size + HR_ADAPTER_PARAMS * 4 if role == "hr" else 0)
    if role == "text":
        return T5_PARAMS * size
    if role == "vae":
        return VAE_PARAMS * PRECISION_BYTES[vae_precision]
    raise ConfigError(f"unknown model role {role!r}")


def block_swap_savings(swap_blocks: int, precision: str = "bf16") -> int:
    """DiT weight bytes block swap keeps off the GPU: the swapped blocks, less the two device slots that
    hold the block running and the next one in flight."""
    linear = DIT_BLOCK_LINEAR_PARAMS // DIT_BLOCKS
    size = PRECISION_BYTES[precision]
    block = (linear * (1 if precision == "fp8" else size)) + (DIT_BLOCK_PARAMS - linear) * size
    return (swap_blocks - min(swap_blocks, 2)) * block


def dit_activation_bytes(tokens: int, batch: int = 1) -> int:
    """Peak working memory of a sampling stage: one DiT forward over ``batch`` x ``tokens`` tokens, plus
    the loop's latents (sample, kept velocity, anchor, solver history)."""
    return batch * tokens * DIT_BYTES_PER_TOKEN + DIT_CHUNK_BYTES + tokens * SAMPLER_BYTES_PER_TOKEN


def decode_bytes(width: int, height: int, *, num_patches: int = 1, overlap: int = 3, patch_dim: str = "w",
                 order: str = "frame", vae_precision: str = "fp32") -> int:
    """Tiled decode beyond the VAE weights: causal caches, the largest tile's transient, the output chunk."""
    half = PRECISION_BYTES[vae_precision] == 2
    tiles = plan_tiles((height // 16, width // 16), num_patches, patch_dim, overlap)
    areas = [(t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiles]
    cached = sum(areas) if order == "frame" else max(areas)  # frame order keeps every tile's cache
    caches = cached * VAE_CACHE_BYTES_PER_LATENT_PIXEL // (2 if half else 1)
    transient = max(areas) * (VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL if half
                              else VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL)
    # float32 chunks of 4 frames x 3 channels: the blended frame (frame order only; tile order blends
    # on the host) and one tile's piece with its weighted copy (256 pixels per latent pixel)
    chunk = 4 * 3 * 4 * (height * width * (order == "frame") + 2 * 256 * max(areas))
    return int(caches + transient + chunk)


def estimate_memory(
    width: int,
    height: int,
    frames: int = LR_DEFAULTS.frames,
    *,
    mode: str | MemoryMode = "offload",
    precision: str = "bf16",
    num_patches: int | None = None,
    overlap: int = 3,
    patch_dim: str = "w",
    lr: StageSettings = LR_DEFAULTS,
) -> MemoryEstimate:
    """Peak GPU memory of one generate run at ``width`` x ``height`` on one GPU, per stage.

    ``mode`` is a name of :data:`MEMORY_MODES` (or a :class:`MemoryMode`); ``precision`` is the DiT and
    text encoder precision (bf16, fp16, fp32, or fp8 for the DiT's block weights); ``num_patches``
    defaults to the preset's decode tiles (3 at 2K, 4 at 4K, else 1). The LR anchor stage runs both CFG
    branches in one batch, the HR stage one after the other, as the pipeline does.
    """
    mode = MEMORY_MODES[mode] if isinstance(mode, str) else mode
    if num_patches is None:
        preset = next((p for p in HR_PRESETS.values() if (p.width, p.height) == (width, height)), None)
        num_patches = preset.decode_patches if preset else 1
    hr_tokens = latent_frames(frames) * (height // 32) * (width // 32)
    lr_tokens = latent_frames(frames) * (lr.height // 32) * (lr.width // 32)
    text_precision = "bf16" if precision == "fp8" else precision
    swapped = block_swap_savings(mode.swap_blocks, precision)
    weights = {"text": 0 if mode.t5_cpu else weight_bytes("text", text_precision),
               "lr": weight_bytes("lr", precision) - swapped, "hr": weight_bytes("hr", precision) - swapped,
               "vae": weight_bytes("vae", vae_precision=mode.vae_precision)}
    work = {
        "text": 0 if mode.t5_cpu else T5_ACTIVATION_BYTES,
        "lr": dit_activation_bytes(lr_tokens, batch=2),
        "hr": dit_activation_bytes(hr_tokens),
        "vae": decode_bytes(width, height, num_patches=num_patches, overlap=overlap, patch_dim=patch_dim,
                            order=mode.decode_order, vae_precision=mode.vae_precision),
    }
    resident = sum(weights.values())
    stages = {role: (resident if not mode.offload else weights[role]) + work[role] for role in work}
    return MemoryEstimate({_STAGE_NAMES[role]: value for role, value in stages.items()}, mode.name)


_STAGE_NAMES = {"text": "text", "lr": "anchor", "hr": "hr", "vae": "decode"}


def preset_table(frames: int = LR_DEFAULTS.frames, precision: str = "bf16") -> list[dict]:
    """Every preset in every memory mode: the rows of doctor's table."""
    rows = []
    for name, preset in HR_PRESETS.items():
        for mode in MEMORY_MODES.values():
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
    return {"python": platform.python_version(), "torch": torch.__version__,
            "CUDA (torch)": torch.version.cuda or "none (CPU build)", "cuDNN": str(cudnn or "none"),
            "platform": f"{platform.system()} {platform.machine()}"}


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
    """SDPA on the CPU (and CUDA), flash-attn 2 and 3 on CUDA: each by running a tiny kernel."""
    from .models.attention import attention

    checks = [_try_kernel("SDPA (cpu)", lambda q, k, v: attention(q, k, v, backend="sdpa"), "cpu",
                          torch.float32, 1e-4)]
    checks[0].blocking = True
    if torch.cuda.is_available():
        cuda = _try_kernel("SDPA (cuda)", lambda q, k, v: attention(q, k, v, backend="sdpa"), "cuda",
                           torch.bfloat16, 2e-2)
        cuda.blocking = True
        checks.append(cuda)
    for label, module, package in (("flash-attn 2", "flash_attn", "pip install flash-attn --no-build-isolation "
                                    "(or a prebuilt wheel matching your torch and CUDA)"),
                                   ("flash-attn 3 (Hopper)", "flash_attn_interface",
                                    "build flash-attn 3 from the flash-attention repo's hopper/ folder")):
        try:
            function = importlib.import_module(module).flash_attn_func
        except Exception as exc:  # ImportError, or a binary built for another torch (OSError, ...)
            reason = "not installed" if isinstance(exc, ModuleNotFoundError) else f"does not load: {exc}"[:200]
            checks.append(Check("Attention backends", label, False, f"{reason} (optional: SDPA is used)",
                                f"optional, for speed: {package}"))
            continue
        if not torch.cuda.is_available():
            checks.append(Check("Attention backends", label, False, "installed, but there is no CUDA GPU"))
            continue
        checks.append(_try_kernel(label, function, "cuda", torch.bfloat16, 2e-2))
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
    for file in dl.KNOWN_FILES:
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


def run_checks(models_dir: str | Path | None = None, frames: int = LR_DEFAULTS.frames) -> Report:
    """Run every check (a few seconds; nothing is downloaded) and return the report."""
    root = Path(models_dir).expanduser() if models_dir else dl.default_models_dir()
    report = Report(_versions(), _gpus(), models_dir=str(root))
    check_memory(report, frames)
    report.checks += check_attention()
    report.checks.append(check_ffmpeg())
    report.checks += check_models(root)
    return report
