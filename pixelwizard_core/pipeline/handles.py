"""Model handles: lazy, hashable descriptions of a model (file identity and options).

A handle costs nothing to create or pass around (ComfyUI sockets, worker-pool jobs); the model is loaded
on first ``open`` and cached by the file's identity and options, so the same file is never loaded twice
while it is in use and the same handle can be opened inside another process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..loading import inspect_weights, load_dit, load_hr_dit, load_t5, load_t5_tokenizer, load_vae
from ..loading.folders import resolve
from ..models.layers import store_linears_in_fp8
from .text import TextEncoder

log = logging.getLogger("pixelwizard")

ROLES = {"text": "t5", "vae": "vae", "lr": "dit", "hr": "hr_dit"}  # role -> loader component
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
# "fp8": loaded in bf16, then the DiT's block Linears are stored in float8 with a per-tensor scale
MEMORY_MODES = ("gpu", "offload")


@dataclass(frozen=True)
class ModelHandle:
    """One model file for one role, with how to load and place it."""

    role: str
    path: str
    precision: str = "bf16"
    attention: str = "auto"
    memory_mode: str = "gpu"
    size: int = 0
    mtime_ns: int = 0

    @classmethod
    def for_file(cls, role: str, path: str | Path, **options: str) -> "ModelHandle":
        """A handle for ``path`` (a file or an official folder), checked now: it exists and its keys say
        it is the right kind of model for ``role`` (header only, no tensor data)."""
        if role not in ROLES:
            raise ConfigError(f"unknown model role {role!r}; one of {', '.join(ROLES)}")
        if options.get("precision", "bf16") not in PRECISIONS:
            raise ConfigError(f"precision {options['precision']!r}: choose one of {', '.join(PRECISIONS)}")
        if options.get("memory_mode", "gpu") not in MEMORY_MODES:
            raise ConfigError(f"memory mode {options['memory_mode']!r}: choose one of {', '.join(MEMORY_MODES)}")
        file = resolve(path, ROLES[role])
        check_kind(file, role)
        stat = file.stat()
        return cls(role, str(file), size=stat.st_size, mtime_ns=stat.st_mtime_ns, **options)

    @property
    def identity(self) -> str:
        return f"{Path(self.path).name}:{self.size}"

    def home(self, device: torch.device) -> torch.device:
        """Where the model waits between uses."""
        return torch.device("cpu") if self.memory_mode == "offload" else device


def check_kind(path: Path, role: str) -> None:
    """Refuse a file of the wrong kind for its role (e.g. an HR checkpoint given for the LR stage)."""
    component = ROLES[role]
    info = inspect_weights(path, component=component)
    if info.component != component:
        found = info.component or "not a recognised weight file"
        raise ConfigError(f"{path} is {found!r}, but the {role} stage needs {component!r}: pick the right file")
    if info.problem:
        raise ConfigError(f"{path}: {info.problem}")


_cache: dict[tuple, object] = {}
_lock = threading.Lock()


def load(handle: ModelHandle, device: torch.device) -> object:
    """Load the model of ``handle`` onto ``device`` (uncached; see :func:`get`)."""
    dtype = PRECISIONS[handle.precision]
    if handle.role == "text":
        return TextEncoder(load_t5(handle.path, dtype=dtype, device=device), load_t5_tokenizer(handle.path))
    if handle.role == "vae":
        return load_vae(handle.path, dtype=dtype, device=device)
    model = (load_hr_dit if handle.role == "hr" else load_dit)(handle.path, dtype=dtype, device=device)
    model.set_attention_backend(handle.attention)
    if handle.precision == "fp8":
        store_linears_in_fp8(model.blocks)
    return model


def module_of(model: object) -> torch.nn.Module:
    return model.encoder if isinstance(model, TextEncoder) else model


def get(handle: ModelHandle, device: torch.device) -> object:
    """The loaded model of ``handle`` (loaded now if it is not cached), at its home for ``device``."""
    key = (handle.role, handle.path, handle.size, handle.mtime_ns, handle.precision)
    with _lock:
        if key not in _cache:
            log.info("loading %s model %s", handle.role, handle.path)
            _cache[key] = load(handle, handle.home(device))
        model = _cache[key]
    if hasattr(model, "set_attention_backend"):
        model.set_attention_backend(handle.attention)
    return model


@contextlib.contextmanager
def opened(handle: ModelHandle, device: torch.device | str) -> Iterator[object]:
    """The model on ``device`` for the block; afterwards back to its home (CPU when offloading)."""
    device = torch.device(device)
    model = get(handle, device)
    module_of(model).to(device)
    try:
        yield model
    finally:
        if handle.memory_mode == "offload":
            module_of(model).to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()


def release_all() -> None:
    """Forget every cached model (frees its memory once nothing else holds it)."""
    with _lock:
        _cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
