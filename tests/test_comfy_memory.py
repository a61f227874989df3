"""The nodes' models under a host memory manager: leases that end with the loader's output, ComfyUI's VRAM
states mapped to memory modes, and the hook the store calls (faked here; the real ComfyUI: see
tests/test_comfyui_integration.py)."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch
from test_nodes import N, checkpoint, comfy_env, load_wan, models_root  # noqa: F401 (fixtures)

from nodes import host
from pixelwizard_core.pipeline.store import SHARED_STORE, StoreKey, resident_bytes, tensor_bytes


def run_anchor(wan, lr):
    text = N["PixelWizardTextEncode"]().encode(wan, "a fox", "", None, None)[0]
    return N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 5, 2, 5.0, 5.0, 1, "unipc", lr)[0]


def held_roles() -> list[str]:
    return sorted(key.role for key, _ in SHARED_STORE.entries())


def test_models_leave_the_store_when_the_loader_outputs_are_dropped(comfy_env):
    wan, lr = load_wan(), checkpoint("lr")
    run_anchor(wan, lr)
    assert held_roles() == ["lr", "text"]
    again = checkpoint("lr")  # a second output for the same file and options: a second lease
    del lr
    gc.collect()
    assert held_roles() == ["lr", "text"]  # still leased by `again`
    del again
    gc.collect()
    assert held_roles() == ["text"]
    del wan
    gc.collect()
    assert held_roles() == []


def test_a_leased_handle_travels_to_workers_without_its_lease(comfy_env):
    handle = checkpoint("hr")
    assert handle.owner is not None
    copy = pickle.loads(pickle.dumps(handle))
    assert copy == handle and hash(copy) == hash(handle) and copy.owner is None


@pytest.mark.parametrize("state, mode", [("HIGH_VRAM", "gpu"), ("NORMAL_VRAM", "offload"), ("LOW_VRAM", "block_swap"),
                                         ("NO_VRAM", "block_swap"), ("DISABLED", "offload"), ("SHARED", "offload")])
def test_auto_memory_mode_follows_comfyuis_vram_state(monkeypatch, state, mode):
    class VRAMState:
        name = state

    class FakeManager:
        vram_state = VRAMState()

    monkeypatch.setattr(host, "_mm", FakeManager())
    assert host.memory_mode("auto") == mode
    assert host.memory_mode("offload") == "offload"  # an explicit mode is kept


def test_auto_outside_comfyui_offloads(monkeypatch):
    monkeypatch.setattr(host, "_mm", None)
    assert host.memory_mode("auto") == "offload"


class RecordingHost:
    """A host memory manager that records what the store tells it."""

    def __init__(self):
        self.calls = []

    def loaded(self, key, model):
        self.calls.append(("loaded", key.role))

    def before_use(self, key, model, device, *, resident_bytes, working_bytes):
        self.calls.append(("before_use", key.role, resident_bytes, working_bytes))

    def released(self, key):
        self.calls.append(("released", key.role))


def test_the_store_tells_the_host_what_each_stage_needs(comfy_env, monkeypatch):
    recorder = RecordingHost()
    monkeypatch.setattr(SHARED_STORE, "host", recorder)
    wan, lr = load_wan(), checkpoint("lr")
    run_anchor(wan, lr)
    roles = [call[1] for call in recorder.calls if call[0] == "loaded"]
    assert roles == ["text", "lr"]
    uses = {call[1]: call[2:] for call in recorder.calls if call[0] == "before_use"}
    dit = dict(SHARED_STORE.entries())[StoreKey.of(lr)]
    assert uses["lr"][0] == tensor_bytes(dit) and uses["lr"][1] > 0  # all weights, and room for activations
    assert uses["text"][1] == 0
    del lr
    gc.collect()
    assert recorder.calls[-1] == ("released", "lr")


def test_resident_bytes_with_block_swap_count_two_slots(comfy_env):
    from pixelwizard_core.models.dit import WanDiT
    from tiny_models import DIT
    import dataclasses

    dit = WanDiT(dataclasses.replace(DIT, num_layers=4))
    block = tensor_bytes(dit.blocks[0])
    assert resident_bytes(dit, 0) == tensor_bytes(dit)
    assert resident_bytes(dit, 3) == tensor_bytes(dit) - 3 * block + 2 * block


def test_models_route_lists_what_the_nodes_hold(comfy_env):
    from nodes.routes import free_request_stops_pools, held_models

    wan, lr = load_wan(), checkpoint("lr")
    run_anchor(wan, lr)
    answer = held_models()
    assert sorted(m["role"] for m in answer["models"]) == ["lr", "text"] and answer["pools"] == []
    assert all(m["bytes"] > 0 and m["device_bytes"] == m["bytes"] for m in answer["models"])  # CPU is the device
    assert free_request_stops_pools({"unload_models": True}) and not free_request_stops_pools({})
    assert torch.device("cpu") == host.device()


def test_anchor_sampler_starts_from_an_image(comfy_env):
    """The Anchor Sampler's optional start_image (IMAGE [B, H, W, 3]) becomes the anchor's first frame."""
    from pixelwizard_core.pipeline.first_frame import encode_first_frame

    wan, lr = load_wan(), checkpoint("lr")
    text = N["PixelWizardTextEncode"]().encode(wan, "a fox", "", None, None)[0]
    image = torch.rand(1, 90, 160, 3)
    anchor, latent = N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 5, 2, 5.0, 5.0, 1, "unipc", lr, None,
                                                            image)
    with host.placed(wan.vae) as vae, torch.no_grad():
        first = encode_first_frame(vae, image[0], 128, 64)
    assert torch.equal(anchor.latent[:, :, :1], first.latent) and latent["samples"].shape == (1, 48, 2, 4, 8)
