"""One-command GPU benchmark and memory profile of PixelWizard at the real model sizes (random weights).

    python3 bench/gpu_benchmark.py --out bench_gpu.json     # a CUDA GPU: about 8 minutes on one H100
    python bench/gpu_benchmark.py --small --device cpu      # tiny configs on the CPU: under a minute

What it does. It builds the four models of a run at their real sizes by default (``DiTConfig()`` for the
LR DiT, ``WanHRDiT(DiTConfig())`` with its anchor injector, the real umT5-XXL encoder, the real Wan2.2
VAE) with random weights, each built on the meta device and materialised on the compute device with
``to_empty`` and a random init (bf16; the injector and the VAE float32, as the loaders place them), so a
5B model never lives in host RAM in float32. Never from files. Then, for each memory mode, it runs the
stages of a ``generate`` with the library's own code (``TextEncoder.encode``, ``lr_anchor``, ``hr_latent``,
``tiled_decode_stream``), placing every model with ``pipeline.placement.on_device``:

* ``gpu``: every model stays on the device (``home`` = device);
* ``offload``: only the stage's model is on the device (``home`` = "cpu");
* ``block_swap_N``: as offload, and the DiTs stream their last N blocks from pinned host memory
  (``swap_blocks`` = N; one entry per ``--swap-blocks`` value). Block swap changes the DiT stages only, so
  the text and decode stages are not run again in these modes (the JSON points at offload's).

Stages: text (prompt + negative, 512 tokens each, one batch), LR (448x256, both CFG branches in one batch
as ``lr_anchor`` runs them), HR at each size (2K 2560x1440, 4K 3840x2144; cond and uncond one after the
other as ``hr_latent`` runs them), decode at each size (the preset's tiles along the width, overlap 3;
``order`` frame and tile), all for 121 frames. Stages are stopped after a few steps (an exception from the
step callback): the memory of a step is that of every step, and the full stage is extrapolated.

Memory of a stage (CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after
``reset_peak_memory_stats``):

* weights: allocated once the model is placed (in ``gpu`` mode that is every model);
* inputs: allocated after the stage's inputs are put on the device, minus weights;
* peak: the largest allocated during the stage; activations = peak - weights - inputs;
* decode, caches: the VAE's causal caches, measured between latent frames (the step callback runs after
  each tile of each latent frame, when that frame's transient activations are freed): allocated there
  minus weights, inputs, the blend masks, each tile's latent after conv2, each tile's last decoded piece
  and the output chunk (sizes known from their shapes), at the last latent frame (steady state: every
  cache then holds its 2 frames; in tile order the largest over the tiles). ``cache_expected_bytes`` is
  the exact count from meta tensors. This reads the caches directly instead of differencing a 1- and a
  2-frame decode, whose peaks also differ by the second frame's larger transient and output (4 frames
  instead of 1). transient = peak - weights - inputs - caches: one latent frame of one tile at work.

On the CPU (``--small``) there is one memory, so the device's is emulated: each mode runs in a fresh
process (``--isolate``, default on the CPU only) that holds exactly the models the mode keeps on the
device; a model whose home is off the device is built when its stage starts and freed after it (on a
GPU it waits in host RAM, which is not device memory). Memory is RssAnon above the process start (after
the one-time cost of building models, tens of MB of Python objects, is paid); the peak is the larger of
RssAnon sampled every 2 ms (bench/peak_memory.py's method) and the high-water mark VmHWM, reset through
/proc/self/clear_refs (bench/memory_estimate.py's), less the file-backed resident set. The process runs
with MALLOC_MMAP_THRESHOLD_=65536 (it re-executes itself with it) so that freed tensors leave the
resident set at once. Block swap on the CPU streams from the same memory, so there its figures only show
that the code runs; tile order's host canvas is subtracted from its caches there.

Timing: ``torch.cuda.synchronize`` around every step (steps last seconds, so host clocks suffice). A
step of the LR or HR stage is the guided velocity (one batched forward at LR, cond + uncond forwards at
HR) plus the solver update. Before the first HR stage, one HR step at the LR size loads the kernels. LR:
1 warm-up step + ``--lr-steps`` timed. HR in the first mode: 1 full-size warm-up step + ``--hr-steps``
timed steps (one value per size; default 2 at 2K and 0 at 4K, where one step is 1 to 2 minutes and the
first step, after the 2K run and the kernel warm-up, is the timing); other modes: one step each, which is
both their memory measurement and their step time. Decode: ``--decode-frames`` latent frames per tile;
the time per latent frame is the median of the frames after the first, and the whole video's decode is
extrapolated from it (said so in the output). Text: 1 warm-up + 2 timed encodes.

Budget: ``--budget-s`` (default 450 on CUDA, none on the CPU) bounds the run: an HR stage runs only the
steps that its predicted step time (measured so far, scaled by FLOPs from the other size, or its FLOPs at
300 TFLOP/s before any) fits into what is left, a decode is predicted from the last one at its size, and
what does not fit is reported as skipped; the HR stages of the later modes at the larger sizes run last.
Out-of-memory errors are caught per stage and mode, reported as "OOM at X GiB", the memory is freed and
the run goes on. The JSON is rewritten after every stage, so a run cut short keeps what it did.

Output: a markdown table on stdout (``--out X.json`` also writes it to ``X.md``) and the JSON with every
figure and the environment (GPU, driver, torch/CUDA/cuDNN/flash-attn versions, attention backend,
measured matmul rate and copy bandwidths). ``--render X.json`` prints the tables of an earlier run.
Progress goes to stderr. Needs only torch and this repository (no text is tokenized, so not ftfy).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SEED = 0
ORDERS = ("frame", "tile")
OVERLAP = 3  # latent columns added on each interior side of a decode tile (the reference's default)
ASSUMED_TFLOPS = 300.0  # used to predict the first HR step before any step was measured (bf16, CUDA)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from pixelwizard_core import doctor  # noqa: E402
from pixelwizard_core.models.attention import resolve_backend  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE, decoder_cache_elements  # noqa: E402
from pixelwizard_core.pipeline.placement import module_of, on_device  # noqa: E402
from pixelwizard_core.pipeline.presets import HR_CFG, HR_PRESETS, LR_DEFAULTS, StageSettings, latent_frames  # noqa: E402
from pixelwizard_core.pipeline.stages import hr_latent, lr_anchor  # noqa: E402
from pixelwizard_core.pipeline.text import TextConditioning, TextEncoder  # noqa: E402
from pixelwizard_core.pipeline.tiled_decode import SCALE, plan_tiles, tiled_decode_stream  # noqa: E402



def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


_START = time.perf_counter()


# ------------------------------------------------------------------------------------------------
# What is benchmarked


@dataclass(frozen=True)
class HRSize:
    label: str
    width: int
    height: int
    shift: float
    steps: int
    patches: int  # decode tiles along the width


@dataclass(frozen=True)
class Setup:
    """Model configs and stage sizes: the real ones, or tiny ones for the CPU (``--small``)."""

    dit: DiTConfig
    t5: T5Config
    vae: VAEConfig
    lr: StageSettings
    sizes: tuple[HRSize, ...]
    prompt_tokens: tuple[int, int]  # true lengths of the prompt and the negative prompt (of text_len)
    swap_blocks: tuple[int, ...]
    small: bool

    @property
    def frames(self) -> int:
        return self.lr.frames

    def hr_settings(self, size: HRSize) -> StageSettings:
        return StageSettings(size.width, size.height, self.frames, size.steps, size.shift, HR_CFG)


def real_setup() -> Setup:
    sizes = tuple(HRSize(name, p.width, p.height, p.shift, p.steps, p.decode_patches) for name, p in HR_PRESETS.items())
    # the Wan default negative prompt is ~120 umT5 tokens; a typical prompt about as long
    return Setup(DiTConfig(), T5Config(), VAEConfig(), LR_DEFAULTS, sizes, (120, 126), (10, 20), False)


def small_setup() -> Setup:
    """Real structure (48 latent channels, head_dim 64, 4 DiT blocks), tiny widths; weights of a few MB each
    so that which models are resident shows clearly in the resident set."""
    dit = DiTConfig(dim=256, ffn_dim=1024, freq_dim=64, num_heads=4, num_layers=4, text_len=64, text_dim=128)
    t5 = T5Config(vocab=8192, dim=128, dim_attn=128, dim_ffn=512, num_heads=4, num_layers=2, text_len=64)
    lr = StageSettings(width=128, height=64, frames=9, steps=50, shift=5.0, cfg=5.0)
    sizes = (HRSize("2k", 256, 160, 5.5, 4, 3), HRSize("4k", 384, 224, 5.8, 4, 4))
    return Setup(dit, t5, VAEConfig.tiny(), lr, sizes, (20, 24), (1, 2), True)


@dataclass(frozen=True)
class Mode:
    """A memory mode: where models wait between stages, and how many DiT blocks are streamed."""

    name: str  # gpu | offload | block_swap
    swap_blocks: int = 0

    @property
    def key(self) -> str:
        return f"block_swap_{self.swap_blocks}" if self.swap_blocks else self.name

    @property
    def resident(self) -> bool:
        return self.name == "gpu"


# ------------------------------------------------------------------------------------------------
# Memory meters


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
    2 ms by a thread (bench/peak_memory.py's method; it can miss a short peak) and the kernel's high-water
    mark VmHWM, reset through /proc/self/clear_refs (no gaps; bench/memory_estimate.py's method), less the
    file-backed part of the resident set now (which only grows)."""

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


# ------------------------------------------------------------------------------------------------
# Models


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Random weights that keep activations of order 1: matrices ~ N(0, 1/fan_in), norm scales 1, biases
    small (never zeros: zeros can time differently from real data)."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.dim() > 1:
            param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.02, generator=generator)
        else:
            param.fill_(1.0)


ROLES = ("text", "lr", "hr", "vae")
DIT_ROLES = ("lr", "hr")


@dataclass(frozen=True)
class Spec:
    """How a role's model is made: its class and config, its dtype, and the parts kept in float32."""

    factory: Callable[[], nn.Module]
    dtype: torch.dtype
    float32_parts: tuple[str, ...] = ()

    def on_meta(self) -> nn.Module:
        with torch.device("meta"):
            model = self.factory()
        model = model.to(self.dtype)
        for part in self.float32_parts:
            getattr(model, part).float()
        return model


def specs(setup: Setup) -> dict[str, Spec]:
    """bf16 DiTs and text encoder; the HR injector and the VAE in float32, as the loaders place them."""
    return {"text": Spec(lambda: UMT5Encoder(setup.t5), torch.bfloat16),
            "lr": Spec(lambda: WanDiT(setup.dit), torch.bfloat16),
            "hr": Spec(lambda: WanHRDiT(setup.dit), torch.bfloat16, ("spatial_adapter",)),
            "vae": Spec(lambda: WanVAE(setup.vae), torch.float32)}


def build(spec: Spec, device: torch.device, seed: int = SEED) -> nn.Module:
    """The model built on the meta device, cast, then materialised on ``device`` and randomized there."""
    model = spec.on_meta().to_empty(device=device)
    randomize(model, seed)
    return model.eval().requires_grad_(False)


def model_bytes(setup: Setup) -> dict[str, int]:
    """Bytes of each role's weights as built (from meta tensors)."""
    return {role: sum(t.numel() * t.element_size() for t in spec.on_meta().parameters())
            for role, spec in specs(setup).items()}


def warm_host_process(setup: Setup) -> None:
    """Pay the one-time host memory of building models (tens of MB of Python objects the first time a
    model class is built under the meta device) before the CPU meter takes its starting point."""
    model_bytes(setup)
    build(Spec(lambda: nn.Linear(64, 64), torch.bfloat16), torch.device("cpu"))
    gc.collect()


class RandomTokens:
    """Stands in for the umT5 tokenizer: random ids for every position, the mask of the given true lengths
    (the encoder runs all text_len positions whatever the lengths)."""

    def __init__(self, vocab: int, max_length: int, lengths: tuple[int, int]) -> None:
        generator = torch.Generator().manual_seed(SEED)
        self.max_length = max_length
        self.ids = torch.randint(1, vocab, (len(lengths), max_length), generator=generator)
        positions = torch.arange(max_length)
        self.mask = torch.stack([(positions < n).long() for n in lengths])

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[:len(prompts)], self.mask[:len(prompts)]


class ModelPool:
    """The four models and where they are. All placement goes through ``placement.on_device``.

    CUDA: every model is built once; entering a mode moves each to its home (the device for "gpu", the
    CPU otherwise). CPU (one memory): a model whose home is off the device is not kept; it is built when
    its stage starts and freed after (see the module docstring)."""

    def __init__(self, setup: Setup, device: torch.device, meter, attention: str, compile_blocks: bool) -> None:
        self.setup, self.device, self.meter = setup, device, meter
        self.attention, self.compile_blocks = attention, compile_blocks
        self.emulated = device.type != "cuda"
        self.models: dict[str, object] = {}
        self.mode: Mode | None = None

    def home(self, mode: Mode) -> torch.device:
        return self.device if mode.resident else torch.device("cpu")

    def bytes_on_device(self) -> int:
        """Parameters and buffers of every model that sit on the device now (a cross-check of "weights")."""
        tensors = {id(t): t for m in self.models.values() for t in [*module_of(m).parameters(),
                                                                      *module_of(m).buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values() if t.device == self.device)

    def _build(self, role: str) -> object:
        model = build(specs(self.setup)[role], self.device, seed=SEED + ROLES.index(role))
        if role == "text":
            return TextEncoder(model, RandomTokens(self.setup.t5.vocab, self.setup.t5.text_len, self.setup.prompt_tokens))
        if role == "vae":
            return model
        resolve_backend(self.attention, self.device)  # refuses an impossible choice now
        model.attn_backend = self.attention
        if self.compile_blocks:
            for block in model.blocks:
                block.compile()
        return model

    def build_all(self, first: Mode) -> None:
        """CUDA: build every model on the device, each moved to its home in ``first`` before the next is
        built (so only one model at a time must fit when ``first`` is not resident)."""
        if self.emulated:
            return
        self.mode = first
        for role in ROLES:
            start = time.perf_counter()
            try:
                self.models[role] = self._build(role)
            except torch.cuda.OutOfMemoryError:  # the models do not fit together: park them on the host
                self.evacuate()
                self.models[role] = self._build(role)
            self._send_home(role, self.mode or Mode("offload"))
            log(f"built {role} in {time.perf_counter() - start:.1f} s")

    def _send_home(self, role: str, mode: Mode) -> None:
        home = self.home(mode)
        with on_device(self.models[role], home, home=home):
            pass

    def enter(self, mode: Mode) -> None:
        """Put every model where ``mode`` keeps it between stages (raises on OOM: the caller reports it)."""
        if self.mode == mode:
            return
        self.mode = mode
        if self.emulated:
            if mode.resident:
                for role in ROLES:
                    if role not in self.models:
                        self.models[role] = self._build(role)
            else:
                self.models.clear()
            self.meter.free()
            return
        for role in ROLES:
            self._send_home(role, mode)
        self.meter.free()

    def evacuate(self) -> None:
        """After an out-of-memory error while placing models: every model back in host memory."""
        self.mode = None
        if self.emulated:
            self.models.clear()
        else:
            self.meter.free()
            for role in self.models:
                self._send_home(role, Mode("offload"))
        self.meter.free()

    @contextlib.contextmanager
    def use(self, role: str, mode: Mode, record: dict) -> Iterator[object]:
        """The model of ``role`` placed on the device as ``mode`` places it; placement times in ``record``."""
        if role not in self.models:  # only when emulating on the CPU
            self.models[role] = self._build(role)
        model = self.models[role]
        swap = mode.swap_blocks if role in DIT_ROLES else 0
        self.meter.sync()
        start = time.perf_counter()
        try:
            with on_device(model, self.device, home=self.home(mode), swap_blocks=swap) as placed:
                self.meter.sync()
                record["placement_seconds"] = time.perf_counter() - start
                record["model_bytes_on_device"] = self.bytes_on_device()
                yield placed
                self.meter.sync()
                start = time.perf_counter()
            record["return_seconds"] = time.perf_counter() - start
        finally:
            if self.emulated and not mode.resident:
                self.models.pop(role, None)


# ------------------------------------------------------------------------------------------------
# Stages


class _Stop(Exception):
    """Raised from a step callback to end a stage after the steps that were asked for."""


def run_steps(meter, run: Callable[[Callable[[int, int], None]], object], steps: int, label: str = "") -> list[float]:
    """Seconds of each of the first ``steps`` steps of ``run(on_step)`` (device synchronised); each step is
    logged when ``label`` is given."""
    stamps: list[float] = []

    def on_step(done: int, total: int) -> None:
        meter.sync()
        stamps.append(time.perf_counter())
        if label:
            log(f"{label}: step {done}/{steps} {stamps[-1] - (stamps[-2] if len(stamps) > 1 else start):.2f} s")
        if done >= steps:
            raise _Stop

    meter.sync()
    start = time.perf_counter()
    try:
        run(on_step)
    except _Stop:
        pass
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


def dit_forward_flops(config: DiTConfig, tokens: int, batch: int = 1, injector: bool = False) -> float:
    """Multiply-adds x 2 of one DiT forward (the architecture note's §7.1 count, with our single modulation
    row): the blocks' Linears, self-attention (4 L^2 d), cross-attention to text_len rows, and the HR
    injector's convolutions when ``injector``."""
    d, f, n, text = config.dim, config.ffn_dim, config.num_layers, config.text_len
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * text * 2 * d * d
    attention = 4 * tokens * tokens * d + 4 * tokens * text * d
    total = n * (linear + attention) + 2 * tokens * d * (config.in_dim * 4 + config.out_dim * 4)
    if injector:
        mid = d // 4
        total += 2 * tokens * (config.in_dim * mid + 27 * mid * d + d * d)
    return float(batch * total)


class Bench:
    """Runs the stages, keeps every figure in ``self.results`` and writes the JSON after each stage."""

    def __init__(self, args: argparse.Namespace, setup: Setup, device: torch.device) -> None:
        self.args, self.setup, self.device = args, setup, device
        self.cuda = device.type == "cuda"
        if not self.cuda:
            warm_host_process(setup)
        self.meter = CudaMeter(device) if self.cuda else HostMeter()
        self.pool = ModelPool(setup, device, self.meter, args.attention, args.compile)
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.hr_step_seconds: dict[str, float] = {}
        self.decode_seconds: dict[str, float] = {}
        self.hr_warmed = False
        self.data: dict = {}
        self.start = time.perf_counter()
        generator = torch.Generator().manual_seed(SEED)
        cfg, lr = setup.dit, setup.lr
        rows = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=generator).to(torch.bfloat16) for _ in range(2)]
        for row, length in zip(rows, setup.prompt_tokens):  # zero rows after the prompt, as context_for_dit
            row[:, length:] = 0
        self.text = TextConditioning(rows[0], rows[1], "benchmark prompt", "benchmark negative prompt")
        self.anchor = torch.randn(1, 48, latent_frames(setup.frames), lr.height // 16, lr.width // 16,
                                  generator=generator)

    # --- bookkeeping ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if not self.args.budget_s else self.args.budget_s - self.elapsed()

    def store(self, mode: Mode, path: tuple[str, ...], record: dict) -> None:
        node = self.results.setdefault(mode.key, {"mode": asdict(mode)})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = record
        self.save()

    def save(self) -> None:
        self.data["results"] = self.results
        self.data["notes"] = self.notes
        self.data["budget"] = {"seconds": self.args.budget_s or None, "elapsed_seconds": round(self.elapsed(), 1),
                               "skipped": self.skipped}
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.data, indent=2, default=str))

    def over_budget(self, mode: Mode, path: tuple[str, ...], predicted: float = 0.0) -> bool:
        """Record the stage as skipped when its predicted seconds do not fit what is left of the budget."""
        if self.left() > predicted:
            return False
        reason = f"time budget: predicted {predicted:.0f} s, {max(self.left(), 0):.0f} s left"
        self.store(mode, path, {"status": "skipped", "reason": reason})
        self.skipped.append(f"{mode.key} {' '.join(path)}: {reason}")
        log(f"{mode.key}: {' '.join(path)} skipped ({reason})")
        return True

    def guarded(self, label: str, stage: Callable[[dict], None]) -> dict:
        """Run one stage; an out-of-memory error (or any other) becomes the record's status."""
        record: dict = {"status": "ok"}
        self.meter.free()
        self.meter.reset_peak()
        start = time.perf_counter()
        try:
            stage(record)
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            record.update(status="oom", oom_allocated_bytes=self.meter.allocated(), peak_bytes=self.meter.peak(),
                          message=str(error).splitlines()[0][:300])
            requested = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(error))
            record["oom_requested"] = requested.group(1) if requested else None
            log(f"{label}: OOM at {record['oom_allocated_bytes'] / GIB:.1f} GiB allocated "
                f"(+{record['oom_requested']} requested)")
        except Exception as error:  # noqa: BLE001 - any other failure is reported and the run goes on
            record.update(status="error", message=f"{type(error).__name__}: {error}"[:500])
            traceback.print_exc(file=sys.stderr)
            log(f"{label}: ERROR {record['message']}")
        record["seconds"] = time.perf_counter() - start
        self.meter.free()
        record["allocated_after_bytes"] = self.meter.allocated()
        if record["status"] == "ok":
            record["activations_bytes"] = record["peak_bytes"] - record["weights_bytes"] - record["inputs_bytes"]
            record["reserved_peak_bytes"] = self.meter.reserved_peak()
        return record

    def _weights_and_inputs(self, record: dict, make_inputs: Callable[[], object]) -> object:
        """Record weights (allocated once placed), create the inputs on the device, record their bytes, and
        restart the peak there."""
        self.meter.sync()
        record["weights_bytes"] = self.meter.allocated()
        inputs = make_inputs()
        self.meter.sync()
        record["inputs_bytes"] = self.meter.allocated() - record["weights_bytes"]
        self.meter.reset_peak()
        return inputs

    def _finish(self, record: dict, placement_peak: int) -> None:
        record["peak_bytes"] = max(self.meter.peak(), placement_peak)

    # --- modes ------------------------------------------------------------------------------------
    def enter(self, mode: Mode) -> bool:
        try:
            self.pool.enter(mode)
            return True
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            message = str(error).splitlines()[0][:300]
        self.pool.evacuate()
        note = f"{mode.key}: the models do not fit on the device together ({message}); its stages are skipped"
        self.notes.append(note)
        log(note)
        self.results.setdefault(mode.key, {"mode": asdict(mode)})["status"] = "oom"
        return False

    # --- the stages -------------------------------------------------------------------------------
    def stage_text(self, mode: Mode) -> None:
        if self.over_budget(mode, ("text",)):
            return

        def stage(record: dict) -> None:
            self.meter.reset_peak()
            with self.pool.use("text", mode, record) as encoder:
                placement_peak = self.meter.peak()
                self._weights_and_inputs(record, lambda: None)  # the token ids are made with the model
                times = []
                for _ in range(1 + self.args.text_runs):
                    self.meter.sync()
                    start = time.perf_counter()
                    context = encoder.encode(["prompt", "negative prompt"])
                    self.meter.sync()
                    times.append(time.perf_counter() - start)
                    del context
                self._finish(record, placement_peak)
            record.update(tokens=[2, self.setup.t5.text_len], warmup_seconds=times[0], run_seconds=times[1:],
                          seconds_per_encode=statistics.median(times[1:]))

        record = self.guarded(f"{mode.key}: text", stage)
        self.store(mode, ("text",), record)
        self._log_stage(mode, "text", record, "seconds_per_encode", "per encode")

    def stage_lr(self, mode: Mode) -> None:
        settings = self.setup.lr
        if self.over_budget(mode, ("lr",)):
            return

        def stage(record: dict) -> None:
            self.meter.reset_peak()
            with self.pool.use("lr", mode, record) as dit:
                placement_peak = self.meter.peak()
                text = self._weights_and_inputs(record, lambda: self.text.to(self.device))
                times = run_steps(self.meter, lambda cb: lr_anchor(dit, text, settings, SEED, on_step=cb),
                                  1 + self.args.lr_steps)
                self._finish(record, placement_peak)
            tokens = settings.tokens
            flops = dit_forward_flops(self.setup.dit, tokens, batch=2)
            record.update(width=settings.width, height=settings.height, frames=settings.frames, tokens=tokens,
                          batch=2, warmup_seconds=times[0], step_seconds=times[1:],
                          seconds_per_step=statistics.median(times[1:]), flops_per_step=flops,
                          full_stage_seconds_extrapolated=statistics.median(times[1:]) * settings.steps)
            record["tflops_per_second"] = flops / record["seconds_per_step"] / 1e12

        record = self.guarded(f"{mode.key}: LR", stage)
        self.store(mode, ("lr",), record)
        self._log_stage(mode, "LR", record, "seconds_per_step", "per step")

    def predicted_hr_step(self, size: HRSize) -> float:
        """Seconds of one HR step at ``size``: measured, or scaled by FLOPs from another size, or assumed."""
        if size.label in self.hr_step_seconds:
            return self.hr_step_seconds[size.label]
        tokens = self.setup.hr_settings(size).tokens
        flops = 2 * dit_forward_flops(self.setup.dit, tokens, injector=True)
        for label, seconds in self.hr_step_seconds.items():
            other = next(s for s in self.setup.sizes if s.label == label)
            other_flops = 2 * dit_forward_flops(self.setup.dit, self.setup.hr_settings(other).tokens, injector=True)
            return seconds * flops / other_flops
        return flops / (ASSUMED_TFLOPS * 1e12) if self.cuda else 0.0

    def stage_hr(self, mode: Mode, size: HRSize, timed: int) -> None:
        settings = self.setup.hr_settings(size)
        steps = min(1 + timed, settings.steps)
        step = self.predicted_hr_step(size)
        affordable = int(self.left() // step) if step > 0 and self.left() != math.inf else steps
        if affordable < 1 and self.over_budget(mode, ("hr", size.label), step):
            return
        if affordable < steps:
            self.notes.append(f"{mode.key} HR {size.label}: {affordable} of {steps} steps run (time budget)")
            steps = affordable
        lr = self.setup.lr
        warm = None if self.hr_warmed else replace(settings, width=lr.width, height=lr.height)

        def stage(record: dict) -> None:
            self.meter.reset_peak()
            with self.pool.use("hr", mode, record) as model:
                placement_peak = self.meter.peak()
                if warm is not None:  # load the kernels once, at the anchor's size (not measured)
                    run_steps(self.meter, lambda cb: hr_latent(model, self.anchor, self.text, warm, SEED, on_step=cb), 1)
                    self.hr_warmed = True
                    self.meter.free()
                text, anchor = self._weights_and_inputs(
                    record, lambda: (self.text.to(self.device), self.anchor.to(self.device)))
                times = run_steps(self.meter, lambda cb: hr_latent(model, anchor, text, settings, SEED, on_step=cb),
                                  steps, f"{mode.key}: HR {size.label}")
                self._finish(record, placement_peak)
            flops = 2 * dit_forward_flops(self.setup.dit, settings.tokens, injector=True)
            per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
            record.update(width=size.width, height=size.height, frames=settings.frames, tokens=settings.tokens,
                          step_seconds=times, warmup_seconds=times[0] if len(times) > 1 else None,
                          timed_steps=len(times) - 1, seconds_per_step=per_step,
                          timing_basis="median of the steps after the warm-up step" if len(times) > 1 else
                          "the single step run (after the kernel warm-up at the anchor size)",
                          flops_per_step=flops, tflops_per_second=flops / per_step / 1e12,
                          full_stage_seconds_extrapolated=per_step * settings.steps)
            record["activation_bytes_per_token"] = None  # filled below once activations are known
            if mode.swap_blocks:
                record["swap_blocks"] = mode.swap_blocks

        record = self.guarded(f"{mode.key}: HR {size.label}", stage)
        if record["status"] == "ok":
            record["activation_bytes_per_token"] = record["activations_bytes"] / settings.tokens
            self.hr_step_seconds[size.label] = max(self.hr_step_seconds.get(size.label, 0), record["seconds_per_step"])
        self.store(mode, ("hr", size.label), record)
        self._log_stage(mode, f"HR {size.label}", record, "seconds_per_step", "per step")

    def stage_decode(self, mode: Mode, size: HRSize, order: str) -> None:
        frames = self.args.decode_frames
        if self.over_budget(mode, ("decode", size.label, order), self.decode_seconds.get(size.label, 0.0)):
            return
        h, w = size.height // SCALE, size.width // SCALE
        tiles = plan_tiles((h, w), size.patches, "w", OVERLAP)
        areas = [(t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiles]

        def stage(record: dict) -> None:
            self.meter.reset_peak()
            with self.pool.use("vae", mode, record) as vae:
                placement_peak = self.meter.peak()
                generator = torch.Generator().manual_seed(SEED)
                latent = self._weights_and_inputs(
                    record, lambda: torch.randn(1, 48, frames, h, w, generator=generator).to(self.device))
                states, stamps = [], []

                def on_step(done: int, total: int) -> None:
                    if order == "frame" and done % len(tiles):
                        return
                    self.meter.sync()
                    stamps.append(time.perf_counter())
                    states.append(self.meter.allocated())

                self.meter.sync()
                start = time.perf_counter()
                for chunk in tiled_decode_stream(vae, latent, num_patches=size.patches, patch_dim="w",
                                                 overlap=OVERLAP, order=order, on_step=on_step):
                    del chunk
                self.meter.sync()
                end = time.perf_counter()
                self._finish(record, placement_peak)
                dtype = vae.dtype
            record.update(self._decode_figures(record, size, order, frames, areas, dtype, states, stamps, start, end))

        record = self.guarded(f"{mode.key}: decode {size.label} {order}", stage)
        if record["status"] == "ok":
            record["transient_bytes"] = record["activations_bytes"] - record["caches_bytes"]
            self.decode_seconds[size.label] = max(self.decode_seconds.get(size.label, 0.0), record["seconds"])
        self.store(mode, ("decode", size.label, order), record)
        self._log_stage(mode, f"decode {size.label} {order}", record, "seconds_per_latent_frame", "per latent frame")

    def _decode_figures(self, record: dict, size: HRSize, order: str, frames: int, areas: list[int], dtype: torch.dtype,
                        states: list[int], stamps: list[float], start: float, end: float) -> dict:
        """Caches between latent frames, times per latent frame, and the whole video's decode extrapolated."""
        base, item = record["weights_bytes"] + record["inputs_bytes"], dtype.itemsize
        masks = sum(a * SCALE * SCALE * 4 for a in areas)  # float32 blend weight of every tile, on the device
        inputs = [48 * frames * a * item for a in areas]  # each tile's latent after the VAE's conv2
        full = latent_frames(self.setup.frames)
        per_pixel = cache_bytes_per_latent_pixel(self.setup.vae, item)
        # each tile's stream keeps its last decoded piece (float32, 1 frame for the first latent frame, 4 after)
        pieces = [[3 * (4 if k else 1) * a * SCALE * SCALE * 4 for k in range(frames)] for a in areas]
        if order == "frame":
            chunk = 3 * 4 * size.height * size.width * 4  # the blended output frames (4 after the first)
            caches = [s - base - masks - sum(inputs) - sum(p[k] for p in pieces) - (chunk if k else chunk // 4)
                      for k, s in enumerate(states)]
            expected = sum(areas) * per_pixel
            times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
            steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
            total = times[0] + (full - 1) * steady
        else:  # on the CPU the host canvas of the whole video is in the same memory: not the device's
            canvas = 0 if self.cuda else 3 * (4 * (frames - 1) + 1) * size.height * size.width * 4
            caches = [s - base - masks - canvas - inputs[k // frames] - pieces[k // frames][k % frames]
                      for k, s in enumerate(states)]
            expected = max(areas) * per_pixel
            times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
            per_tile = [times[i * frames:(i + 1) * frames] for i in range(len(areas))]
            steady = sum(statistics.median(t[1:]) if len(t) > 1 else t[0] for t in per_tile)
            blend = (end - stamps[-1]) * full / frames  # yielding the host canvas, scaled to the whole video
            total = sum(t[0] + (full - 1) * (statistics.median(t[1:]) if len(t) > 1 else t[0]) for t in per_tile) + blend
        # steady state: the last latent frame (of each tile in tile order), when every cache holds its 2 frames
        steady_caches = caches[-1] if order == "frame" else max(caches[frames - 1::frames])
        return {"width": size.width, "height": size.height, "latent_frames_decoded": frames, "tiles": len(areas),
                "tile_latent_areas": areas, "vae_dtype": str(dtype).replace("torch.", ""),
                "caches_bytes": steady_caches, "caches_bytes_each_callback": caches,
                "cache_expected_bytes": expected, "frame_seconds": times, "seconds_per_latent_frame": steady,
                "latent_frames_full_video": full, "full_decode_seconds_extrapolated": total,
                "extrapolation": f"first latent frame + {full - 1} x the median of the later ones"
                                 + (" per tile, plus the canvas output scaled to the video" if order == "tile" else "")}

    def _log_stage(self, mode: Mode, name: str, record: dict, time_key: str, unit: str) -> None:
        if record["status"] != "ok":
            return
        extra = f", caches {record['caches_bytes'] / GIB:.2f} GiB" if "caches_bytes" in record else ""
        log(f"{mode.key}: {name}: weights {record['weights_bytes'] / GIB:.2f} GiB, peak {record['peak_bytes'] / GIB:.2f}"
            f" GiB{extra}, {record[time_key]:.3f} s {unit}")


@functools.cache
def cache_bytes_per_latent_pixel(config: VAEConfig, item: int) -> float:
    """Causal-cache bytes per latent pixel of a decoder at steady state: exact, from meta tensors."""
    return decoder_cache_elements(config, (16, 16)) * item / (16 * 16)


# ------------------------------------------------------------------------------------------------
# Estimates (doctor.py) to compare with


def estimates(setup: Setup, mode: Mode, vae_precision: str) -> dict:
    """doctor's per-stage estimate in this mode (bytes), from its own functions; real configs only."""
    if setup.small:
        return {}
    savings = getattr(doctor, "block_swap_savings", lambda n, p="bf16": 0)(mode.swap_blocks) if mode.swap_blocks else 0
    weights = {"text": doctor.weight_bytes("text"), "lr": doctor.weight_bytes("lr") - savings,
               "hr": doctor.weight_bytes("hr") - savings, "vae": doctor.weight_bytes("vae", vae_precision=vae_precision)}
    resident = sum(weights.values())

    def peak(role: str, work: int) -> int:
        return (resident if mode.resident else weights[role]) + work

    out = {"text": peak("text", doctor.T5_ACTIVATION_BYTES),
           "lr": peak("lr", doctor.dit_activation_bytes(setup.lr.tokens, batch=2))}
    for size in setup.sizes:
        out[f"hr {size.label}"] = peak("hr", doctor.dit_activation_bytes(setup.hr_settings(size).tokens))
        for order in ORDERS:
            work = doctor.decode_bytes(size.width, size.height, num_patches=size.patches, overlap=OVERLAP,
                                       order=order, vae_precision=vae_precision)
            out[f"decode {size.label} {order}"] = peak("vae", work)
    return out


# ------------------------------------------------------------------------------------------------
# Environment


def _version(*distributions: str) -> str | None:
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment(device: torch.device, attention: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "flash_attn": _version("flash-attn", "flash_attn"),
           "flash_attn_3": _version("flash-attn-3", "flash_attn_3", "flashattn-hopper"),
           "attention_backend_requested": attention, "attention_backend": resolve_backend(attention, device),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    try:
        env["host_memory_bytes"] = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        env["host_memory_bytes"] = None
    try:
        env["repo_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["repo_commit"] = None
    if device.type != "cuda":
        return env
    props = torch.cuda.get_device_properties(device)
    env.update(gpu=props.name, gpu_total_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
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


# ------------------------------------------------------------------------------------------------
# Report


def _gib(value: object, scale: int = GIB) -> str:
    return "-" if value is None else f"{value / scale:.2f}"


def _unit(data: dict) -> tuple[int, str]:
    """GiB for the real models, MiB for the small ones."""
    return (2**20, "MiB") if data.get("small") else (GIB, "GiB")


def _seconds(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _stage_rows(data: dict) -> Iterator[tuple[str, str, str, dict]]:
    """(mode, stage, size/order, record) for every stage record in the results."""
    for mode_key, node in data.get("results", {}).items():
        for stage in ("text", "lr"):
            if isinstance(node.get(stage), dict):
                yield mode_key, stage, "-", node[stage]
        for label, record in node.get("hr", {}).items():
            yield mode_key, "hr", label, record
        for label, orders in node.get("decode", {}).items():
            for order, record in orders.items():
                yield mode_key, "decode", f"{label} {order}", record


def _status_text(record: dict) -> str:
    if record.get("status") == "oom":
        return f"OOM at {_gib(record.get('oom_allocated_bytes'))} GiB (+{record.get('oom_requested') or '?'})"
    if record.get("status") == "skipped":
        return f"skipped: {record.get('reason', '')}"
    if record.get("status") == "error":
        return f"error: {record.get('message', '')[:120]}"
    return record.get("status", "?")


def _whole_run_rows(data: dict) -> list[str]:
    """One generate per mode and size, extrapolated from the stages: text + 50 LR steps + 4 HR steps + the whole
    decode (frame order, else tile order) + moving the models in and out (offload, block swap)."""
    results = data.get("results", {})
    scale, unit = _unit(data)
    rows = []
    for mode_key, node in results.items():
        def record(*path: str, node: dict = node) -> dict:
            for key in path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if node.get("status") == "same_as":
                return record(*path, node=results.get(node["same_as"], {}))
            return node if node.get("status") == "ok" else {}

        for label in node.get("hr", {}):
            text, lr, hr = record("text"), record("lr"), record("hr", label)
            order = next((o for o in ORDERS if record("decode", label, o)), None)
            if not (text and lr and hr and order):
                continue
            decode = record("decode", label, order)
            moves = sum(r.get("placement_seconds", 0) + r.get("return_seconds", 0) for r in (text, lr, hr, decode))
            total = (text["seconds_per_encode"] + lr["full_stage_seconds_extrapolated"]
                     + hr["full_stage_seconds_extrapolated"] + decode["full_decode_seconds_extrapolated"] + moves)
            peak = max(r["peak_bytes"] for r in (text, lr, hr, decode))
            rows.append(f"| {mode_key} | {label} | {total:.1f} | {text['seconds_per_encode']:.2f} | "
                        f"{lr['full_stage_seconds_extrapolated']:.1f} | {hr['full_stage_seconds_extrapolated']:.1f} | "
                        f"{decode['full_decode_seconds_extrapolated']:.1f} ({order}) | {moves:.1f} | {_gib(peak, scale)} |")
    if not rows:
        return []
    return ["", "## One generate, extrapolated from the stages (121 frames; seconds)", "",
            f"| mode | size | total | text | LR 50 steps | HR 4 steps | decode (order) | model moves | peak {unit} |",
            "|---" * 9 + "|", *rows]


def render(data: dict) -> str:
    env = data.get("environment", {})
    kind = "small configs" if data.get("small") else "real model sizes"
    scale, unit = _unit(data)
    lines = [f"# PixelWizard GPU benchmark ({kind}, random weights)", ""]
    device = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines.append(f"Device: {device}" + (f", {_gib(env.get('gpu_total_memory_bytes'))} GiB" if env.get("gpu") else "")
                 + f"; driver {env.get('driver') or '-'}; torch {env.get('torch')}, CUDA {env.get('cuda') or '-'}, "
                   f"cuDNN {env.get('cudnn') or '-'}, flash-attn {env.get('flash_attn') or '-'} / "
                   f"FA3 {env.get('flash_attn_3') or '-'}; attention backend: {env.get('attention_backend')}; "
                   f"memory: {data.get('memory_method')}")
    if data.get("model_bytes"):
        lines.append(f"Model weights as built ({unit}): " + ", ".join(f"{role} {_gib(size, scale)}"
                                                              for role, size in data["model_bytes"].items()))
    if env.get("ceilings"):
        lines.append("Ceilings (measured): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in env["ceilings"].items()))
    header = ("| mode | stage | size | weights | inputs | activations (decode: transient) | caches | peak | "
              "reserved peak | doctor estimate | placement s | status |")
    lines += ["", f"## Memory by stage ({unit})", "", header, "|---" * 12 + "|"]
    for mode_key, stage, where, record in _stage_rows(data):
        if record.get("status") == "same_as":
            lines.append(f"| {mode_key} | {stage} | {where} | | | | | | | | | as {record['same_as']} |")
            continue
        estimate = data.get("estimates", {}).get(mode_key, {}).get(stage if stage in ("text", "lr") else f"{stage} {where}")
        activations = record.get("transient_bytes", record.get("activations_bytes"))
        sizes = [record.get(k) for k in ("weights_bytes", "inputs_bytes")] + [activations] + [
            record.get(k) for k in ("caches_bytes", "peak_bytes", "reserved_peak_bytes")] + [estimate]
        lines.append(f"| {mode_key} | {stage} | {where} | " + " | ".join(_gib(v, scale) for v in sizes) + " | "
                     f"{_seconds(record.get('placement_seconds'))} | {_status_text(record)} |")
    lines += ["", "## Time", "",
              "| mode | stage | size | s per unit | unit | timed | TFLOP/s | whole stage s (extrapolated) |",
              "|---|---|---|---|---|---|---|---|"]
    units = {"text": ("seconds_per_encode", "encode (2 x 512 tokens)"), "lr": ("seconds_per_step", "step"),
             "hr": ("seconds_per_step", "step (cond + uncond)"), "decode": ("seconds_per_latent_frame", "latent frame")}
    for mode_key, stage, where, record in _stage_rows(data):
        if record.get("status") != "ok":
            continue
        key, per = units[stage]
        timed = {"text": len(record.get("run_seconds", [])), "lr": len(record.get("step_seconds", [])),
                 "hr": record.get("timed_steps"), "decode": record.get("latent_frames_decoded")}[stage]
        whole = record.get("full_stage_seconds_extrapolated", record.get("full_decode_seconds_extrapolated"))
        flops = record.get("tflops_per_second")
        lines.append(f"| {mode_key} | {stage} | {where} | {_seconds(record.get(key))} | {per} | {timed} | "
                     f"{'-' if flops is None else f'{flops:.3g}'} | {_seconds(whole)} |")
    lines += _whole_run_rows(data)
    for title, items in (("Skipped", data.get("budget", {}).get("skipped", [])), ("Notes", data.get("notes", []))):
        if items:
            lines += ["", f"{title}:"] + [f"- {item}" for item in items]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for every figure (also X.md with the tables); "
                        "default $OUT/bench_gpu.json when $OUT is set")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="tiny configs and sizes (for the CPU and CI)")
    parser.add_argument("--modes", nargs="+", default=["gpu", "offload", "block_swap"],
                        choices=["gpu", "offload", "block_swap"], help="the first is the timing mode")
    parser.add_argument("--swap-blocks", type=int, nargs="+", default=None,
                        help="DiT blocks streamed in block_swap mode, one mode per value (default 10 20; small: 1 2)")
    parser.add_argument("--sizes", nargs="+", default=None, help="HR sizes by label (default: 2k 4k)")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    parser.add_argument("--hr-steps", type=int, nargs="+", default=[2, 0],
                        help="timed HR steps after the warm-up step in the first mode, one per size (last repeats)")
    parser.add_argument("--lr-steps", type=int, default=5, help="timed LR steps after 1 warm-up step")
    parser.add_argument("--text-runs", type=int, default=2, help="timed text encodes after 1 warm-up")
    parser.add_argument("--decode-frames", type=int, default=None,
                        help="latent frames decoded per tile (default 3; small: 2, enough for the steady-state cache)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the run may take (CUDA default 450, CPU none; 0 = none)")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every DiT block (block.compile()); the first step at each size then "
                             "includes compilation: use --hr-steps >= 1 everywhere")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --small on the CPU, where a loaded "
                             "2-core machine made 2 threads 50x slower)")
    parser.add_argument("--isolate", default="auto", choices=["auto", "on", "off"],
                        help="run each mode in its own process (auto: on the CPU only, where the process's memory "
                             "stands for the device's)")
    parser.add_argument("--timing-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "bench_gpu.json")
    return args


def _reexec_for_host_memory(device: torch.device) -> None:
    """On the CPU, make freed tensors leave the resident set at once (every allocation over 64 KiB is its own
    mapping), so that the resident set measures live memory; glibc reads this only at process start."""
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if argv is None:
        _reexec_for_host_memory(device)
    if args.budget_s is None:
        args.budget_s = 450.0 if device.type == "cuda" else 0.0
    if args.decode_frames is None:
        args.decode_frames = 2 if args.small else 3
    if args.threads is None and args.small and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = small_setup() if args.small else real_setup()
    if args.swap_blocks:
        setup = replace(setup, swap_blocks=tuple(args.swap_blocks))
    if args.sizes:
        known = {s.label: s for s in setup.sizes}
        if set(args.sizes) - set(known):
            raise SystemExit(f"--sizes: unknown {sorted(set(args.sizes) - set(known))}; choose from {sorted(known)}")
        setup = replace(setup, sizes=tuple(known[label] for label in args.sizes))
    bench = Bench(args, setup, device)
    bench.data.update(small=setup.small, command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                      device=str(device), memory_method=bench.meter.method,
                      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      config={"dit": asdict(setup.dit), "t5": asdict(setup.t5), "vae": asdict(setup.vae),
                              "lr": asdict(setup.lr), "sizes": [asdict(s) for s in setup.sizes],
                              "decode_frames": args.decode_frames, "orders": args.orders,
                              "hr_steps": args.hr_steps, "lr_steps": args.lr_steps, "compile": args.compile,
                              "threads": torch.get_num_threads(),
                              "dtype": "bf16 (DiT, T5), float32 (HR injector, VAE)"})
    bench.data["environment"] = environment(device, args.attention)
    bench.data["model_bytes"] = model_bytes(setup)
    log(f"device {device} ({bench.data['environment'].get('gpu', 'CPU')}), "
        f"{'small' if setup.small else 'real'} configs, budget {args.budget_s or 'none'} s")
    modes = mode_list(args, setup)
    bench.data["estimates"] = {m.key: estimates(setup, m, "fp32") for m in modes}
    if not setup.small:
        bench.data["estimate_notes"] = ("doctor.py's formula with this mode's placement (gpu: every model resident), "
                                        "float32 VAE in both decode orders")
    timing = args.timing_mode or modes[0].key
    isolate = args.isolate == "on" or (args.isolate == "auto" and device.type != "cuda")
    bench.data["isolated_processes"] = isolate
    if isolate:
        run_isolated(bench, args, modes, timing)
    else:
        run_plan(bench, args, setup, modes, timing)
    bench.save()
    print(render(bench.data))
    if args.out:
        Path(args.out).with_suffix(".md").write_text(render(bench.data) + "\n")
        log(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def mode_list(args: argparse.Namespace, setup: Setup) -> list[Mode]:
    modes: list[Mode] = []
    for name in dict.fromkeys(args.modes):
        modes += [Mode(name, n) for n in setup.swap_blocks] if name == "block_swap" else [Mode(name)]
    return modes


def run_plan(bench: Bench, args: argparse.Namespace, setup: Setup, modes: list[Mode], timing: str) -> None:
    """Everything, most important first: the timing mode and offload fully, block swap at the first size,
    then the HR stages of the other modes at the other sizes, as far as the budget goes."""
    steps_for = {s.label: args.hr_steps[min(i, len(args.hr_steps) - 1)] for i, s in enumerate(setup.sizes)}
    bench.pool.build_all(modes[0])
    deferred: list[tuple[Mode, HRSize]] = []
    for mode in [m for m in modes if not m.swap_blocks]:
        if not bench.enter(mode):
            continue
        bench.stage_text(mode)
        bench.stage_lr(mode)
        for i, size in enumerate(setup.sizes):
            if mode.key == timing:
                bench.stage_hr(mode, size, steps_for[size.label])
            elif i == 0:
                bench.stage_hr(mode, size, 0)
            else:
                deferred.append((mode, size))
            for order in args.orders:
                bench.stage_decode(mode, size, order)
    for mode in [m for m in modes if m.swap_blocks]:
        if not bench.enter(mode):
            continue
        same = {"status": "same_as", "same_as": "offload",
                "reason": "block swap streams DiT blocks only; text encoder and VAE are placed as in offload"}
        bench.store(mode, ("text",), dict(same))
        for size in setup.sizes:
            for order in args.orders:
                bench.store(mode, ("decode", size.label, order), dict(same))
        bench.stage_lr(mode)
        for i, size in enumerate(setup.sizes):
            if mode.key == timing or i == 0:
                bench.stage_hr(mode, size, steps_for[size.label] if mode.key == timing else 0)
            else:
                deferred.append((mode, size))
    for mode, size in deferred:
        if bench.enter(mode):
            bench.stage_hr(mode, size, 0)


def run_isolated(bench: Bench, args: argparse.Namespace, modes: list[Mode], timing: str) -> None:
    """One fresh process per mode (the CPU's emulated device memory: each process holds what its mode keeps
    on the device, and every mode starts from the same process state); their results merged here."""
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "mode.json"
            extra = ["--modes", mode.name, "--timing-mode", timing, "--isolate", "off", "--out", str(out)]
            if mode.swap_blocks:
                extra += ["--swap-blocks", str(mode.swap_blocks)]
            if args.budget_s:  # what is left of the whole run's budget
                extra += ["--budget-s", str(max(bench.left(), 1.0))]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            log(f"{mode.key}: in its own process")
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args.argv, *extra], env=env,
                                  stdout=subprocess.DEVNULL, check=False)
            child = json.loads(out.read_text()) if out.exists() else {}
        if mode.key in child.get("results", {}):
            bench.results[mode.key] = child["results"][mode.key]
            bench.notes += child.get("notes", [])
            bench.skipped += child.get("budget", {}).get("skipped", [])
        else:
            bench.results[mode.key] = {"mode": asdict(mode), "status": "error",
                                       "message": f"its process ended with exit code {done.returncode}"}
        bench.save()


if __name__ == "__main__":
    sys.exit(main())
