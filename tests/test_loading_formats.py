"""Header-level checks of every published layout against the full-size models on the meta device.

No tensor data exists here: the listings are the manifests of the real files (tests/manifests), written
into each layout's names, and the models are built on the meta device.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import manifest

from pixelwizard_core.errors import WeightFormatError
from pixelwizard_core.loading import configs, formats
from pixelwizard_core.loading.load import choose_section, load_from_source
from pixelwizard_core.loading.readers import PickleCheckpoint, TensorInfo, TensorSource

DIT = {k: tuple(v) for k, v in manifest("wan2.2_ti2v_5b_dit")["keys"].items()}
HR = {k: tuple(v) for k, v in manifest("pixelwizard_hr_checkpoint")["keys"].items()}
LR = {k: tuple(v) for k, v in manifest("pixelwizard_lr_checkpoint")["keys"].items()}
VAE = {k: tuple(v) for k, v in manifest("wan2.2_vae")["keys"].items()}
T5 = manifest("umt5_xxl_encoder")["keys"]
T5_OFFICIAL = {k: tuple(v["shape"]) for k, v in T5.items()}
T5_HF = {v["hf_name"]: tuple(v["shape"]) for v in T5.values()}


class HeaderOnly(TensorSource):
    """A listing without data: any read is a test failure (these checks must never touch weights)."""

    container = "header listing"

    def read(self, key: str) -> torch.Tensor:
        raise AssertionError(f"header-level check read tensor {key!r}")


def listing(keys: dict[str, tuple[int, ...]], dtype: torch.dtype | dict = torch.float32, metadata=None) -> HeaderOnly:
    infos = {k: TensorInfo(tuple(s), dtype.get(k, torch.float16) if isinstance(dtype, dict) else dtype)
             for k, s in keys.items()}
    return HeaderOnly(Path("listing"), infos, metadata)


def meta_pickle(sections: dict[str, dict[str, tuple[int, ...]]], dtype=torch.bfloat16) -> PickleCheckpoint:
    """A PixelWizard .pt as torch.load(mmap) would return it, with meta tensors in place of data."""
    return PickleCheckpoint(Path("model.pt"), {
        name: {k: torch.empty(s, dtype=dtype, device="meta") for k, s in keys.items()}
        for name, keys in sections.items()
    })


def fsdp_names(keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Insert FSDP / checkpoint-wrapper / torch.compile fragments the way a wrapped training model names keys."""
    out = {}
    for k, s in keys.items():
        k = k.replace("model.", "model._orig_mod._fsdp_wrapped_module.", 1)
        k = re.sub(r"blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module._checkpoint_wrapped_module.", k)
        out[k] = s
    return out


def assert_full_model(model: torch.nn.Module, expected: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected  # zero missing, zero unexpected, equal shapes
    assert all(p.is_meta for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {dtype}


# ---------------------------------------------------------------------------------------------- DiT

@pytest.mark.parametrize("layout", ["official", "comfy_prefix", "official_fp16"])
def test_dit_single_file_layouts_map_onto_full_model(layout: str) -> None:
    keys = {"official": DIT, "official_fp16": DIT,
            "comfy_prefix": {"model.diffusion_model." + k: s for k, s in DIT.items()}}[layout]
    dtype = torch.float16 if layout != "official" else torch.float32
    model = load_from_source(listing(keys, dtype), "dit", device="meta")
    assert type(model).__name__ == "WanDiT"
    assert_full_model(model, DIT, dtype)  # dtype None keeps the file dtype
    assert sum(p.numel() for p in model.parameters()) == 4_999_787_712


@pytest.mark.parametrize("sections", [
    ("generator",), ("generator_ema",), ("generator", "generator_ema"), ("",),
])
@pytest.mark.parametrize("fsdp", [False, True])
def test_pixelwizard_lr_layouts_map_onto_full_model(sections: tuple[str, ...], fsdp: bool) -> None:
    keys = fsdp_names(LR) if fsdp else LR
    ckpt = meta_pickle({name: keys for name in sections})
    chosen = choose_section(ckpt, prefer_ema=False)
    assert chosen == ("generator" if "generator" in sections else sections[0])
    model = load_from_source(ckpt.source(chosen), "dit", dtype=torch.bfloat16, device="meta")
    assert_full_model(model, DIT, torch.bfloat16)


@pytest.mark.parametrize("sections, use_ema, chosen", [
    (("generator",), False, "generator"),
    (("generator", "generator_ema"), False, "generator"),
    (("generator", "generator_ema"), True, "generator_ema"),
    (("generator_ema",), False, "generator_ema"),  # EMA-only file: what is there is used
])
def test_pixelwizard_hr_layouts_map_onto_full_model(sections, use_ema, chosen) -> None:
    ckpt = meta_pickle({name: HR for name in sections})
    assert choose_section(ckpt, prefer_ema=use_ema) == chosen
    model = load_from_source(ckpt.source(chosen), "hr_dit", dtype=torch.bfloat16, device="meta",
                             dtype_overrides={"spatial_adapter.": torch.float32})
    assert type(model).__name__ == "WanHRDiT"
    expected = {k.removeprefix("model."): s for k, s in HR.items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len([k for k in got if k.startswith("spatial_adapter.")]) == 18
    assert len([k for k in got if k.startswith("dt_embedding.")]) == 4
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {d for k, d in dtypes.items() if k.startswith("spatial_adapter.")} == {torch.float32}
    assert {d for k, d in dtypes.items() if not k.startswith("spatial_adapter.")} == {torch.bfloat16}


def test_pixelwizard_hr_with_fsdp_fragments_and_bare_keys() -> None:
    bare = {k.removeprefix("model."): s for k, s in HR.items()}
    for keys in (fsdp_names(HR), bare):
        model = load_from_source(listing(keys, torch.bfloat16), "hr_dit", device="meta")
        assert len(model.state_dict()) == 847


# ---------------------------------------------------------------------------------------------- VAE, umT5

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vae_layouts_map_onto_full_model(dtype: torch.dtype) -> None:
    model = load_from_source(listing(VAE, dtype), "vae", device="meta")
    assert type(model).__name__ == "WanVAE"
    assert_full_model(model, VAE, dtype)
    assert sum(p.numel() for p in model.parameters()) == 704_688_668


def test_t5_official_names_map_onto_full_model() -> None:
    model = load_from_source(listing(T5_OFFICIAL, torch.bfloat16), "t5", device="meta")
    assert type(model).__name__ == "UMT5Encoder"
    assert_full_model(model, T5_OFFICIAL, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


def test_t5_comfy_fp16_with_tokenizer_tensor_maps_onto_full_model() -> None:
    keys = dict(T5_HF, spiece_model=(4_548_313,))
    source = listing(keys, {"spiece_model": torch.uint8})
    plan = formats.plan_keys(source.infos, {}, "umt5_xxl_fp16.safetensors")
    assert plan.layout.names == "hf" and plan.tokenizer_key == "spiece_model"
    model = load_from_source(source, "t5", device="meta")
    assert_full_model(model, T5_OFFICIAL, torch.float16)


def test_t5_fp8_scaled_maps_onto_full_model() -> None:
    keys = dict(T5_HF)
    dtypes: dict[str, torch.dtype] = {}
    for name, shape in T5_HF.items():
        quantised = len(shape) == 2 and "relative_attention_bias" not in name and name != "shared.weight"
        dtypes[name] = torch.float8_e4m3fn if quantised else torch.float16
        if quantised:
            keys[name.removesuffix(".weight") + ".scale_weight"] = ()
            dtypes[name.removesuffix(".weight") + ".scale_weight"] = torch.float32
    keys["scaled_fp8"], dtypes["scaled_fp8"] = (0,), torch.float8_e4m3fn
    keys["spiece_model"], dtypes["spiece_model"] = (100,), torch.uint8
    source = listing(keys, dtypes)
    plan = formats.plan_keys(source.infos, {}, "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert plan.layout.quantization == "scaled_fp8"
    assert len(plan.weight_scales) == 24 * 7
    model = load_from_source(source, "t5", device="meta")
    assert_full_model(model, T5_OFFICIAL, torch.bfloat16)  # fp8 files default to bf16


def test_hf_t5_names_rename_to_official_names() -> None:
    for official, entry in T5.items():
        assert formats.hf_t5_to_official(entry["hf_name"]) == official


# ---------------------------------------------------------------------------------------------- configs

def test_configs_derived_from_full_shapes_equal_published_configs() -> None:
    dit = configs.dit_values(DIT)
    published = manifest("wan2.2_ti2v_5b_dit")["config"]
    for name in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim"):
        assert dit[name] == published[name], name
    assert dit["patch_size"] == tuple(published["patch_size"])
    vae, vae_published = configs.vae_values(VAE), manifest("wan2.2_vae")["config"]
    for name in ("dim", "dec_dim", "z_dim", "num_res_blocks"):
        assert vae[name] == vae_published[name], name
    assert list(vae["dim_mult"]) == vae_published["dim_mult"]
    assert list(vae["temperal_downsample"]) == vae_published["temperal_downsample"]
    t5, t5_published = configs.t5_values(T5_OFFICIAL), manifest("umt5_xxl_encoder")["config"]
    for name in ("vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets", "shared_pos"):
        assert t5[name] == t5_published[name], name


# ---------------------------------------------------------------------------------------------- refusals

def diffusers_dit_names(keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The Wan2.2-TI2V-5B-Diffusers transformer names (research note §1.2)."""
    rules = [
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"\.self_attn\.", ".attn1."), (r"\.cross_attn\.", ".attn2."),
        (r"\.attn([12])\.([qkv])\.", r".attn\1.to_\2."), (r"\.attn([12])\.o\.", r".attn\1.to_out.0."),
        (r"\.ffn\.0\.", ".ffn.net.0.proj."), (r"\.ffn\.2\.", ".ffn.net.2."),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"^head\.modulation$", "scale_shift_table"), (r"^head\.head\.", "proj_out."),
    ]
    out = {}
    for k, s in keys.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = s
    return out


def test_diffusers_dit_is_refused_with_the_file_to_use() -> None:
    keys = diffusers_dit_names(DIT)
    assert "scale_shift_table" in keys and "blocks.0.attn1.to_q.weight" in keys
    with pytest.raises(WeightFormatError) as err:
        load_from_source(listing(keys), "dit", device="meta")
    message = str(err.value)
    assert "diffusers layout" in message
    assert "wan2.2_ti2v_5B_fp16.safetensors" in message and "Wan-AI/Wan2.2-TI2V-5B folder" in message


def test_diffusers_vae_is_refused_with_the_file_to_use() -> None:
    keys = {"encoder.conv_in.weight": (160, 12, 3, 3, 3), "quant_conv.weight": (96, 96, 1, 1, 1),
            "decoder.up_blocks.0.resnets.0.conv1.weight": (1024, 1024, 3, 3, 3)}
    expected = r"diffusers layout of the VAE.*wan2\.2_vae\.safetensors.*Wan2\.2_VAE\.pth"
    with pytest.raises(WeightFormatError, match=expected):
        load_from_source(listing(keys), "vae", device="meta")


def test_full_t5_encoder_decoder_is_refused() -> None:
    keys = dict(T5_HF, **{"decoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)})
    with pytest.raises(WeightFormatError, match=r"encoder-decoder.*umt5_xxl_fp16\.safetensors"):
        load_from_source(listing(keys), "t5", device="meta")


def test_unknown_listing_says_what_was_looked_for() -> None:
    keys = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)}
    with pytest.raises(WeightFormatError) as err:
        load_from_source(listing(keys), "dit", device="meta")
    message = str(err.value)
    assert "not a weight file PixelWizard knows" in message and "input_blocks.0.0.weight" in message
    for looked_for in ("head.modulation", "model.diffusion_model.", "dt_embedding", "decoder.middle.0.residual.0.gamma",
                       "encoder.block.N.layer.0.SelfAttention.q.weight"):
        assert looked_for in message


@pytest.mark.parametrize("keys, asked, hint", [
    (VAE, "dit", "holds the Wan2.2 VAE, not the Wan2.2-TI2V-5B DiT"),
    (HR, "dit", "load_hr_dit"),
    (DIT, "hr_dit", "2k/model.pt"),
    (T5_OFFICIAL, "vae", "holds the umT5-XXL text encoder"),
])
def test_wrong_component_is_refused(keys, asked, hint) -> None:
    with pytest.raises(WeightFormatError, match=re.escape(hint)):
        load_from_source(listing(keys), asked, device="meta")


@pytest.mark.parametrize("edit, expected", [
    ("remove", r"1 missing .*blocks\.7\.ffn\.2\.weight \[3072, 14336\]"),
    ("extra", r"1 unexpected .*model\.diffusion_model\.blocks\.7\.extra\.weight \[3\]"),
    ("shape", r"1 with the wrong shape: blocks\.7\.ffn\.2\.weight: file \[3072, 14335\], model \[3072, 14336\]"),
])
def test_full_size_strict_failures_name_keys_and_layout(edit: str, expected: str) -> None:
    keys = {"model.diffusion_model." + k: s for k, s in DIT.items()}
    target = "model.diffusion_model.blocks.7.ffn.2.weight"
    if edit == "remove":
        del keys[target]
    elif edit == "extra":
        keys["model.diffusion_model.blocks.7.extra.weight"] = (3,)
    else:
        keys[target] = (3072, 14335)
    with pytest.raises(WeightFormatError, match=expected) as err:
        load_from_source(listing(keys), "dit", device="meta")
    assert "Comfy 'model.diffusion_model.' prefix" in str(err.value)


def test_hr_without_adapter_key_names_it() -> None:
    keys = {k: s for k, s in HR.items() if k != "model.spatial_adapter.backbone.3.weight"}
    expected = r"missing .*spatial_adapter\.backbone\.3\.weight \[3072, 768, 3, 3, 3\]"
    with pytest.raises(WeightFormatError, match=expected):
        load_from_source(listing(keys), "hr_dit", device="meta")


def test_fragments_and_prefixes() -> None:
    wrapped = "model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.x"
    assert formats.strip_fragments(wrapped) == "model.blocks.0.x"
    assert formats.strip_fragments("_orig_mod.head.head.weight") == "head.head.weight"
    assert formats.common_prefix(["model.diffusion_model.a", "model.diffusion_model.b"]) == "model.diffusion_model."
    assert formats.common_prefix(["model.a", "model.b"]) == "model."
    assert formats.common_prefix(["model.a", "b"]) == ""


def test_wan21_vae_and_t5_v11_are_refused_by_name() -> None:
    wan21_vae = {"encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3),
                 "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1)}
    with pytest.raises(WeightFormatError, match=r"Wan2\.1 VAE.*wan2\.2_vae\.safetensors"):
        load_from_source(listing(wan21_vae), "vae", device="meta")
    t5_v11 = {k: s for k, s in T5_HF.items() if "relative_attention_bias" not in k or ".block.0." in k}
    with pytest.raises(WeightFormatError, match=r"T5 v1\.1 encoder.*not umT5-XXL.*umt5_xxl_fp16\.safetensors"):
        load_from_source(listing(t5_v11), "t5", device="meta")


def test_other_wan_sizes_load_with_a_warning(caplog) -> None:
    wider = {3072: 5120, 18432: 6 * 5120}  # a 14B-wide DiT, cut to two blocks
    wan21_14b = {k: tuple(wider.get(d, d) for d in s) for k, s in DIT.items()
                 if not re.match(r"blocks\.([2-9]|[12]\d)\.", k)}
    with caplog.at_level("WARNING", logger="pixelwizard"):
        model = load_from_source(listing(wan21_14b), "dit", device="meta")
    assert model.config.dim == 5120 and model.config.num_heads == 40 and model.config.num_layers == 2
    assert "not the size of the published Wan2.2-TI2V-5B model: dim 5120 (published 3072)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pixelwizard"):
        load_from_source(listing(DIT), "dit", device="meta")
    assert "published" not in caplog.text
