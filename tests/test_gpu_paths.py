"""The CUDA-only paths on the CPU treated as CUDA (tests/fake_cuda.py, tests/fakes/).

- block swap's stream ordering, checked by a recorder of streams, events and copies; removing either wait
  (or copying non-blocking from pageable memory) is caught;
- block swap's host memory: one buffer per block, reused while the model waits, page-locked at its size;
  the 5B manifest's planned pinned bytes;
- attention: flash only on GPUs that run it and in half precision, "auto" falls back to SDPA saying why
  once; the flash-attn fakes across dtypes, head dims and padded keys;
- torch.compile: one graph, no break, per DiT block for sdpa, flash and auto on a faked GPU.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from fake_cuda import StreamRecorder, install_flash, pretend_gpu

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models import attention as attn
from pixelwizard_core.models import block_swap as bs
from pixelwizard_core.models.block_swap import ALIGN, BlockLayout, BlockSwap, pinned_bytes
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.pipeline import memory
from pixelwizard_core.pipeline.placement import on_device

MANIFEST = Path(__file__).parent / "manifests" / "wan2.2_ti2v_5b_dit.json"
CONFIG = DiTConfig.tiny(num_layers=4)


def tiny_dit(dtype: torch.dtype = torch.float32, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(CONFIG).to(dtype).eval()


def inputs(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, CONFIG.in_dim, 2, 4, 6, generator=g), torch.tensor([640.0]),
            torch.randn(1, 9, CONFIG.text_dim, generator=g))


# --- block swap: stream ordering ------------------------------------------------------------------------


def swapped_run(count: int, recorder: StreamRecorder, calls: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The unswapped output and the swapped one (``calls`` forwards) with ``recorder`` as CUDA."""
    model = tiny_dit()
    with torch.no_grad():
        expected = model(*inputs())
        swap = BlockSwap(model.blocks, count, "cpu", streams=recorder, buffers=recorder)
        with recorder:
            swap.enable()
            handles = recorder.watch(model.blocks[swap.first:])
            outputs = [model(*inputs()) for _ in range(calls)]
            for handle in handles:
                handle.remove()
            swap.disable("cpu")
    return expected, outputs[-1]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_block_swap_orders_its_copies_and_reads_on_the_streams(count):
    recorder = StreamRecorder()
    expected, got = swapped_run(count, recorder)
    assert torch.equal(got, expected)
    assert recorder.violations() == []
    slot_fills = recorder.copies(non_blocking=True)
    assert slot_fills and all(op.stream == "side1" for op in slot_fills)  # the copies run beside the compute
    assert len([op for op in recorder.ops if op.kind == "read"]) == 2 * count  # two forwards
    # two slots: a block whose slot nothing else used since is not copied again (3 swapped: block 1 keeps slot 1)
    assert len(slot_fills) == {2: 2, 3: 3 + 2, 4: 4 + 4}[count]


def test_the_checker_catches_a_missing_wait_for_the_copy(monkeypatch):
    monkeypatch.setattr(BlockSwap, "_wait_ready", lambda self, slot: None)
    recorder = StreamRecorder()
    swapped_run(3, recorder)
    assert any("before the copy into it was waited on" in v for v in recorder.violations())


def test_the_checker_catches_a_missing_wait_for_the_slot_to_be_free(monkeypatch):
    monkeypatch.setattr(BlockSwap, "_wait_free", lambda self, slot: None)
    recorder = StreamRecorder()
    swapped_run(3, recorder)
    assert any("overwrites the slot" in v for v in recorder.violations())


def test_copies_from_pageable_memory_block_and_lying_about_it_is_caught():
    recorder = StreamRecorder(pinned=False)
    swapped_run(3, recorder)
    assert recorder.copies(non_blocking=True) == [] and recorder.violations() == []
    liar = StreamRecorder(pinned=False)
    liar.is_pinned = lambda tensor: True  # the code under test is told the memory is page-locked
    swapped_run(3, liar)
    assert any("non-blocking copy from pageable memory" in v for v in liar.violations())


# --- block swap: host memory ----------------------------------------------------------------------------


def test_each_swapped_block_is_one_host_buffer_reused_while_the_model_waits():
    model, recorder = tiny_dit(), StreamRecorder()
    with torch.no_grad():
        expected = model(*inputs())
    swap = BlockSwap(model.blocks, 3, "cpu", streams=recorder, buffers=recorder)
    swap.enable()
    for block in model.blocks[1:]:
        tensors = [*block.parameters(), *block.buffers()]
        base = tensors[0].untyped_storage().data_ptr()
        assert {t.untyped_storage().data_ptr() for t in tensors} == {base}  # one buffer
        assert all((t.data_ptr() - base) % ALIGN == 0 for t in tensors)
    first = [p.data_ptr() for p in model.blocks[3].parameters()]
    swap.disable("cpu")  # the model waits on the CPU: still in its page-locked buffers
    assert recorder.allocations == 3
    swap.enable()
    assert recorder.allocations == 3  # nothing copied or pinned again
    assert [p.data_ptr() for p in model.blocks[3].parameters()] == first
    with torch.no_grad():
        assert torch.equal(model(*inputs()), expected)
    swap.disable("cpu")


def test_the_5b_blocks_planned_pinned_bytes_are_within_1_percent_of_their_size():
    keys = json.loads(MANIFEST.read_text())["keys"]
    block = [(shape, torch.bfloat16) for key, shape in keys.items() if key.startswith("blocks.0.")]
    layout = BlockLayout.of(block)
    stored = layout.stored_bytes
    assert stored == memory.DIT_BLOCK_PARAMS * 2  # 312 MiB of bf16
    planned = pinned_bytes(layout.nbytes)  # one registered buffer: whole pages
    assert stored <= planned <= stored * 1.01, (stored, planned)
    assert planned - stored < len(block) * ALIGN + bs.PAGE
    # what torch's caching host allocator would take: each tensor, or the block, to a power of two
    per_tensor = sum(pinned_bytes(math.prod(shape) * 2, "cached") for shape, _ in block)
    assert per_tensor / stored > 1.6 and pinned_bytes(layout.nbytes, "cached") == 512 * 2**20
    assert memory.pinned_host_bytes(10) == 2 * 10 * planned  # both DiTs wait pinned in block_swap mode


class FakeCudart:
    def __init__(self, result: int = 0) -> None:
        self.result, self.registered = result, {}

    def cudaHostRegister(self, pointer, size, flags):  # noqa: N802 - CUDA's name
        if self.result == 0:
            self.registered[pointer] = size
        return self.result

    def cudaHostUnregister(self, pointer):  # noqa: N802
        self.registered.pop(pointer)
        return 0


def test_registered_pages_are_unlocked_when_the_last_view_is_gone(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(bs.PinnedBuffers, "method", "registered")
    start = bs._LockedPages.registered
    buffer = bs.PinnedBuffers().allocate(3 * bs.PAGE + 5)
    assert buffer.numel() == 3 * bs.PAGE + 5 and buffer.data_ptr() % bs.PAGE == 0
    assert list(cudart.registered.values()) == [4 * bs.PAGE] and bs._LockedPages.registered == start + 4 * bs.PAGE
    view = buffer[100:200].view(torch.bfloat16)
    del buffer
    assert cudart.registered  # a view still holds the block's weights
    del view
    assert cudart.registered == {} and bs._LockedPages.registered == start


def test_a_refused_registration_falls_back_to_torch_pinned_memory_once(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(result=712))
    monkeypatch.setattr(bs.PinnedBuffers, "method", "registered")
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))  # no GPU to pin with
    with caplog.at_level(logging.WARNING, logger="pixelwizard"):
        buffers = bs.PinnedBuffers()
        assert buffers.allocate(1000).numel() == 1000 and buffers.allocate(10).numel() == 10
    assert bs.PinnedBuffers.method == "cached"
    assert len([r for r in caplog.records if "cudaError 712" in r.getMessage()]) == 1


def test_disabling_a_swap_empties_the_pinned_host_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(bs, "empty_host_cache", lambda: emptied.append(1))
    model = tiny_dit()
    with BlockSwap(model.blocks, 2, "cpu"):
        assert emptied == []
    assert emptied == [1]


# --- attention: resolution on a faked GPU ---------------------------------------------------------------


@pytest.mark.parametrize("capability, fa3, expected", [
    ((9, 0), True, "flash_attn_interface"), ((9, 0), False, "flash_attn"), ((8, 0), True, "flash_attn"),
    ((12, 0), False, "flash_attn")])
def test_flash_runs_from_ampere_on_with_flash_attn_3_on_hopper(monkeypatch, capability, fa3, expected):
    device = pretend_gpu(monkeypatch, capability)
    install_flash(monkeypatch, fa3=fa3)
    kernel = attn.resolve_attention("auto", device, torch.bfloat16)
    assert kernel.name == "flash" and kernel.device == device
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    kernel.run(q, q, q)
    import sys

    assert len(sys.modules[expected].calls) == 1


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_before_ampere_auto_takes_sdpa_says_why_once_and_flash_is_refused(monkeypatch, caplog, capability):
    device = pretend_gpu(monkeypatch, capability)
    install_flash(monkeypatch, fa3=True)
    attn._said.clear()
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        for _ in range(3):  # every placement resolves again; the reason is said once
            assert attn.resolve_attention("auto", device, torch.bfloat16).name == "sdpa"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"compute capability {capability[0]}.{capability[1]}" in said[0]
    assert "attention 'auto' uses sdpa on cuda:0" in said[0]
    with pytest.raises(ConfigError, match=r"'flash' cannot run on cuda:0.*needs 8.0 or newer"):
        attn.resolve_attention("flash", device, torch.bfloat16)


def test_without_flash_attn_auto_takes_sdpa_and_flash_says_what_to_install(monkeypatch):
    device = pretend_gpu(monkeypatch, (9, 0))
    install_flash(monkeypatch, fa2=False, fa3=False)
    assert attn.resolve_attention("auto", device, torch.float16).name == "sdpa"
    with pytest.raises(ConfigError, match="flash-attn package is not installed"):
        attn.resolve_attention("flash", device, torch.float16)


def test_float32_auto_is_float32_sdpa_and_forced_flash_says_it_computes_in_bf16(monkeypatch, caplog):
    import fakes.flash_attn as fa2

    device = pretend_gpu(monkeypatch, (8, 0))
    install_flash(monkeypatch)
    attn._said.clear()
    assert attn.resolve_attention("auto", device, torch.float32).name == "sdpa"
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        forced = attn.resolve_attention("flash", device, torch.float32)
    assert "computes in bfloat16 while the model computes in float32" in caplog.text
    q = torch.randn(1, 8, 2, 16)
    out = forced.run(q, q, q)
    assert out.dtype == torch.float32 and fa2.calls[-1]["dtype"] == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 128, 256])
@pytest.mark.parametrize("k_len", [None, 5])
def test_flash_fakes_match_sdpa_across_dtypes_head_dims_and_padded_keys(monkeypatch, dtype, head_dim, k_len):
    device = pretend_gpu(monkeypatch, (9, 0))
    install_flash(monkeypatch, fa3=head_dim >= 64)  # FA3 (a tuple back) and FA2 (a tensor back)
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 7, 3, head_dim, generator=g).to(dtype) for _ in range(3))
    kernel = attn.resolve_attention("flash", device, dtype)
    out = attn.attention(q, k, v, k_len=k_len, backend=kernel)
    keys = slice(None, k_len)
    expected = attn._sdpa(q.double(), k[:, keys].double(), v[:, keys].double())
    assert out.dtype == dtype and out.shape == q.shape
    tolerance = 1e-2 if dtype == torch.float16 else 2e-2  # bf16 inputs or a bf16 cast
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_the_flash_fakes_check_their_inputs_as_flash_attn_does(monkeypatch):
    import fakes.flash_attn as fa2

    pretend_gpu(monkeypatch, (8, 6))
    q = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        fa2.flash_attn_func(q.float(), q.float(), q.float())
    with pytest.raises(RuntimeError, match="query and key must have the same dtype"):
        fa2.flash_attn_func(q, q.half(), q)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        fa2.flash_attn_func(q.transpose(1, 3).contiguous().transpose(1, 3), q, q)
    with pytest.raises(RuntimeError, match="head dimension at most 256"):
        big = torch.zeros(1, 4, 1, 264, dtype=torch.bfloat16)
        fa2.flash_attn_func(big, big, big)
    pretend_gpu(monkeypatch, (7, 5))
    with pytest.raises(RuntimeError, match="only supports Ampere GPUs or newer"):
        fa2.flash_attn_func(q, q, q)


def fake_sage(monkeypatch, hopper_kernel: bool = False) -> list:
    """A ``sageattention`` module whose kernels record their calls and compute with SDPA."""
    import sys
    import types

    calls = []

    def kernel(name):
        def run(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **options):
            calls.append((name, tensor_layout, q.dtype, options))
            return attn._sdpa(q, k, v)
        return run

    module = types.SimpleNamespace(sageattn=kernel("sageattn"))
    if hopper_kernel:
        module.sageattn_qk_int8_pv_fp16_cuda = kernel("int8_pv_fp16")
    monkeypatch.setitem(sys.modules, "sageattention", module)
    return calls


def test_auto_takes_sage_when_installed_after_flash(monkeypatch):
    """Preference flash > sage > sdpa; sage runs in half precision in layout [B, L, heads, head_dim]."""
    device = pretend_gpu(monkeypatch, (8, 9))
    install_flash(monkeypatch, fa2=False)
    calls = fake_sage(monkeypatch)
    assert attn.resolve_attention("auto", device, torch.bfloat16).name == "sage"
    assert attn.resolve_attention("auto", device, torch.float32).name == "sdpa"  # fp32 stays exact
    kernel = attn.resolve_attention("sage", device, torch.float32)
    q = torch.randn(1, 8, 2, 16)
    assert kernel.name == "sage" and kernel.run(q, q, q).dtype == torch.float32
    assert calls == [("sageattn", "NHD", torch.bfloat16, {})]
    install_flash(monkeypatch)
    assert attn.resolve_attention("auto", device, torch.bfloat16).name == "flash"


def test_sage_on_hopper_uses_the_int8_fp16_kernel(monkeypatch):
    device = pretend_gpu(monkeypatch, (9, 0))
    calls = fake_sage(monkeypatch, hopper_kernel=True)
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    attn.resolve_attention("sage", device, torch.bfloat16).run(q, q, q)
    assert calls == [("int8_pv_fp16", "NHD", torch.bfloat16, {"pv_accum_dtype": "fp32"})]


def test_sage_where_it_cannot_run_falls_back_with_one_warning(monkeypatch, caplog):
    import sys

    device = pretend_gpu(monkeypatch, (8, 9))
    install_flash(monkeypatch, fa2=False)
    monkeypatch.setitem(sys.modules, "sageattention", None)
    monkeypatch.setattr(attn, "_said", set())
    with caplog.at_level("WARNING", logger="pixelwizard"):
        assert attn.resolve_attention("sage", device, torch.bfloat16).name == "sdpa"
        assert attn.resolve_attention("sage", device, torch.bfloat16).name == "sdpa"
    warnings = [r.message for r in caplog.records if "cannot run" in r.message]
    assert len(warnings) == 1 and "sageattention package is not installed" in warnings[0]
    assert attn.resolve_attention("sage", torch.device("cpu"), torch.float32).name == "sdpa"  # a CPU too


def test_a_dit_on_a_faked_hopper_runs_flash_and_matches_sdpa(monkeypatch):
    import fakes.flash_attn_interface as fa3

    model = tiny_dit(torch.bfloat16)
    with torch.no_grad():
        reference = model(*inputs())
    device = pretend_gpu(monkeypatch, (9, 0))
    install_flash(monkeypatch, fa3=True)
    model.set_attention_backend("flash")  # weights on the CPU of a GPU machine: resolved when placed
    assert model.attn_kernel is None
    assert model.place_attention(device).name == "flash"
    kernel = model.attn_kernel
    monkeypatch.setattr(model, "place_attention", lambda device: kernel)  # the tensors stay on the CPU
    with torch.no_grad():
        out = model(*inputs())
    assert len(fa3.calls) == 2 * CONFIG.num_layers  # self- and cross-attention of every block
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


def test_placement_resolves_the_kernel_once_for_the_device():
    model = tiny_dit()
    with on_device(model, "cpu", home="cpu"):
        kernel = model.attn_kernel
        assert kernel is not None and kernel.name == "sdpa" and kernel.device == torch.device("cpu")
        with torch.no_grad():
            model(*inputs())
        assert model.attn_kernel is kernel  # the forward reused it


# --- torch.compile: one graph per block -------------------------------------------------------------------


def block_and_state(model: WanDiT) -> tuple[torch.nn.Module, tuple]:
    """Block 0 and the arguments the model's forward gives it."""
    seen = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    with torch.no_grad():
        model(*inputs())
    hook.remove()
    return model.blocks[0], seen["args"]


@pytest.mark.parametrize("backend", ["sdpa", "flash", "auto"])
def test_a_dit_block_compiles_to_one_graph_on_a_faked_gpu(monkeypatch, backend):
    import torch._dynamo

    model = tiny_dit(torch.bfloat16)
    device = pretend_gpu(monkeypatch, (9, 0))
    install_flash(monkeypatch, fa3=True)
    model.set_attention_backend(backend)
    kernel = model.place_attention(device)
    assert kernel.name == ("sdpa" if backend == "sdpa" else "flash")
    monkeypatch.setattr(model, "place_attention", lambda device: kernel)
    block, args = block_and_state(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_backend_looked_up_inside_the_block_breaks_the_graph(monkeypatch):
    """The test above can fail: a kernel that looks flash-attn up on every call (what HEAD did from inside
    each attention call) splits the block at each of its two attention calls."""
    import dataclasses

    import torch._dynamo

    model = tiny_dit(torch.bfloat16)
    device = pretend_gpu(monkeypatch, (9, 0))
    install_flash(monkeypatch, fa3=True)
    model.set_attention_backend("flash")
    kernel = dataclasses.replace(model.place_attention(device), run=lambda q, k, v: attn._flash_kernel(device)(q, k, v))
    monkeypatch.setattr(model, "place_attention", lambda device: kernel)
    block, args = block_and_state(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(*args)
    assert explained.graph_break_count >= 2

