"""Inside ComfyUI, its model manager owns our models, as it owns its own.

The model store (``pixelwizard_core/pipeline/store.py``) tells a :class:`ComfyModelManager` about each
model it loads, uses and drops. Each loaded model gets a ``ModelPatcher`` (:func:`patcher_class`), so it is
listed in ``comfy.model_management.current_loaded_models`` once a stage has used it, and:

- before a stage places a model, ``load_models_gpu`` makes room for the weights that will sit on the
  device and the stage's activations (our memory model's estimate), evicting ComfyUI's idle models or ours;
- ComfyUI evicts ours the way it evicts its own (``free_memory`` when another model needs room, the
  "Unload models" button, ``POST /free``, its out-of-memory recovery): the patcher moves the weights to the
  offload device through our placement, which stays the one place that moves weights;
- the loader nodes' outputs hold leases on their models (``ModelStore.lease``): when ComfyUI drops those
  outputs from its cache ("Free model and node cache", ``/free`` with ``free_memory``, a changed loader),
  the models leave host memory too.

The patcher does not move weights when ComfyUI "loads" it: our placement does that, block by block for
block swap, right after; the patcher reports the bytes really on the device.
"""

from __future__ import annotations

import functools
import gc
import logging

import torch

from pixelwizard_core.pipeline.placement import module_of, move_module
from pixelwizard_core.pipeline.store import StoreKey, tensor_bytes
from pixelwizard_core.system import trim_host_memory

log = logging.getLogger("pixelwizard")


def bytes_on(module: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the module's tensors on ``device`` (a device without index matches any index)."""
    def same(other: torch.device) -> bool:
        return other.type == device.type and (device.index is None or other.index in (None, device.index))

    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()) if same(t.device))


@functools.cache
def patcher_class() -> type:
    """A ``comfy.model_patcher.ModelPatcher`` whose weights our placement moves (built on first use, inside
    ComfyUI only). ComfyUI reads the real bytes on the device, and unloading it moves the weights home."""
    from comfy.model_patcher import ModelPatcher

    class PixelWizardPatcher(ModelPatcher):
        def loaded_size(self) -> int:
            return bytes_on(self.model, self.load_device)

        def current_loaded_device(self) -> torch.device:
            return self.load_device if self.loaded_size() else self.offload_device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
            return 0  # our placement puts the weights on the device right after (whole, or block-swapped)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
            freed = self.loaded_size()
            move_module(self.model, self.offload_device)  # our modules cannot run partly offloaded: all of it
            log.info("ComfyUI moved PixelWizard %s to %s to free memory", type(self.model).__name__,
                     self.offload_device)
            return freed

        def detach(self, unpatch_all=True):
            self.partially_unload(self.offload_device)
            return self.model

    return PixelWizardPatcher


class ComfyModelManager:
    """The model store's host hook inside ComfyUI (see the module docstring); ``mm`` is
    ``comfy.model_management``."""

    def __init__(self, mm: object) -> None:
        self.mm = mm
        self.patchers: dict[StoreKey, object] = {}
        self._trim_pending = False
        gc.callbacks.append(self._after_collection)

    def loaded(self, key: StoreKey, model: object) -> None:
        module = module_of(model)
        # evicted weights go to the CPU in every vram state: ComfyUI's own offload device is the GPU under
        # --highvram, where "Unload models" would then free nothing of ours
        self.patchers[key] = patcher_class()(module, load_device=self.mm.get_torch_device(),
                                             offload_device=torch.device("cpu"), size=tensor_bytes(module))

    def before_use(self, key: StoreKey, model: object, device: torch.device, *, resident_bytes: int,
                   working_bytes: int) -> None:
        patcher = self.patchers.get(key)
        if patcher is None:
            return
        patcher.size = resident_bytes  # what ComfyUI must find room for (block swap: less than the model)
        self.mm.load_models_gpu([patcher], memory_required=working_bytes, force_full_load=True)

    def released(self, key: StoreKey) -> None:
        self._trim_pending = True  # the weights are freed once the collection that dropped them ends
        patcher = self.patchers.pop(key, None)
        if patcher is None:
            return
        loaded = self.mm.current_loaded_models
        for index in range(len(loaded) - 1, -1, -1):
            if loaded[index].model is patcher:
                entry = loaded.pop(index)
                if entry.model_finalizer is not None:
                    entry.model_finalizer.detach()

    def _after_collection(self, phase: str, info: dict) -> None:
        if phase == "stop" and self._trim_pending:
            self._trim_pending = False
            trim_host_memory()

    def listed(self, key: StoreKey) -> bool:
        """Whether ComfyUI's ``current_loaded_models`` lists the model of ``key``."""
        patcher = self.patchers.get(key)
        return patcher is not None and any(entry.model is patcher for entry in self.mm.current_loaded_models)
