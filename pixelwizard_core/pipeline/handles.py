"""Model handles: lazy, hashable descriptions of a model (file identity and options).

A handle costs nothing to create or pass around (ComfyUI sockets, worker-pool jobs); the model is loaded
on first use by the model store (:mod:`.store`), keyed by the file's identity and the load options, so
the same file is never loaded twice while it is in use and the same handle can be opened inside another
process.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..loading import inspect_weights, load_dit, load_hr_dit, load_t5, load_t5_tokenizer, load_vae
from ..loading.folders import resolve
from ..loading.identity import file_identity
from ..loading.inspection import WeightsInfo
from ..loading.lora import as_refs
from ..models.layers import store_linears_in_fp8
from .memory import MEMORY_MODES
from .text import TextEncoder

log = logging.getLogger("pixelwizard")

ROLES = {"text": "t5", "vae": "vae", "lr": "dit", "hr": "hr_dit"}  # role -> loader component
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
# "fp8": loaded in bf16, then the DiT's block Linears are stored in float8 with a per-tensor scale

# Memory modes: pipeline/memory.py MEMORY_MODES (the text encoder and the VAE treat block_swap as offload).
DIT_ROLES = ("lr", "hr")
# Blocks streamed in "block_swap" mode when the handle says 0: a third of the 5B DiT's 30 blocks (3.3 GB of
# bf16 weights; 2.4 GB less on the GPU once the two blocks in flight are counted: the memory profile "block_swap",
# where 2K fits a 24 GB card), for copies the HR stage hides behind its compute and that cost the 448x256
# anchor stage roughly 0.1 s per step over PCIe 4 (estimated, not measured).
DEFAULT_SWAP_BLOCKS = 10
IN_MEMORY = "memory:"  # the path prefix of a model built in memory (``generate --demo``), not read from a file


@dataclass(frozen=True)
class ModelHandle:
    """One model file for one role, with how to load and place it.

    ``swap_blocks`` only matters for the DiT roles ("lr", "hr") in memory mode "block_swap": the number of
    last blocks streamed (0 = :data:`DEFAULT_SWAP_BLOCKS`, capped at the model's block count). It is
    ignored for the text encoder and the VAE (they have no blocks and wait on the CPU), and in the other
    memory modes, so one set of loader options can describe all three models of a loader.
    """

    role: str
    path: str
    precision: str = "bf16"
    attention: str = "auto"
    memory_mode: str = "gpu"
    size: int = 0
    mtime_ns: int = 0
    swap_blocks: int = 0
    compile: bool = False
    # LoRAs ((path, strength, size, mtime_ns): loading.lora.LoraRef) merged into a DiT when the store places it
    # (pipeline/lora.py); not part of the store's key, so another LoRA or strength never reloads the base
    loras: tuple[tuple, ...] = ()
    # the lease of a host object that owns the model (store.ModelStore.lease); not part of what the handle
    # means, and never sent to another process
    owner: object = field(default=None, compare=False, hash=False, repr=False)

    def __getstate__(self) -> dict:
        state = {name: value for name, value in self.__dict__.items() if name != "owner"}
        # plain tuples: a worker pool's unpickler admits only its protocol classes (equal and hash the same)
        state["loras"] = tuple(tuple(lora) for lora in self.loras)
        return state

    def __post_init__(self) -> None:
        MEMORY_MODES.check(self.memory_mode)
        swap = self.swap_blocks
        if isinstance(swap, bool) or not isinstance(swap, int) or swap < 0:
            raise ConfigError(f"swap_blocks {swap!r}: give a whole number of DiT blocks to stream, 0 for the "
                              f"default ({DEFAULT_SWAP_BLOCKS})")
        if self.loras and self.role not in DIT_ROLES:
            raise ConfigError(f"LoRAs apply to the DiTs (roles lr and hr), not to the {self.role} model")
        object.__setattr__(self, "loras", tuple(self.loras))  # a list would make the handle unhashable
        if self.compile and self.memory_mode == "block_swap" and self.role in DIT_ROLES:
            raise ConfigError("torch.compile and block swap do not go together (the swap moves weights under the "
                              "compiled blocks): turn one of them off")

    @classmethod
    def for_file(cls, role: str, path: str | Path, **options: object) -> "ModelHandle":
        """A handle for ``path`` (a file or an official folder), checked now: it exists and its keys say
        it is the right kind of model for ``role`` (header only, no tensor data), and ``swap_blocks``
        is not more than its blocks."""
        if role not in ROLES:
            raise ConfigError(f"unknown model role {role!r}; one of {', '.join(ROLES)}")
        if options.get("precision", "bf16") not in PRECISIONS:
            raise ConfigError(f"precision {options['precision']!r}: choose one of {', '.join(PRECISIONS)}")
        MEMORY_MODES.check(options.get("memory_mode", "gpu"))
        file = resolve(path, ROLES[role])
        info = check_kind(file, role)
        stat = file.stat()
        handle = cls(role, str(file), size=stat.st_size, mtime_ns=stat.st_mtime_ns, **options)
        layers = info.config.get("num_layers")
        if handle.blocks_to_swap and layers and handle.swap_blocks > layers:
            raise ConfigError(f"swap_blocks {handle.swap_blocks}: {file.name} has {layers} transformer blocks; "
                              f"choose 1..{layers} (or 0 for the default, {DEFAULT_SWAP_BLOCKS})")
        return handle

    @classmethod
    def in_memory(cls, role: str, **options: object) -> "ModelHandle":
        """A handle for a model built in memory (``generate --demo``): its opener holds the model."""
        return cls(role, IN_MEMORY + role, **options)

    def with_lora(self, lora: tuple) -> "ModelHandle":
        """This handle with one more LoRA (a :class:`~..loading.lora.LoraRef`) after those it has."""
        return dataclasses.replace(self, loras=(*self.loras, lora))

    @property
    def is_in_memory(self) -> bool:
        return self.path.startswith(IN_MEMORY)

    @property
    def identity(self) -> str:
        """The file's identity for metadata (path below its models folder, size, content digest), followed by
        the identity and strength of each LoRA that changes the model."""
        base = self.path if self.is_in_memory else str(file_identity(self.path))
        return base + "".join(f" + LoRA {file_identity(lora.path)} @ {lora.strength:g}"
                              for lora in as_refs(self.loras) if lora.strength)

    @property
    def blocks_to_swap(self) -> int:
        """Blocks to stream: 0 unless a DiT in "block_swap" mode; there the default for 0 (capped at the
        model's block count by :meth:`swap_for`)."""
        if self.memory_mode != "block_swap" or self.role not in DIT_ROLES:
            return 0
        return self.swap_blocks or DEFAULT_SWAP_BLOCKS

    def swap_for(self, model: object) -> int:
        """:attr:`blocks_to_swap` for the loaded ``model``: the default is capped at its block count, an
        explicit count larger than it is refused (ConfigError) by :func:`.placement.on_device`."""
        count = self.blocks_to_swap
        return min(count, len(model.blocks)) if count and not self.swap_blocks else count

    def home(self, device: torch.device) -> torch.device:
        """Where the model waits between uses."""
        return torch.device("cpu") if MEMORY_MODES.get(self.memory_mode).offload else device


def check_kind(path: Path, role: str) -> WeightsInfo:
    """Refuse a file of the wrong kind for its role (e.g. an HR checkpoint given for the LR stage); what
    the header says about the file."""
    component = ROLES[role]
    info = inspect_weights(path, component=component)
    if info.component is None and info.problem:  # unreadable: the reader's diagnosis says what to do
        where = "" if str(path) in info.problem else f"{path}: "
        raise ConfigError(f"the {role} model file cannot be used: {where}{info.problem}")
    if info.component != component:
        found = info.component or "not a recognised weight file"
        raise ConfigError(f"{path} is {found!r}, but the {role} stage needs {component!r}: pick the right file")
    if info.problem:
        raise ConfigError(f"{path}: {info.problem}")
    return info


def load(handle: ModelHandle, device: torch.device) -> object:
    """Load the model of ``handle`` onto ``device`` (uncached: the model store caches, :mod:`.store`)."""
    dtype = PRECISIONS[handle.precision]
    if handle.role == "text":
        return TextEncoder(load_t5(handle.path, dtype=dtype, device=device), load_t5_tokenizer(handle.path))
    if handle.role == "vae":
        return load_vae(handle.path, dtype=dtype, device=device)
    model = (load_hr_dit if handle.role == "hr" else load_dit)(handle.path, dtype=dtype, device=device)
    model.set_attention_backend(handle.attention)
    if handle.precision == "fp8":
        store_linears_in_fp8(model.blocks)
    if handle.compile:
        model.compile_blocks()
    return model
