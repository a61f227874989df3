"""Real small files in every container and layout, loaded end to end through the public API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import manifest
from safetensors.torch import save_file

from pixelwizard_core.errors import ConfigError, MissingFileError, UnsafeCheckpointError, WeightFormatError
from pixelwizard_core.loading import (
    inspect_folder, inspect_weights, load_dit, load_hr_dit, load_t5, load_t5_tokenizer, load_vae,
)
from pixelwizard_core.loading import load as load_module
from pixelwizard_core.loading.convert import main as convert_main
from pixelwizard_core.loading.fp8 import dequantize
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.hr import WanHRDiT
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder
from pixelwizard_core.models.vae import VAEConfig, WanVAE

TINY_DIT = DiTConfig.tiny(dim=128, num_heads=1, text_len=512)  # Wan head width 128; text_len is no shape
FSDP = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
HF_OF_BLOCK0 = {k: v["hf_name"] for k, v in manifest("umt5_xxl_encoder")["keys"].items()}


def random_state(model_cls, config, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every key of a small model (no zero-initialised tensors, so swaps show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_cls(config).state_dict().items()}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def dit_sd() -> dict[str, torch.Tensor]:
    return random_state(WanDiT, TINY_DIT, 0)


@pytest.fixture(scope="module")
def hr_sd() -> dict[str, torch.Tensor]:
    return random_state(WanHRDiT, TINY_DIT, 1)


@pytest.fixture(scope="module")
def t5_sd() -> dict[str, torch.Tensor]:
    return random_state(UMT5Encoder, T5Config.tiny(), 2)


@pytest.fixture(scope="module")
def vae_sd() -> dict[str, torch.Tensor]:
    return random_state(WanVAE, VAEConfig.tiny(), 3)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentencePiece model numbered like umT5 (<pad> 0, </s> 1)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choice("aeioukrtnsml") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    return folder / "spiece.model"


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def with_fsdp(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = "model._orig_mod." + k
        k = k.replace("blocks.", "blocks._fsdp_wrapped_module.", 1)
        k = k.replace(".self_attn.", "._checkpoint_wrapped_module.self_attn.")
        out[k] = v
    return out


def hf_name(official: str) -> str:
    """Official umT5 key -> Hugging Face / Comfy name, from the manifest's own table (block 0 as pattern)."""
    if not official.startswith("blocks."):
        return HF_OF_BLOCK0[official]
    block = official.split(".")[1]
    hf = HF_OF_BLOCK0[official.replace(f"blocks.{block}.", "blocks.0.", 1)]
    return hf.replace("block.0.", f"block.{block}.", 1)


def assert_loaded(model: torch.nn.Module, written: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    state = model.state_dict()
    assert set(state) == set(written)
    for key, value in written.items():
        want = value if dtype is None else value.to(dtype)
        assert state[key].dtype == want.dtype, key
        assert torch.equal(state[key], want), key


# ---------------------------------------------------------------------------------------------- safetensors

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_dit_single_safetensors_with_and_without_prefix(tmp_path: Path, dit_sd, prefix: str) -> None:
    path = tmp_path / "wan2.2_ti2v_5B_fp16.safetensors"
    save_file(prefixed(dit_sd, prefix), str(path))
    model = load_dit(path)
    assert isinstance(model, WanDiT) and model.config == TINY_DIT
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_loaded(model, dit_sd)


def write_official_folder(folder: Path, dit_sd, vae_sd=None, t5_sd=None, spiece: Path | None = None) -> None:
    """The Wan-AI/Wan2.2-TI2V-5B layout: three shards + index json, the VAE and T5 pickles, the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dit_sd)
    weight_map = {}
    for i in range(3):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        part = {k: dit_sd[k] for k in keys[i::3]}
        save_file(part, str(folder / shard))
        weight_map.update({k: shard for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    if vae_sd is not None:
        torch.save(vae_sd, folder / "Wan2.2_VAE.pth")
    if t5_sd is not None:
        torch.save({k: v.bfloat16() for k, v in t5_sd.items()}, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    if spiece is not None:
        (folder / "google" / "umt5-xxl").mkdir(parents=True)
        (folder / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece.read_bytes())


def test_official_folder_loads_every_component(tmp_path: Path, dit_sd, vae_sd, t5_sd, spiece, monkeypatch) -> None:
    folder = tmp_path / "Wan2.2-TI2V-5B"
    write_official_folder(folder, dit_sd, vae_sd, t5_sd, spiece)
    import safetensors

    opened: list[str] = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, **kw: opened.append(Path(p).name) or real_open(p, **kw))
    calls: list[tuple[int, int]] = []
    assert_loaded(load_dit(folder, progress=lambda done, total: calls.append((done, total))), dit_sd)
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 3  # shard by shard, each opened once
    assert calls == [(i, len(dit_sd)) for i in range(1, len(dit_sd) + 1)]
    assert_loaded(load_vae(folder), vae_sd)
    t5 = load_t5(folder)
    assert_loaded(t5, {k: v.bfloat16() for k, v in t5_sd.items()})
    tokenizer = load_t5_tokenizer(folder)
    tokenizer_from_pth = load_t5_tokenizer(folder / "models_t5_umt5-xxl-enc-bf16.pth")
    ids, mask = tokenizer(["kara mitos"])
    assert torch.equal(ids, tokenizer_from_pth(["kara mitos"])[0]) and ids[0, int(mask.sum()) - 1] == 1
    report = inspect_folder(folder)
    assert {c: (i.component, i.loadable, i.problem) for c, i in report.items()} == {
        "dit": ("dit", True, None), "vae": ("vae", True, None), "t5": ("t5", True, None)}
    assert report["t5"].has_tokenizer and report["dit"].container == "sharded safetensors"


def test_missing_folder_pieces_say_what_is_expected_where(tmp_path: Path, dit_sd, vae_sd) -> None:
    folder = tmp_path / "Wan2.2-TI2V-5B"
    write_official_folder(folder, dit_sd, vae_sd=None)
    with pytest.raises(MissingFileError) as err:
        load_vae(folder)
    assert "Wan2.2_VAE.pth" in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(MissingFileError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        load_t5(folder)
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"diffusion_pytorch_model-00002-of-00003\.safetensors"):
        load_dit(folder)
    with pytest.raises(MissingFileError, match="google/umt5-xxl"):
        load_t5_tokenizer(folder)
    report = inspect_folder(folder)
    assert "Wan2.2_VAE.pth" in report["vae"].problem and "00002-of-00003" in report["dit"].problem


def test_diffusers_pipeline_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(WeightFormatError, match="diffusers pipeline folder"):
        load_dit(tmp_path)


# ---------------------------------------------------------------------------------------------- pickles

@pytest.mark.parametrize("layout", ["generator", "generator_ema", "bare", "fsdp"])
def test_pixelwizard_lr_pt_layouts(tmp_path: Path, dit_sd, layout: str) -> None:
    sd = prefixed(dit_sd, "model.")
    payload = {"generator": {"generator": sd}, "generator_ema": {"generator_ema": sd, "step": 100},
               "bare": dit_sd, "fsdp": {"generator": with_fsdp(dit_sd)}}[layout]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    assert_loaded(load_dit(path), dit_sd)


def test_lr_prefers_generator_and_ema_on_request(tmp_path: Path, dit_sd) -> None:
    ema = {k: v + 1 for k, v in dit_sd.items()}
    path = tmp_path / "lr" / "model.pt"
    path.parent.mkdir()
    torch.save({"generator": prefixed(dit_sd, "model."), "generator_ema": prefixed(ema, "model.")}, path)
    assert_loaded(load_dit(path), dit_sd)
    assert_loaded(load_dit(path.parent, use_ema=True), ema)  # a folder with model.pt resolves too


def test_hr_checkpoint_generator_ema_and_adapter_dtype(tmp_path: Path, hr_sd, caplog) -> None:
    ema = {k: v * 2 for k, v in hr_sd.items()}
    both, ema_only = tmp_path / "both.pt", tmp_path / "ema_only.pt"
    torch.save({"generator": prefixed(hr_sd, "model."), "generator_ema": prefixed(ema, "model.")}, both)
    torch.save({"generator_ema": prefixed(ema, "model.")}, ema_only)
    model = load_hr_dit(both)
    assert isinstance(model, WanHRDiT)
    assert_loaded(model, hr_sd)
    assert_loaded(load_hr_dit(both, use_ema=True), ema)
    with caplog.at_level(logging.WARNING, logger="pixelwizard"):
        assert_loaded(load_hr_dit(ema_only), ema)
    assert "no 'generator' weights; using 'generator_ema'" in caplog.text
    bf16 = load_hr_dit(both, dtype=torch.bfloat16)  # the injector stays float32, as in the reference
    state = bf16.state_dict()
    assert state["spatial_adapter.zero_layers.1.weight"].dtype == torch.float32
    assert torch.equal(state["spatial_adapter.zero_layers.1.weight"], hr_sd["spatial_adapter.zero_layers.1.weight"])
    assert state["blocks.0.ffn.0.weight"].dtype == torch.bfloat16


def test_hr_missing_adapter_key_fails_and_names_it(tmp_path: Path, hr_sd) -> None:
    sd = {k: v for k, v in prefixed(hr_sd, "model.").items() if k != "model.spatial_adapter.zero_layers.1.bias"}
    torch.save({"generator": sd}, tmp_path / "model.pt")
    with pytest.raises(WeightFormatError, match=r"1 missing .*spatial_adapter\.zero_layers\.1\.bias \[128\]"):
        load_hr_dit(tmp_path / "model.pt")


def test_plain_dit_is_refused_as_hr(tmp_path: Path, dit_sd) -> None:
    torch.save({"generator": prefixed(dit_sd, "model.")}, tmp_path / "model.pt")
    with pytest.raises(WeightFormatError, match=r"no dt_embedding / spatial_adapter.*4k/model\.pt"):
        load_hr_dit(tmp_path / "model.pt")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path: Path, dit_sd) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.pt"
    torch.save({"generator": prefixed(dit_sd, "model."), "payload": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_dit(path)
    message = str(err.value)
    assert "tried to run code" in message and "refused" in message
    assert "python -m pixelwizard_core.loading.convert" in message and "--trust-code" in message
    assert "system" in message  # names what it tried to call
    assert "refused" in inspect_weights(path).problem
    assert not marker.exists()


def test_trusted_pickle_converts_to_safetensors(tmp_path: Path, dit_sd) -> None:
    src, dst = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save({"generator": prefixed(dit_sd, "model."), "args": argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(UnsafeCheckpointError):
        load_dit(src)  # argparse.Namespace is not a plain weight type
    with pytest.raises(ConfigError, match="trust"):
        from pixelwizard_core.loading.convert import convert_pickle_to_safetensors
        convert_pickle_to_safetensors(src, dst, trust_code=False)
    assert convert_main([str(src), str(dst), "--trust-code"]) == 0
    assert_loaded(load_dit(dst), dit_sd)


def test_legacy_torch_format_loads_without_mmap(tmp_path: Path, vae_sd, caplog) -> None:
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(vae_sd, path, _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING, logger="pixelwizard"):
        assert_loaded(load_vae(path), vae_sd)
    assert "legacy torch format" in caplog.text


def test_pickle_tensors_are_copied_out_of_the_mapped_file(tmp_path: Path, vae_sd) -> None:
    path = tmp_path / "vae.pth"
    torch.save(vae_sd, path)
    with load_module.open_weights(path, "vae") as source:
        mapped = source.read("conv2.weight")
        converted = load_module._convert(mapped, mapped.dtype, torch.device("cpu"), copy=True)
        assert torch.equal(converted, mapped)
        assert converted.untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------- strict failures

@pytest.mark.parametrize("edit, expected", [
    ("remove", r"1 missing \(model needs them\): blocks\.1\.cross_attn\.k\.weight \[128, 128\]"),
    ("extra", r"1 unexpected \(model has no such weight\): blocks\.1\.lora_A\.weight \[4, 128\]"),
    ("shape", r"wrong shape: blocks\.1\.ffn\.0\.weight: file \[96, 128\], model \[128, 128\]"),
])
def test_strict_failures_name_the_keys(tmp_path: Path, dit_sd, edit: str, expected: str) -> None:
    sd = dict(dit_sd)
    if edit == "remove":
        del sd["blocks.1.cross_attn.k.weight"]
    elif edit == "extra":
        sd["blocks.1.lora_A.weight"] = torch.zeros(4, 128)
    else:
        sd["blocks.1.ffn.0.weight"] = torch.zeros(96, 128)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(WeightFormatError, match=expected) as err:
        load_dit(tmp_path / "dit.safetensors")
    assert "detected layout: Wan2.2-TI2V-5B DiT, official names" in str(err.value)


def test_diffusers_layout_file_is_refused(tmp_path: Path) -> None:
    sd = {"condition_embedder.time_proj.weight": torch.zeros(6, 2), "scale_shift_table": torch.zeros(1, 2, 2),
          "blocks.0.attn1.to_q.weight": torch.zeros(2, 2), "proj_out.weight": torch.zeros(4, 2)}
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightFormatError, match=r"diffusers layout.*wan2\.2_ti2v_5B_fp16\.safetensors"):
        load_dit(tmp_path / "diffusion_pytorch_model.safetensors")


def test_unknown_files_are_refused(tmp_path: Path) -> None:
    save_file({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    expected = r"not a weight file PixelWizard knows.*bar\.bias.*Looked for the Wan2\.2 DiT"
    with pytest.raises(WeightFormatError, match=expected):
        load_dit(tmp_path / "x.safetensors")
    (tmp_path / "notes.safetensors").write_text("hello, not weights")
    with pytest.raises(WeightFormatError, match="not a weight file PixelWizard can read"):
        load_dit(tmp_path / "notes.safetensors")
    with pytest.raises(MissingFileError, match="does not exist"):
        load_dit(tmp_path / "absent.safetensors")


def test_truncated_safetensors_is_refused(tmp_path: Path, dit_sd) -> None:
    path = tmp_path / "dit.safetensors"
    save_file(dit_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightFormatError, match="truncated"):
        load_dit(path)


def test_non_wan_width_needs_num_heads(tmp_path: Path) -> None:
    config = DiTConfig.tiny(text_len=512)  # dim 64: the head count cannot come from 128-wide heads
    sd = random_state(WanDiT, config, 4)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(WeightFormatError, match=r"config_overrides=\{'num_heads': N\}"):
        load_dit(tmp_path / "dit.safetensors")
    model = load_dit(tmp_path / "dit.safetensors", config_overrides={"num_heads": 4})
    assert model.config == config
    assert_loaded(model, sd)


def test_text_len_recorded_in_the_metadata(tmp_path: Path, dit_sd) -> None:
    """A config field no shape shows (the toy world's 16-row text window) comes from the file's metadata;
    a file that records none gets Wan's 512, a bad value is refused by name."""
    save_file(dit_sd, str(tmp_path / "plain.safetensors"))
    save_file(dit_sd, str(tmp_path / "short.safetensors"), metadata={"text_len": "16"})
    save_file(dit_sd, str(tmp_path / "bad.safetensors"), metadata={"text_len": "sixteen"})
    assert load_dit(tmp_path / "plain.safetensors").config.text_len == TINY_DIT.text_len
    short = load_dit(tmp_path / "short.safetensors")
    assert short.config.text_len == 16
    assert_loaded(short, dit_sd)
    assert load_dit(tmp_path / "short.safetensors", config_overrides={"text_len": 20}).config.text_len == 20
    with pytest.raises(WeightFormatError, match="text_len = 'sixteen'"):
        load_dit(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- dtype, device

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "fp16", "bf16", torch.float32])
def test_target_dtype(tmp_path: Path, dit_sd, dtype) -> None:
    save_file(dit_sd, str(tmp_path / "dit.safetensors"))
    model = load_dit(tmp_path / "dit.safetensors", dtype=dtype)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)
    assert_loaded(model, dit_sd, want)


def test_none_dtype_keeps_the_file_dtype(tmp_path: Path, vae_sd) -> None:
    half = {k: v.half() for k, v in vae_sd.items()}
    save_file(half, str(tmp_path / "wan2.2_vae.safetensors"))
    assert_loaded(load_vae(tmp_path / "wan2.2_vae.safetensors"), half)


def test_bad_dtype_and_device_fail_early(tmp_path: Path, dit_sd) -> None:
    save_file(dit_sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(ConfigError, match="bf16, fp16 or fp32"):
        load_dit(tmp_path / "dit.safetensors", dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_dit(tmp_path / "dit.safetensors", device="cuda")


def test_meta_device_is_a_dry_run_that_reads_no_data(tmp_path: Path, dit_sd, monkeypatch) -> None:
    save_file(dit_sd, str(tmp_path / "dit.safetensors"))

    def no_read(self, key):
        raise AssertionError("a meta-device load must not read tensor data")

    from pixelwizard_core.loading.readers import SafetensorsSource

    monkeypatch.setattr(SafetensorsSource, "read", no_read)
    model = load_dit(tmp_path / "dit.safetensors", device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(tmp_path: Path, dit_sd) -> None:
    save_file(dit_sd, str(tmp_path / "dit.safetensors"))
    model = load_dit(tmp_path / "dit.safetensors", dtype=torch.bfloat16, device="cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert torch.equal(model.state_dict()["head.head.weight"].cpu(), dit_sd["head.head.weight"].bfloat16())


def test_non_persistent_buffers_hook_and_leftover_check(tmp_path: Path, dit_sd, monkeypatch) -> None:
    class WithTable(WanDiT):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

        def reset_non_persistent_buffers(self):
            self.table = torch.arange(4.0, device=self.head.head.weight.device)

    class WithoutHook(WanDiT):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    save_file(dit_sd, str(tmp_path / "dit.safetensors"))
    monkeypatch.setattr(load_module, "model_classes", lambda component: (DiTConfig, WithTable))
    assert torch.equal(load_dit(tmp_path / "dit.safetensors").table, torch.arange(4.0))
    monkeypatch.setattr(load_module, "model_classes", lambda component: (DiTConfig, WithoutHook))
    with pytest.raises(RuntimeError, match=r"meta device after loading: table.*reset_non_persistent_buffers"):
        load_dit(tmp_path / "dit.safetensors")


# ---------------------------------------------------------------------------------------------- umT5, fp8

def hf_state(t5_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {hf_name(k): v for k, v in t5_sd.items()}


def spiece_tensor(spiece: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8)


def test_t5_comfy_fp16_with_tokenizer(tmp_path: Path, t5_sd, spiece) -> None:
    import sentencepiece as spm

    half = {k: v.half() for k, v in t5_sd.items()}
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    tied_copy = {"encoder.embed_tokens.weight": half["token_embedding.weight"].clone()}  # HF saves it too at times
    save_file(dict(hf_state(half), spiece_model=spiece_tensor(spiece), **tied_copy), str(path))
    assert_loaded(load_t5(path), half)
    tokenizer = load_t5_tokenizer(path)
    ids, mask = tokenizer(["kara mitos nel"])
    pieces = spm.SentencePieceProcessor(model_file=str(spiece)).encode("kara mitos nel")
    assert ids[0, : len(pieces) + 1].tolist() == pieces + [1] and int(mask.sum()) == len(pieces) + 1


LINEAR = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "SelfAttention.o.", "wi_0.", "wi_1.", "wo.")


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max() / 448.0).float()
    return (w / scale).to(torch.float8_e4m3fn), scale


def fp8_file(tmp_path: Path, t5_sd, spiece, *, form: str, input_scale: float = 1.0) -> tuple[Path, dict, dict]:
    sd, fp8, scales = {}, {}, {}
    metadata = None
    layers = {}
    for name, value in hf_state({k: v.half() for k, v in t5_sd.items()}).items():
        if any(p in name for p in LINEAR):
            q, s = quantise(value.float())
            layer = name.removesuffix(".weight")
            sd[name] = q
            fp8[name], scales[name] = q, s
            if form == "scaled_fp8":
                sd[layer + ".scale_weight"] = s
                sd[layer + ".scale_input"] = torch.tensor(input_scale)
            else:
                sd[layer + ".weight_scale"] = s
                layers[layer] = {"format": "float8_e4m3fn"}
        else:
            sd[name] = value
    if form == "scaled_fp8":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    sd["spiece_model"] = spiece_tensor(spiece)
    path = tmp_path / f"umt5_{form}.safetensors"
    save_file(sd, str(path), metadata=metadata)
    return path, fp8, scales


@pytest.mark.parametrize("form", ["scaled_fp8", "quantization_metadata"])
def test_t5_fp8_scaled_dequantises(tmp_path: Path, t5_sd, spiece, form: str) -> None:
    path, fp8, scales = fp8_file(tmp_path, t5_sd, spiece, form=form)
    model = load_t5(path, dtype=torch.float32)
    state = model.state_dict()
    from pixelwizard_core.loading.formats import hf_t5_to_official

    assert len(fp8) == 7 * T5Config.tiny().num_layers
    for name, q in fp8.items():
        got = state[hf_t5_to_official(name)]
        assert torch.equal(got, q.float() * scales[name])  # exactly fp8 x scale
        original = t5_sd[hf_t5_to_official(name)].half().float()
        # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values, plus the subnormal step
        bound = original.abs() * 2.0**-4 + scales[name] * 2.0**-9
        assert torch.all((got - original).abs() <= bound)
        assert (got - original).abs().max() > 0  # it really went through fp8
    assert torch.equal(state["norm.weight"], t5_sd["norm.weight"].half().float())
    default = load_t5(path)
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}  # fp8 files default to bf16
    assert load_t5_tokenizer(path).vocab_size == 200


def test_fp8_input_scale_not_one_warns(tmp_path: Path, t5_sd, spiece, caplog) -> None:
    path, _, _ = fp8_file(tmp_path, t5_sd, spiece, form="scaled_fp8", input_scale=2.0)
    with caplog.at_level(logging.WARNING, logger="pixelwizard"):
        load_t5(path, device="meta")
    assert "scale_input" in caplog.text and "ignored" in caplog.text
    caplog.clear()
    path, _, _ = fp8_file(tmp_path, t5_sd, spiece, form="scaled_fp8", input_scale=1.0)
    with caplog.at_level(logging.WARNING, logger="pixelwizard"):
        load_t5(path, device="meta")
    assert "scale_input" not in caplog.text


def test_unsupported_quantisation_is_refused(tmp_path: Path, t5_sd) -> None:
    sd = hf_state({k: v.half() for k, v in t5_sd.items()})
    layer = "encoder.block.0.layer.0.SelfAttention.q"
    sd[layer + ".weight_scale"] = torch.ones(1)
    meta = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "int8_blockwise", "group_size": 128}}})}
    save_file(sd, str(tmp_path / "t5.safetensors"), metadata=meta)
    with pytest.raises(WeightFormatError, match=r"'int8_blockwise'.*float8_e4m3fn"):
        load_t5(tmp_path / "t5.safetensors")


def test_dequantize_in_row_blocks_matches_whole_tensor(monkeypatch) -> None:
    from pixelwizard_core.loading import fp8 as fp8_module

    w = torch.randn(37, 11)
    q, s = quantise(w)
    whole = (q.float() * s).bfloat16()
    monkeypatch.setattr(fp8_module, "_CHUNK_ELEMENTS", 50)  # several row blocks
    assert torch.equal(dequantize(q, s, torch.bfloat16), whole)
    rows = torch.rand(37) + 0.5
    assert torch.equal(dequantize(q, rows, torch.float32), q.float() * rows[:, None])


# ---------------------------------------------------------------------------------------------- VAE, inspect

def test_vae_official_pth_and_comfy_safetensors(tmp_path: Path, vae_sd) -> None:
    torch.save(vae_sd, tmp_path / "Wan2.2_VAE.pth")
    model = load_vae(tmp_path / "Wan2.2_VAE.pth")
    assert isinstance(model, WanVAE) and model.config == VAEConfig.tiny()
    assert_loaded(model, vae_sd)
    save_file({k: v.half() for k, v in vae_sd.items()}, str(tmp_path / "wan2.2_vae.safetensors"))
    assert_loaded(load_vae(tmp_path / "wan2.2_vae.safetensors", dtype=torch.float32),
                  {k: v.half().float() for k, v in vae_sd.items()})


def test_inspect_weights_describes_without_loading(tmp_path: Path, hr_sd, dit_sd) -> None:
    torch.save({"generator": prefixed(hr_sd, "model."), "generator_ema": prefixed(hr_sd, "model.")},
               tmp_path / "model.pt")
    info = inspect_weights(tmp_path / "model.pt")
    assert info.component == "hr_dit" and info.problem is None and info.loadable is True
    assert info.sections == ["generator", "generator_ema"] and info.section == "generator"
    assert info.tensor_count == len(hr_sd) and info.dtypes == {"float32": len(hr_sd)}
    assert info.parameter_count == sum(v.numel() for v in hr_sd.values())
    assert info.published_size is False and info.config["dim"] == 128
    assert "PixelWizard 'model.' prefix" in info.layout and f"{len(hr_sd)} tensors" in info.summary()
    save_file({k: v for k, v in dit_sd.items() if k != "head.modulation"}, str(tmp_path / "dit.safetensors"))
    broken = inspect_weights(tmp_path / "dit.safetensors")
    assert broken.component == "dit" and broken.loadable is False and "head.modulation" in broken.problem
