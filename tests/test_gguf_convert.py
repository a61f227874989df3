"""``convert --gguf``: our checkpoints (the PixelWizard HR .pt, a safetensors DiT) written to GGUF Q8_0 load
with their block Linears quantized and everything else in its stored float type, within the quantization
error (bound of tests/test_gguf.py: at most the largest relative weight error); refusals are one message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from pixelwizard_core.errors import ConfigError  # noqa: E402
from pixelwizard_core.loading import GGUFSource, load_dit, load_hr_dit  # noqa: E402
from pixelwizard_core.loading.convert import main  # noqa: E402
from pixelwizard_core.loading.gguf_write import convert_to_gguf  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.models.quantized import QuantizedLinear  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE  # noqa: E402

CONFIG = DiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=2, text_dim=32)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def types_of(path: Path) -> dict[str, str]:
    with GGUFSource(path) as source:
        return {name: source._types[name] for name in source.infos}


@pytest.fixture
def hr_checkpoint(tmp_path: Path) -> Path:
    """A PixelWizard-style HR .pt: generator and generator_ema with 'model.' keys, the conditioning noted."""
    torch.manual_seed(0)
    model = WanHRDiT(CONFIG, step_size_conditioning="log_snr_span")
    for p in model.parameters():  # the zero-initialised layers get weights, so they matter
        if not p.abs().sum():
            p.data.normal_(0, 0.02)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "model.pt"
    torch.save({"generator": state, "generator_ema": {k: v + 0.01 for k, v in state.items()},
                "step_size_conditioning": "log_snr_span"}, path)
    return path


def test_hr_checkpoint_to_q8_0_keeps_the_injector_and_the_conditioning(hr_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "hr-Q8_0.gguf"
    assert main([str(hr_checkpoint), str(out), "--gguf"]) == 0
    types = types_of(out)
    quantized = {n for n, t in types.items() if t == "Q8_0"}
    assert quantized == {n for n in types if n.startswith("blocks.") and n.endswith(
        (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".ffn.0.weight", ".ffn.2.weight"))}
    assert all(types[n] == "F32" for n in types if n.startswith(("spatial_adapter.", "dt_embedding.")))

    reference = load_hr_dit(hr_checkpoint, dtype="fp32")
    model = load_hr_dit(out, dtype="fp32")
    assert model.step_size_conditioning == "log_snr_span"  # from the metadata, as the .pt says
    assert model.spatial_adapter.zero_layers["1"].weight.dtype == torch.float32  # not quantized
    assert isinstance(model.blocks[0].cross_attn.v, QuantizedLinear)
    eps_w = max(relative(m.dequantized_weight(torch.float32), reference.get_submodule(n).weight)
                for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    g = torch.Generator().manual_seed(1)
    x, anchor = torch.randn(1, 48, 2, 8, 8, generator=g), torch.randn(1, 48, 2, 4, 4, generator=g)
    inputs = (x, torch.tensor([800.0]), torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        exact = reference(*inputs, dt=torch.tensor([250.0]), anchor=anchor)
        got = model(*inputs, dt=torch.tensor([250.0]), anchor=anchor)
    assert 0 < relative(got, exact) <= eps_w


def test_ema_weights_on_request(hr_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.gguf"
    assert main([str(hr_checkpoint), str(out), "--gguf", "--section", "generator_ema"]) == 0
    with GGUFSource(out) as source:
        bias = source.read("blocks.0.self_attn.q.bias")  # F32: exact
    assert torch.equal(bias, load_hr_dit(hr_checkpoint, use_ema=True, dtype="fp32").blocks[0].self_attn.q.bias)


def test_safetensors_dit_keeps_its_stored_float_types(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in WanDiT(CONFIG).state_dict().items()}
    state["head.modulation"] = state["head.modulation"].float()  # a float32 tensor among bf16 ones
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, tmp_path / "dit.safetensors")
    counts = convert_to_gguf(tmp_path / "dit.safetensors", tmp_path / "dit.gguf", qtype="Q5_1")
    types = types_of(tmp_path / "dit.gguf")
    assert counts == {"Q5_1": 2 * 10, "BF16": len(state) - 21, "F32": 1}
    assert types["head.modulation"] == "F32" and types["blocks.1.norm3.weight"] == "BF16"
    model = load_dit(tmp_path / "dit.gguf")
    assert torch.equal(model.blocks[0].norm3.weight, state["blocks.0.norm3.weight"])  # exact, not re-rounded


def test_refusals_are_one_message(tmp_path: Path, caplog) -> None:
    save_file(WanVAE(VAEConfig.tiny()).state_dict(), tmp_path / "vae.safetensors")
    assert main([str(tmp_path / "vae.safetensors"), str(tmp_path / "vae.gguf"), "--gguf"]) == 2
    assert "the VAE has no Linears to quantize" in caplog.text and not (tmp_path / "vae.gguf").exists()
    with pytest.raises(ConfigError, match="the writer makes Q8_0"):
        convert_to_gguf(tmp_path / "vae.safetensors", tmp_path / "x.gguf", qtype="Q4_K")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="already exists"):
        convert_to_gguf(tmp_path / "vae.safetensors", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    assert not list(tmp_path.glob(".*.partial"))
