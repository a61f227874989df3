"""The four models of a run with random weights, and where they are (``ModelPool``).

Each model is built on the meta device and materialised on the compute device with ``to_empty`` and a
random init (bf16; the HR injector and the VAE float32, as the loaders place them), so a 5B model never
lives in host RAM in float32. Never from files. Every placement goes through ``placement.on_device``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from pixelwizard_core.models.dit import WanDiT
from pixelwizard_core.models.hr import WanHRDiT
from pixelwizard_core.models.t5 import UMT5Encoder
from pixelwizard_core.models.vae import WanVAE
from pixelwizard_core.pipeline.placement import module_of, on_device
from pixelwizard_core.pipeline.presets import latent_frames
from pixelwizard_core.pipeline.text import TextConditioning, TextEncoder

from .config import SEED, Mode, Setup
from .meters import Meter
from .progress import log

ROLES = ("text", "lr", "hr", "vae")
DIT_ROLES = ("lr", "hr")


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


def dit_inputs(setup: Setup) -> tuple[TextConditioning, torch.Tensor]:
    """The DiT stages' inputs on the host: random prompt / negative contexts (zero after their true lengths,
    as context_for_dit leaves them) and a random LR anchor latent."""
    generator = torch.Generator().manual_seed(SEED)
    cfg, lr = setup.dit, setup.lr
    rows = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=generator).to(torch.bfloat16) for _ in range(2)]
    for row, length in zip(rows, setup.prompt_tokens):
        row[:, length:] = 0
    text = TextConditioning(rows[0], rows[1], "benchmark prompt", "benchmark negative prompt")
    anchor = torch.randn(1, 48, latent_frames(setup.frames), lr.height // 16, lr.width // 16, generator=generator)
    return text, anchor


class ModelPool:
    """The four models and where they are. All placement goes through ``placement.on_device``.

    CUDA: every model is built once; entering a mode moves each to its home (the device for "gpu", the
    CPU otherwise). CPU (one memory): a model whose home is off the device is not kept; it is built when
    its stage starts and freed after (on a GPU it would wait in host RAM, which is not device memory)."""

    def __init__(self, setup: Setup, device: torch.device, meter: Meter, attention: str, compile_blocks: bool) -> None:
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
        model.set_attention_backend(self.attention)  # refuses an impossible choice now
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
