"""The one model store: every loaded model of a process, keyed by its file's identity and load options.

The command line (:class:`.models.Models`), the ComfyUI nodes (:func:`.handles.opened`) and the worker
processes (:class:`~pixelwizard_core.distributed.session.Session`) all get their models here, so a
handle means the same model everywhere: two handles that differ in anything that changes the loaded
object (file content, precision, ``compile``, FSDP sharding) are two entries, never one answering for
the other. Placement between uses (gpu / offload / block swap) is not part of the key: it is applied
by :func:`.placement.on_device` on every use.

A host with its own memory manager (ComfyUI) plugs in through :class:`HostMemory`; the default does
nothing, and the store manages placement itself.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..loading.identity import FileIdentity, file_identity
from .handles import ModelHandle, load
from .placement import on_device

log = logging.getLogger("pixelwizard")

Loader = Callable[[ModelHandle, torch.device], object]


@dataclass(frozen=True)
class StoreKey:
    """What makes two loads the same model."""

    role: str
    file: FileIdentity
    precision: str
    compile: bool
    sharded: bool = False

    @classmethod
    def of(cls, handle: ModelHandle, sharded: bool = False) -> "StoreKey":
        return cls(handle.role, file_identity(handle.path), handle.precision, handle.compile, sharded)


class HostMemory(Protocol):
    """A host's memory manager, told about our models (ComfyUI's model management plugs in here)."""

    def loaded(self, key: StoreKey, model: object) -> None:
        """A model entered the store."""

    def before_use(self, key: StoreKey, model: object, device: torch.device) -> None:
        """A model is about to be placed on ``device``: make room for it."""

    def released(self, key: StoreKey) -> None:
        """A model left the store."""


class NoHostMemory:
    """No host memory manager: the store's own placement is all there is."""

    def loaded(self, key: StoreKey, model: object) -> None:
        pass

    def before_use(self, key: StoreKey, model: object, device: torch.device) -> None:
        pass

    def released(self, key: StoreKey) -> None:
        pass


class ModelStore:
    """Loaded models by :class:`StoreKey`. ``one_per_role``: loading a model for a role drops the role's
    previous one (a worker or a command line run holds one model per role; a ComfyUI graph may hold two
    HR models, so the process-wide store keeps every entry until released)."""

    def __init__(self, *, one_per_role: bool = False, host: HostMemory | None = None) -> None:
        self.one_per_role = one_per_role
        self.host: HostMemory = host or NoHostMemory()
        self._models: dict[StoreKey, object] = {}
        self._lock = threading.RLock()
        self.loaded_roles: list[str] = []  # roles loaded since the last reset (a job's report)

    def get(self, handle: ModelHandle, home: torch.device, *, sharded: bool = False,
            loader: Loader = load) -> object:
        """The model of ``handle``, loaded at ``home`` by ``loader`` if the store does not hold it."""
        key = StoreKey.of(handle, sharded)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                if self.one_per_role:
                    self.release(handle.role)
                model = self._load(key, handle, home, loader)
        if hasattr(model, "set_attention_backend"):
            model.set_attention_backend(handle.attention)
        return model

    def _load(self, key: StoreKey, handle: ModelHandle, home: torch.device, loader: Loader) -> object:
        start = time.perf_counter()
        model = loader(handle, home)
        self._models[key] = model
        self.loaded_roles.append(handle.role)
        self.host.loaded(key, model)
        log.info("loaded %s model %s in %.1f s", handle.role, key.file.name, time.perf_counter() - start)
        return model

    @contextlib.contextmanager
    def use(self, handle: ModelHandle, device: torch.device, *, home: torch.device | None,
            swap_blocks: int | None = None, sharded: bool = False, loader: Loader = load) -> Iterator[object]:
        """The model on ``device`` for the block, back at ``home`` after (None: left where it ran, for a
        caller that drops it next); ``swap_blocks`` None: the handle's."""
        model = self.get(handle, device if home is None else home, sharded=sharded, loader=loader)
        self.host.before_use(StoreKey.of(handle, sharded), model, device)
        swap = handle.swap_for(model) if swap_blocks is None else swap_blocks
        with on_device(model, device, home=home, swap_blocks=swap):
            yield model

    def entries(self) -> list[tuple[StoreKey, object]]:
        """Every (key, model) the store holds."""
        with self._lock:
            return list(self._models.items())

    def holds(self, handle: ModelHandle, sharded: bool = False) -> bool:
        return StoreKey.of(handle, sharded) in self._models

    def release(self, role: str | None = None) -> None:
        """Drop the models of ``role`` (or all) so their memory is freed once nothing else holds them."""
        with self._lock:
            for key in [k for k in self._models if role is None or k.role == role]:
                del self._models[key]
                self.host.released(key)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# The process-wide store of the ComfyUI nodes (every handle from every loader node).
SHARED_STORE = ModelStore()
