"""The memory model: peak device memory of each stage, from parameter counts and measured coefficients.

Its formula and the origin of every coefficient are documented in BENCHMARKS.md ("Peak memory
estimate"); ``tests/test_doctor.py`` checks that the two agree. ``doctor`` reports it, the stages decide
CFG batching by it, the decode planner chooses tiles by it and the pool's ranks plan their share by it.
It also holds the one memory-mode vocabulary (:data:`MEMORY_MODES`) and doctor's named option sets
(:data:`PROFILES`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.block_swap import BlockLayout, pinned_bytes
from ..models.dit import AttentionBlock, DiTConfig
from ..models.layers import store_linears_in_fp8
from ..models.quantized import QUANT_TYPES, quantize_linears_on_meta
from ..registry import Registry
from .presets import HR_PRESETS, LR_DEFAULTS, StageSettings, latent_frames
from .tile_plan import plan_tiles

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
# GGUF precisions: the DiT's block Linears in a GGUF block type (models/quantized.py), the rest in bf16
GGUF_PRECISIONS = {t.name.lower(): t for t in QUANT_TYPES.values()}  # "q8_0", "q4_k", ...
# Bytes per weight of the blocks' Linears where they are not stored in the float precision
LINEAR_BYTES = {"fp8": 1.0, **{name: t.bytes_per_value for name, t in GGUF_PRECISIONS.items()}}


def float_bytes(precision: str) -> int:
    """Bytes per parameter of what a precision keeps in a float type (GGUF files load it in bf16)."""
    return 2 if precision in GGUF_PRECISIONS else PRECISION_BYTES[precision]


@dataclass(frozen=True)
class MemoryMode:
    """Where models wait and work: the one vocabulary of the loaders, the command line, the store and doctor.

    gpu: stay on the GPU between stages; offload: wait on the CPU; block_swap: wait on the CPU, and the DiTs
    stream their last blocks from pinned CPU memory while they run (pipeline/placement.py)."""

    offload: bool  # idle models wait on the CPU
    swap: bool  # the DiTs stream blocks while they run
    description: str


MEMORY_MODES: Registry[MemoryMode] = Registry("memory mode")
MEMORY_MODES.register("gpu", MemoryMode(False, False, "all models stay on the GPU between stages (fastest when it fits)"))
MEMORY_MODES.register("offload", MemoryMode(True, False, "one model on the GPU at a time, the others wait on the CPU"))
MEMORY_MODES.register("block_swap", MemoryMode(True, True, "offload, and the DiTs stream their last blocks from the "
                                                            "CPU while they run"))


@dataclass(frozen=True)
class MemoryProfile:
    """A named set of options in one memory mode (a row of doctor's table) and the generate flags for it."""

    name: str
    mode: str  # a MEMORY_MODES name
    t5_cpu: bool  # the text encoder runs on the CPU
    decode_order: str  # "frame" (all tiles' caches on the GPU) or "tile" (one tile at a time)
    vae_precision: str
    flags: str = ""
    description: str = ""
    swap_blocks: int = 0  # DiT blocks streamed from the CPU while the DiT runs (block swap)

    @property
    def offload(self) -> bool:
        return MEMORY_MODES.get(self.mode).offload


_LOW = "--offload_model true --t5_cpu --decode_order tile --vae_dtype bf16"
PROFILES: Registry[MemoryProfile] = Registry("memory profile")
for _profile in (
    MemoryProfile("gpu", "gpu", False, "frame", "fp32", "--offload_model false",
                  "all four models stay on the GPU (fastest when it fits)"),
    MemoryProfile("offload", "offload", False, "frame", "fp32", "--offload_model true",
                  "one model on the GPU at a time (the default on a GPU)"),
    MemoryProfile("lowvram", "offload", True, "tile", "bf16", _LOW,
                  "also: text encoder on the CPU, one decode tile at a time, bf16 VAE"),
    MemoryProfile("block_swap", "block_swap", True, "tile", "bf16", f"{_LOW} --block_swap 10",
                  "lowvram, and the DiTs stream their last 10 blocks from the CPU while sampling", swap_blocks=10),
):
    PROFILES.register(_profile.name, _profile)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of a run, per stage (bytes); ``peak`` is the largest."""

    stages: dict[str, int]
    mode: str
    pinned_host: int = 0  # page-locked host RAM block swap keeps for the DiTs (not GPU memory)

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
    size = float_bytes(precision)
    if role in ("lr", "hr"):
        dit = DIT_PARAMS * size
        if precision in LINEAR_BYTES:  # fp8 or GGUF blocks: those weights take fewer bytes than 2
            dit -= int(DIT_BLOCK_LINEAR_PARAMS * (size - LINEAR_BYTES[precision]))
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
    size = float_bytes(precision)
    block = int(linear * LINEAR_BYTES.get(precision, size)) + (DIT_BLOCK_PARAMS - linear) * size
    return (swap_blocks - min(swap_blocks, 2)) * block


@functools.cache
def swapped_block_layout(precision: str = "bf16") -> BlockLayout:
    """The host buffer of one swapped 5B DiT block, as block swap lays it out (built on the meta device)."""
    with torch.device("meta"):
        block = AttentionBlock(DiTConfig()).to(torch.float32 if precision == "fp32" else torch.bfloat16)
        if precision == "fp8":
            store_linears_in_fp8(block)
        elif precision == "fp16":
            block = block.half()
        elif precision in GGUF_PRECISIONS:
            quantize_linears_on_meta(block, GGUF_PRECISIONS[precision].name)
    tensors = [t for m in block.modules() for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    return BlockLayout.of([(tuple(t.shape), t.dtype) for t in tensors])


def pinned_host_bytes(swap_blocks: int, precision: str = "bf16", dits: int = 2) -> int:
    """Page-locked host RAM of block swap: each of ``dits`` DiTs keeps its ``swap_blocks`` swapped blocks in
    one registered buffer per block, whole pages (models/block_swap.py), also while it waits on the CPU."""
    return dits * swap_blocks * pinned_bytes(swapped_block_layout(precision).nbytes)


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
    mode: str | MemoryProfile = "offload",
    precision: str = "bf16",
    num_patches: int | None = None,
    overlap: int = 3,
    patch_dim: str = "w",
    lr: StageSettings = LR_DEFAULTS,
) -> MemoryEstimate:
    """Peak GPU memory of one generate run at ``width`` x ``height`` on one GPU, per stage.

    ``mode`` is a name of :data:`PROFILES` (or a :class:`MemoryProfile`); ``precision`` is the DiT and
    text encoder precision (bf16, fp16, fp32, or fp8 / a GGUF type such as q8_0 for the DiT's block
    weights, the text encoder then counted in bf16); ``num_patches``
    defaults to the preset's decode tiles (3 at 2K, 4 at 4K, else 1). The LR anchor stage runs both CFG
    branches in one batch, the HR stage one after the other, as the pipeline does.
    """
    mode = PROFILES.get(mode) if isinstance(mode, str) else mode
    if num_patches is None:
        preset = next((p for p in HR_PRESETS.values() if (p.width, p.height) == (width, height)), None)
        num_patches = preset.decode_patches if preset else 1
    hr_tokens = latent_frames(frames) * (height // 32) * (width // 32)
    lr_tokens = latent_frames(frames) * (lr.height // 32) * (lr.width // 32)
    text_precision = "bf16" if precision in LINEAR_BYTES else precision
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
    pinned = pinned_host_bytes(mode.swap_blocks, precision) if MEMORY_MODES.get(mode.mode).swap else 0
    return MemoryEstimate({_STAGE_NAMES[role]: value for role, value in stages.items()}, mode.name, pinned)


_STAGE_NAMES = {"text": "text", "lr": "anchor", "hr": "hr", "vae": "decode"}


def vae_precision_of(dtype: torch.dtype) -> str:
    """The ``vae_precision`` name of the estimate for a VAE of this dtype."""
    return "fp32" if torch.empty((), dtype=dtype).element_size() >= 4 else "bf16"


# GPU memory our stages leave to others on every GPU (ComfyUI's --reserve-vram, set by the node pack): an
# environment variable, so that the pool's worker processes honour it too
RESERVE_ENV = "PIXELWIZARD_RESERVE_VRAM_BYTES"


def reserved_bytes() -> int:
    """The memory :func:`free_device_bytes` keeps back (``PIXELWIZARD_RESERVE_VRAM_BYTES``; 0 if unset or bad)."""
    try:
        return max(0, int(os.environ.get(RESERVE_ENV, "0")))
    except ValueError:
        return 0


def free_device_bytes(device: torch.device | str) -> int | None:
    """Memory a stage on ``device`` may use now, or None where there is no budget (CPU, MPS, ...).

    On CUDA: the driver's free memory plus what PyTorch's caching allocator holds reserved but unused
    (it is reused before the driver is asked), less what is reserved for others (:func:`reserved_bytes`),
    less the allowance for allocator slack and fragmentation: ``(available - HEADROOM_BYTES) /
    (1 + HEADROOM_FRACTION)``, the inverse of "fits".
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    reusable = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    available = free + reusable - reserved_bytes()
    return max(0, int((available - HEADROOM_BYTES) / (1 + HEADROOM_FRACTION)))
