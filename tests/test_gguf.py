"""GGUF weights: torch dequantization equal to the gguf package bit for bit, tiny DiT / umT5 / HR files
written with gguf.GGUFWriter loaded with their Linears still quantized, outputs within the quantization
error of the fp32 model, refusal of other types, and block swap, pickling and the memory model with
quantized weights.

The bound tested for a model whose block Linears are quantized (file written here with the gguf package,
independently of our writer):

1. computing in float32, the output equals the fp32 model whose quantized weights were replaced by
   ``gguf.quants.dequantize(gguf.quants.quantize(W))`` to 1e-5 relative: the only error is the
   quantization's;
2. the relative L2 error of the output against the unquantized fp32 model is at most the largest relative
   L2 quantization error of a weight, eps_w = max ||deq(q(W)) - W|| / ||W|| (a model that amplified the
   weight error, or read the blocks wrongly, exceeds it; measured: 0.13-0.15 eps_w), and above zero;
3. computing in bf16 (the default), at most eps_w + 2^-8 (bf16's rounding).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pixelwizard_core.errors import WeightFormatError  # noqa: E402
from pixelwizard_core.loading import inspect_weights, load_dit, load_t5  # noqa: E402
from pixelwizard_core.models import quantized  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.quantized import QUANT_TYPES, QuantizedEmbedding, QuantizedLinear  # noqa: E402
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder  # noqa: E402
from pixelwizard_core.pipeline import memory  # noqa: E402
from pixelwizard_core.pipeline.placement import on_device  # noqa: E402

CONFIG = DiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3, text_dim=32)
T5_CONFIG = T5Config.tiny(dim=64, dim_attn=64, dim_ffn=96)


# ---------------------------------------------------------------------------------------------- helpers

def random_blocks(name: str, count: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``count`` blocks, their f16 scale fields set to finite values (random bytes there
    would be NaN/inf half the time and compare unequal even when equal)."""
    spec = QUANT_TYPES[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(count, spec.type_size), dtype=np.uint8)
    halves = (rng.standard_normal((count, 2)) * 0.05).astype(np.float16).view(np.uint8)
    if name == "Q6_K":
        blocks[:, 208:210] = halves[:, :2]
    elif name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        blocks[:, 0:4] = halves
    else:
        blocks[:, 0:2] = halves[:, :2]
    return blocks


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], quantize: dict[str, str], arch: str = "wan",
               strings: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Write ``tensors`` with gguf.GGUFWriter (``quantize``: name -> type, others F32); returns the float32
    values the file holds (dequantized by the gguf package) under the same names."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (strings or {}).items():
        writer.add_string(key, value)
    held = {}
    for name, tensor in tensors.items():
        array = tensor.detach().float().numpy()
        kind = quantize.get(name)
        if kind is None:
            writer.add_tensor(name, array)
            held[name] = tensor.detach().float()
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            blocks = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
            held[name] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def block_linears(state: dict[str, torch.Tensor], kind: str) -> dict[str, str]:
    return {k: kind for k, v in state.items() if k.startswith("blocks.") and v.dim() == 2
            and "pos_embedding" not in k}


def tiny_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(CONFIG).eval()


def dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 48, 2, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 7, 32, generator=g))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weight_error(state: dict[str, torch.Tensor], held: dict[str, torch.Tensor], names) -> float:
    return max(relative(held[n], state[n]) for n in names)


# ---------------------------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("name", QUANT_TYPES.names())
def test_dequantization_equals_the_gguf_package_bit_for_bit(name: str, monkeypatch) -> None:
    blocks = random_blocks(name, 96)
    rows = blocks.reshape(8, -1)  # 8 rows of 12 blocks
    expected = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[name])
    monkeypatch.setattr(quantized, "_CHUNK_ELEMENTS", 2 * expected.shape[1])  # several row chunks
    out = quantized.dequantize(torch.from_numpy(rows), name, expected.shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == expected.shape
    assert torch.equal(out.view(torch.int32), torch.from_numpy(expected.copy()).view(torch.int32))


def test_dequantization_to_bf16_is_the_float32_values_rounded_once() -> None:
    rows = random_blocks("Q4_K", 8).reshape(2, -1)
    exact = quantized.dequantize(torch.from_numpy(rows), "Q4_K", (2, 1024))
    assert torch.equal(quantized.dequantize(torch.from_numpy(rows), "Q4_K", (2, 1024), torch.bfloat16),
                       exact.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- the DiT

@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_1"])
def test_dit_in_gguf_is_within_the_quantization_error(kind: str, tmp_path: Path) -> None:
    model = tiny_dit()
    state = model.state_dict()
    quantize = block_linears(state, kind)
    held = write_gguf(tmp_path / "dit.gguf", state, quantize)
    eps_w = weight_error(state, held, quantize)
    inputs = dit_inputs()
    with torch.no_grad():
        exact = model(*inputs)
        model.load_state_dict(held)
        expected = model(*inputs)  # fp32 with the weights the file holds
        loaded = load_dit(tmp_path / "dit.gguf", dtype="fp32")
        assert isinstance(loaded.blocks[0].ffn[0], QuantizedLinear)
        got32 = loaded(*inputs)
        got16 = load_dit(tmp_path / "dit.gguf")(*inputs)
    assert relative(got32, expected) < 1e-5
    assert 0 < relative(got32, exact) <= eps_w
    assert relative(got16, exact) <= eps_w + 2**-8


def test_quantized_linears_keep_their_blocks_and_the_rest_its_float_type(tmp_path: Path) -> None:
    state = tiny_dit().state_dict()
    quantize = block_linears(state, "Q8_0")
    write_gguf(tmp_path / "dit.gguf", state, quantize)
    model = load_dit(tmp_path / "dit.gguf")
    layer = model.blocks[1].self_attn.k
    assert type(layer) is QuantizedLinear and layer.weight.dtype == torch.uint8
    assert tuple(layer.weight.shape) == (128, 128 // 32 * 34) and layer.compute_dtype == torch.bfloat16
    assert model.attention_dtype() == torch.bfloat16
    stored = dict(model.named_parameters())
    assert [n for n, p in stored.items() if p.dtype == torch.uint8] == [f"{n}" for n in quantize]
    assert stored["blocks.0.modulation"].dtype == torch.bfloat16  # not quantized: the target dtype
    assert stored["text_embedding.0.weight"].dtype == torch.bfloat16
    quantized_bytes = sum(p.numel() for n, p in stored.items() if n in quantize)
    assert quantized_bytes == sum(state[n].numel() for n in quantize) * 34 // 32  # the real size


def test_fp32_layers_and_other_tensors_in_block_types(tmp_path: Path) -> None:
    """A quantized FP32Linear (time projection) still computes in float32; a quantized tensor that is no
    Linear weight (the head's modulation) is dequantized at load; both equal the fp32 model with the
    file's values."""
    model = tiny_dit()
    state = model.state_dict()
    quantize = {"time_projection.1.weight": "Q8_0", "head.modulation": "Q5_0"}
    held = write_gguf(tmp_path / "dit.gguf", state, quantize)
    loaded = load_dit(tmp_path / "dit.gguf", dtype="bf16")
    assert type(loaded.time_projection[1]) is quantized.QuantizedFP32Linear
    assert loaded.time_projection[1].compute_dtype == torch.float32
    assert loaded.head.modulation.dtype == torch.bfloat16
    assert torch.equal(loaded.head.modulation, held["head.modulation"].to(torch.bfloat16))
    e = torch.randn(2, 128)
    with torch.no_grad():
        model.load_state_dict(held)
        bias = model.time_projection[1].bias
        bias.copy_(bias.to(torch.bfloat16))  # float tensors are loaded in the target dtype, bf16 here
        assert torch.allclose(loaded.time_projection(e), model.time_projection(e), rtol=1e-5, atol=1e-6)


def test_published_layout_prefix_and_five_dim_patch_embedding(tmp_path: Path) -> None:
    """Published Wan GGUFs: 'model.diffusion_model.' keys, the 5-D patch embedding in F32 as written by
    ComfyUI-GGUF's 5-D fix, the block Linears quantized."""
    state = tiny_dit().state_dict()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    write_gguf(tmp_path / "dit.gguf", prefixed, {f"model.diffusion_model.{k}": t
                                                 for k, t in block_linears(state, "Q5_0").items()})
    info = inspect_weights(tmp_path / "dit.gguf")
    assert info.problem is None and info.component == "dit", info.problem
    assert info.quantization == "gguf Q5_0" and "Comfy 'model.diffusion_model.' prefix" in info.layout
    assert info.dtypes["Q5_0"] == len(block_linears(state, "Q5_0"))
    model = load_dit(tmp_path / "dit.gguf")
    assert model.patch_embedding.weight.shape == (128, 48, 1, 2, 2)


def test_original_shape_metadata_gives_the_torch_shape(tmp_path: Path) -> None:
    """ComfyUI-GGUF's comfy.gguf.orig_shape.<name>: a tensor stored in another shape gets its torch shape."""
    state = tiny_dit().state_dict()
    key = "patch_embedding.weight"
    stored = dict(state, **{key: state[key].reshape(128, 48 * 4)})
    path = tmp_path / "dit.gguf"
    writer = gguf.GGUFWriter(path, "wan")
    writer.add_array(f"comfy.gguf.orig_shape.{key}", list(state[key].shape))
    for name, tensor in stored.items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_dit(path, dtype="fp32")
    assert torch.equal(model.patch_embedding.weight, state[key])


def test_other_quantization_types_are_refused_by_name(tmp_path: Path) -> None:
    state = tiny_dit().state_dict()
    path = tmp_path / "dit.gguf"
    writer = gguf.GGUFWriter(path, "wan")
    for name, tensor in state.items():
        if name == "blocks.0.ffn.2.weight":  # [128, 256]: each row one 256-value Q2_K block of 84 bytes
            raw = np.zeros((128, 84), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightFormatError) as refused:
        load_dit(path)
    message = str(refused.value)
    assert "quantized as Q2_K" in message and "'blocks.0.ffn.2.weight' is Q2_K" in message
    assert "Q8_0" in message and "Q6_K" in message  # what it does load


def test_the_forward_dequantizes_in_torch_without_numpy(tmp_path: Path, monkeypatch) -> None:
    state = tiny_dit().state_dict()
    write_gguf(tmp_path / "dit.gguf", state, block_linears(state, "Q4_1"))
    model = load_dit(tmp_path / "dit.gguf")
    inputs = dit_inputs()

    def refuse(*args, **kwargs):
        raise AssertionError("numpy on the hot path")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs)).all()


def test_block_swap_and_pickling_move_the_blocks_and_keep_the_output(tmp_path: Path) -> None:
    state = tiny_dit().state_dict()
    write_gguf(tmp_path / "dit.gguf", state, block_linears(state, "Q8_0"))
    model = load_dit(tmp_path / "dit.gguf")
    inputs = dit_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        with on_device(model, "cpu", home="cpu", swap_blocks=2):
            swapped = model(*inputs)
        copy = pickle.loads(pickle.dumps(model))  # what a worker gets when a model is sent, not reloaded
        assert torch.equal(copy(*inputs), expected)
    assert torch.equal(swapped, expected)
    assert type(copy.blocks[2].ffn[2]) is QuantizedLinear and copy.blocks[2].ffn[2].qtype == "Q8_0"
    moved = model.blocks[0].ffn[0].to("meta")  # nn.Module.to / placement move the raw blocks as they are
    assert moved.weight.device.type == "meta" and moved.weight.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- umT5

T5_LLAMA = {"token_embedding.weight": "token_embd.weight", "norm.weight": "enc.output_norm.weight"}
T5_PARTS = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_o", "norm1": "attn_norm",
            "pos_embedding.embedding": "attn_rel_b", "ffn.gate.0": "ffn_gate", "ffn.fc1": "ffn_up",
            "ffn.fc2": "ffn_down", "norm2": "ffn_norm"}


def llama_t5_name(name: str) -> str:
    """Our umT5 name -> the llama.cpp name used by published umT5 GGUFs (city96/umt5-xxl-encoder-gguf)."""
    if name in T5_LLAMA:
        return T5_LLAMA[name]
    _, index, rest = name.split(".", 2)
    return f"enc.blk.{index}.{T5_PARTS[rest.removesuffix('.weight')]}.weight"


def test_block_swap_streams_blocks_stored_in_different_quantizations(tmp_path: Path) -> None:
    """Q4_K_M-style files store some blocks' Linears in another type than the rest: each swapped block keeps
    its own layout, the slots fit the largest, and the output is the unswapped model's bit for bit."""
    from pixelwizard_core.models.block_swap import BlockSwap

    state = tiny_dit().state_dict()
    kinds = {0: "Q8_0", 1: "Q4_0", 2: "Q5_1"}
    quantize = {k: kinds[int(k.split(".")[1])] for k in block_linears(state, "Q8_0")}
    write_gguf(tmp_path / "mixed.gguf", state, quantize)
    model = load_dit(tmp_path / "mixed.gguf")
    assert [model.blocks[i].ffn[0].qtype for i in range(3)] == ["Q8_0", "Q4_0", "Q5_1"]
    inputs = dit_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        with BlockSwap(model.blocks, 3, "cpu") as swap:
            swapped = model(*inputs)
            sizes = [layout.nbytes for layout in swap._layouts]
            assert len(set(sizes)) == 3 and swap.slot_bytes() == 2 * max(sizes)
            assert swap.host_bytes()["buffer"] == max(sizes)
    assert torch.equal(swapped, expected)
    assert torch.equal(model(*inputs), expected)  # back on its own tensors


def test_a_lora_on_a_gguf_dit_runs_as_a_delta_and_comes_off_exactly(tmp_path: Path) -> None:
    """A LoRA on Q8_0 Linears (raw blocks, shape [out, in/32*34]) is checked against the weight's [out, in] and
    runs beside the quantized weight: the output is that of the file's float weights with W + s*(a/r)*B*A
    merged by hand; removing it gives the quantized model's output back bit for bit."""
    from safetensors.torch import save_file

    from pixelwizard_core.models.lora import has_delta
    from pixelwizard_core.pipeline.lora import applied_loras, remove_loras, sync_loras
    from pixelwizard_core.loading.lora import lora_ref

    model = tiny_dit()
    state = model.state_dict()
    held = write_gguf(tmp_path / "dit.gguf", state, block_linears(state, "Q8_0"))
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, CONFIG.dim, generator=g), torch.randn(CONFIG.ffn_dim, 4, generator=g) * 0.1
    target = "blocks.1.ffn.0.weight"
    save_file({"diffusion_model.blocks.1.ffn.0.lora_down.weight": down,
               "diffusion_model.blocks.1.ffn.0.lora_up.weight": up, "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0)},
              str(tmp_path / "lora.safetensors"))
    quantized_dit = load_dit(tmp_path / "dit.gguf", dtype="fp32")
    inputs = dit_inputs()
    with torch.no_grad():
        plain = quantized_dit(*inputs)
        sync_loras(quantized_dit, [lora_ref(tmp_path / "lora.safetensors", 0.7)], "cpu")
        assert has_delta(quantized_dit.blocks[1].ffn[0]) and applied_loras(quantized_dit)
        with_lora = quantized_dit(*inputs)
        by_hand = dict(held)
        by_hand[target] = held[target] + 0.7 * (2.0 / 4) * (up @ down)
        model.load_state_dict(by_hand)
        expected = model(*inputs)
        remove_loras(quantized_dit)
        assert torch.equal(quantized_dit(*inputs), plain)
    assert relative(with_lora, expected) < 1e-5 and relative(with_lora, plain) > 1e-3


def test_umt5_with_llama_cpp_names_and_a_quantized_token_table(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = UMT5Encoder(T5_CONFIG).eval()
    state = model.state_dict()
    named = {llama_t5_name(k): v for k, v in state.items()}
    quantize = {llama_t5_name(k): "Q8_0" for k in block_linears(state, "Q8_0")}
    quantize["token_embd.weight"] = "Q8_0"
    held = write_gguf(tmp_path / "umt5.gguf", named, quantize, arch="t5encoder")
    ids = torch.randint(0, T5_CONFIG.vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        model.load_state_dict({k: held[llama_t5_name(k)] for k in state})
        expected = model(ids, mask)
        loaded = load_t5(tmp_path / "umt5.gguf", dtype="fp32")
        got = loaded(ids, mask)
    assert type(loaded.token_embedding) is QuantizedEmbedding
    assert loaded.blocks[0].ffn.fc2.weight.dtype == torch.uint8
    assert loaded.blocks[0].pos_embedding.embedding.weight.dtype == torch.float32  # F32 in the file
    assert relative(got, expected) < 1e-5


# ---------------------------------------------------------------------------------------------- memory model

def test_the_memory_model_counts_quantized_blocks_at_their_size() -> None:
    bf16 = memory.weight_bytes("lr", "bf16")
    q8 = memory.weight_bytes("lr", "q8_0")
    linear = memory.DIT_BLOCK_LINEAR_PARAMS
    assert q8 == bf16 - linear * 2 + linear * 34 // 32
    assert 0.5 < q8 / bf16 < 0.56  # "about half"
    assert memory.weight_bytes("hr", "q4_k") - memory.weight_bytes("lr", "q4_k") == \
        memory.weight_bytes("hr") - memory.weight_bytes("lr")  # dt embedding and injector not quantized
    layout = memory.swapped_block_layout("q8_0")
    per_block = linear // memory.DIT_BLOCKS
    assert layout.stored_bytes == per_block * 34 // 32 + (memory.DIT_BLOCK_PARAMS - per_block) * 2
    assert memory.block_swap_savings(10, "q8_0") == 8 * layout.stored_bytes
    estimate = memory.estimate_memory(1920, 1088, precision="q8_0")
    assert estimate.stages["hr"] < memory.estimate_memory(1920, 1088).stages["hr"]
