"""The one model store: every loaded model of a process, keyed by its file's identity and load options.

The command line (:class:`.models.Models`), the ComfyUI nodes (:func:`.handles.opened`) and the worker
processes (:class:`~pixelwizard_core.distributed.session.Session`) all get their models here, so a
handle means the same model everywhere: two handles that differ in anything that changes the loaded
object (file content, precision, ``compile``, FSDP sharding) are two entries, never one answering for
the other. Placement between uses (gpu / offload / block swap) is not part of the key: it is applied
by :func:`.placement.on_device` on every use. Nor are a handle's LoRAs: :meth:`ModelStore.use` merges
them into the loaded model (:mod:`.lora`), so another LoRA or strength never reloads the base.

A host with its own memory manager (ComfyUI) plugs in through :class:`HostMemory`; the default does
nothing, and the store manages placement itself. A host whose objects own models (ComfyUI's node
outputs) takes :meth:`ModelStore.lease` d handles: a leased model leaves the store when the last handle
leased for it is garbage (ComfyUI dropped the loader's output from its cache, or ``/free`` reset it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..loading.identity import FileIdentity, file_identity
from ..models.block_swap import empty_host_cache
from .handles import ModelHandle, load
from .lora import sync_loras
from .placement import module_of, on_device

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

    def before_use(self, key: StoreKey, model: object, device: torch.device, *, resident_bytes: int,
                   working_bytes: int) -> None:
        """A model is about to be placed on ``device``, ``resident_bytes`` of its weights there (less than
        all with block swap), and its stage to need ``working_bytes`` more: make room for both."""

    def released(self, key: StoreKey) -> None:
        """A model left the store."""


class NoHostMemory:
    """No host memory manager: the store's own placement is all there is."""

    def loaded(self, key: StoreKey, model: object) -> None:
        pass

    def before_use(self, key: StoreKey, model: object, device: torch.device, *, resident_bytes: int,
                   working_bytes: int) -> None:
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
        self._leases: dict[StoreKey, int] = {}  # live leased handles per key
        self._lock = threading.RLock()
        self.loaded_roles: list[str] = []  # roles loaded since the last reset (a job's report)

    def lease(self, handle: ModelHandle) -> ModelHandle:
        """``handle`` (equal to it) carrying a lease: the model loaded for it stays in the store while any
        handle leased for the same key is alive, and leaves it when the last one is garbage."""
        key = StoreKey.of(handle)
        token = _Lease()
        with self._lock:
            self._leases[key] = self._leases.get(key, 0) + 1
        weakref.finalize(token, self._lease_ended, key)
        return dataclasses.replace(handle, owner=token)

    def _lease_ended(self, key: StoreKey) -> None:
        # runs inside the garbage collector: no gc.collect here, the model is freed when its last reference goes
        with self._lock:
            left = self._leases.get(key, 0) - 1
            if left > 0:
                self._leases[key] = left
                return
            self._leases.pop(key, None)
            if self._models.pop(key, None) is not None:
                self.host.released(key)
                log.info("released %s model %s: nothing uses it any more", key.role, key.file.name)

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
            swap_blocks: int | None = None, sharded: bool = False, loader: Loader = load,
            working_bytes: int = 0) -> Iterator[object]:
        """The model on ``device`` for the block, back at ``home`` after (None: left where it ran, for a
        caller that drops it next); ``swap_blocks`` None: the handle's. ``working_bytes``: what the stage
        needs beyond the weights (activations), for a host that makes room before placing the model."""
        model = self.get(handle, device if home is None else home, sharded=sharded, loader=loader)
        with self._lock:  # the handle's LoRAs merged (or the base restored): the model is shared by handles
            sync_loras(model, handle.loras, device, sharded=sharded)
        swap = handle.swap_for(model) if swap_blocks is None else swap_blocks
        self.host.before_use(StoreKey.of(handle, sharded), model, device, resident_bytes=resident_bytes(model, swap),
                             working_bytes=working_bytes)
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
            empty_host_cache()  # block swap's pinned host buffers of the dropped models


class _Lease:
    """The token a leased handle carries (see :meth:`ModelStore.lease`)."""


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def resident_bytes(model: object, swap_blocks: int) -> int:
    """Weight bytes of ``model`` on its working device while it runs: all of them, or with block swap all
    but the last ``swap_blocks`` blocks plus the two device slots they stream through."""
    module = module_of(model)
    total = tensor_bytes(module)
    if not swap_blocks:
        return total
    swapped = [tensor_bytes(block) for block in list(module.blocks)[-swap_blocks:]]
    return total - sum(swapped) + 2 * max(swapped)


# The process-wide store of the ComfyUI nodes (every handle from every loader node).
SHARED_STORE = ModelStore()
