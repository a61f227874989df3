"""umT5 tokenizer: cleaning, both backends on one small SentencePiece model (tests/spm_support.py),
truncation and padding, missing files, and prompt -> context end to end through a Comfy-style
safetensors file read by load_t5 / load_t5_tokenizer (fp16-like and fp8 scaled)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import manifest
from safetensors.torch import save_file
from spm_support import train_umt5_like_spm, write_umt5_tokenizer_json

from pixelwizard_core.errors import MissingFileError, WeightFormatError
from pixelwizard_core.loading import load_t5, load_t5_tokenizer
from pixelwizard_core.loading.tokenizer import UMT5Tokenizer, clean_text
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder, context_for_dit

PROMPTS = [
    "kari tone mo la",
    "Kari TONE & zzz xyzzy café 東京 夜 雨 Москва",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "",
]


# ----- cleaning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("  a  cat\t\ton a\n\nmat  ", "a cat on a mat"),
    ("fish &amp;amp; chips &lt;b&gt;", "fish & chips <b>"),  # unescaped twice
    ("caf\u00c3\u00a9 na\u00c3\u00afve", "café naïve"),  # UTF-8 read as Latin-1
    ("wide\u3000space\u00a0nbsp\u2009thin", "wide space nbsp thin"),
    ("sep\x1c\x1fchars", "sepchars"),
    ("\u201csmart\u201d quotes", '"smart" quotes'),
    ("zero\u200bwidth stays", "zero\u200bwidth stays"),  # not whitespace for the official cleaner
    ("", ""),
])
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


# ----- a small umT5-like SentencePiece model (tests/spm_support.py) ----------------------------------
@pytest.fixture(scope="module")
def spiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_umt5_like_spm(tmp_path_factory.mktemp("spm"))


# ----- backends ---------------------------------------------------------------------------------------
def test_backends_give_the_same_ids(spiece: Path, tmp_path: Path) -> None:
    by_file = UMT5Tokenizer.from_spiece_file(spiece, max_length=64)
    by_bytes = UMT5Tokenizer.from_spiece_bytes(spiece.read_bytes(), max_length=64)
    by_tensor = UMT5Tokenizer.from_spiece_bytes(torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8), 64)
    by_json = UMT5Tokenizer.from_tokenizer_json(write_umt5_tokenizer_json(spiece, tmp_path / "tokenizer.json"), 64)
    ids, mask = by_file(PROMPTS)
    pieces = by_file.encode(PROMPTS)
    assert any(3 in p for p in pieces)  # unknown characters are exercised
    assert len(set(pieces[0])) > 3
    for other in (by_bytes, by_tensor, by_json):
        o_ids, o_mask = other(PROMPTS)
        assert torch.equal(o_ids, ids) and torch.equal(o_mask, mask)


def test_padding_and_eos(spiece: Path) -> None:
    tok = UMT5Tokenizer.from_spiece_file(spiece)
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 512) and ids.dtype == torch.int64
    for row, pieces in enumerate(tok.encode(PROMPTS)):
        n = len(pieces) + 1
        assert int(mask[row].sum()) == n and bool(mask[row, :n].all())
        assert ids[row, :n].tolist() == pieces + [1]
        assert not ids[row, n:].any()
    assert ids[4, 0] == 1 and mask[4].sum() == 1  # an empty prompt is just </s>


def test_truncation_keeps_eos_like_hf(spiece: Path, tmp_path: Path) -> None:
    long_prompt = "kari tone mo la vi de an el " * 40
    json_tok = UMT5Tokenizer.from_tokenizer_json(write_umt5_tokenizer_json(spiece, tmp_path / "tokenizer.json"), 16)
    for tok in (UMT5Tokenizer.from_spiece_file(spiece, max_length=16), json_tok):
        full = tok.encode([long_prompt])[0]
        assert len(full) > 16
        ids, mask = tok([long_prompt, "kari"])
        assert ids.shape == (2, 16)
        assert ids[0].tolist() == full[:15] + [1]  # first max_length - 1 pieces, then </s>
        assert bool(mask[0].all()) and int(mask[1].sum()) == len(tok.encode(["kari"])[0]) + 1


def test_tokenizer_json_may_set_its_own_length(spiece: Path, tmp_path: Path) -> None:
    """A tokenizer.json with truncation (the toy world's) sets the length; without, Wan's 512; an
    explicit length wins over both."""
    import json

    path = write_umt5_tokenizer_json(spiece, tmp_path / "tokenizer.json")
    assert UMT5Tokenizer.from_tokenizer_json(path).max_length == 512
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["truncation"] = {"direction": "Right", "max_length": 24, "strategy": "LongestFirst", "stride": 0}
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert UMT5Tokenizer.from_folder(tmp_path).max_length == 24
    assert load_t5_tokenizer(tmp_path).max_length == 24
    assert UMT5Tokenizer.from_tokenizer_json(path, 40).max_length == 40
    assert tuple(UMT5Tokenizer.from_folder(tmp_path)(["kari"])[0].shape) == (1, 24)


def test_exactly_full_prompt_is_not_cut(spiece: Path) -> None:
    tok = UMT5Tokenizer.from_spiece_file(spiece, max_length=512)
    pieces = tok.encode(["kari tone mo la vi de an el " * 40])[0]
    fit = UMT5Tokenizer.from_spiece_file(spiece, max_length=len(pieces) + 1)
    ids, mask = fit(["kari tone mo la vi de an el " * 40])
    assert ids[0].tolist() == pieces + [1] and bool(mask.all())


def test_raw_whitespace_is_cleaned_before_tokenizing(spiece: Path) -> None:
    tok = UMT5Tokenizer.from_spiece_file(spiece, max_length=32)
    a, _ = tok(["  kari \n\t tone &amp;amp; mo  "])
    b, _ = tok(["kari tone & mo"])
    assert torch.equal(a, b)


# ----- files and errors -------------------------------------------------------------------------------
def test_folder_lookup_and_preference(spiece: Path, tmp_path: Path) -> None:
    sub = tmp_path / "Wan2.2-TI2V-5B" / "google" / "umt5-xxl"
    sub.mkdir(parents=True)
    (sub / "spiece.model").write_bytes(spiece.read_bytes())
    assert UMT5Tokenizer.from_folder(tmp_path / "Wan2.2-TI2V-5B").source.endswith("spiece.model")
    write_umt5_tokenizer_json(spiece, sub / "tokenizer.json")
    tok = UMT5Tokenizer.from_folder(sub)
    assert tok.source.endswith("tokenizer.json")  # the file the official AutoTokenizer reads


def test_missing_tokenizer_says_what_to_provide(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as info:
        UMT5Tokenizer.from_folder(tmp_path)
    message = str(info.value)
    for needed in ("tokenizer.json", "spiece.model", "google/umt5-xxl", "Wan2.2-TI2V-5B", "spiece_model",
                   str(tmp_path)):
        assert needed in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingFileError, match="does not exist"):
        UMT5Tokenizer.from_spiece_file(tmp_path / "nope.model")


def test_text_encoder_file_without_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "te.safetensors"
    save_file({"shared.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(MissingFileError, match="spiece_model"):
        UMT5Tokenizer.from_text_encoder_file(path)


def test_corrupt_or_foreign_models_are_refused(spiece: Path) -> None:
    with pytest.raises(WeightFormatError, match="SentencePiece"):
        UMT5Tokenizer.from_spiece_bytes(b"not a model")
    with pytest.raises(WeightFormatError, match="uint8"):
        UMT5Tokenizer.from_spiece_bytes(torch.zeros(4, dtype=torch.float32))


# ----- end to end: Comfy-style file -> loader -> tokenizer + tiny encoder -> DiT context ---------------
PROMPT = "A neon street at night, rain, the camera slowly moves forward"
LINEAR_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def tiny_umt5_weights(cfg: T5Config) -> dict[str, torch.Tensor]:
    """Seeded weights in the official names, scaled as T5 initialises them.

    Matrices get std 1/sqrt(fan_in), q also 1/sqrt(head width) because T5 attention does not divide the
    logits by it: with O(1) logits the softmax is not saturated, which would amplify any weight error
    several fold. Norm weights near 1, not equal to it, so they matter.
    """
    gen = torch.Generator().manual_seed(0)
    head = cfg.dim_attn // cfg.num_heads
    weights = {}
    for name, p in UMT5Encoder(cfg).state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1:
            weights[name] = 1.0 + 0.2 * noise
        elif name == "token_embedding.weight" or "pos_embedding" in name:
            weights[name] = noise
        else:
            weights[name] = noise / (p.shape[1] * (head if ".attn.q." in name else 1)) ** 0.5
    return weights


def write_comfy_umt5(path: Path, weights: dict[str, torch.Tensor], spiece: Path,
                     fp8: bool = False) -> dict[str, torch.Tensor]:
    """Write a Comfy-Org style text encoder file: Hugging Face key names, the tokenizer as ``spiece_model``.

    ``fp8``: the Linear weights as float8_e4m3fn times a per-tensor ``scale_weight`` (amax / 448, the
    largest finite e4m3fn value) plus the ``scaled_fp8`` marker, as in umt5_xxl_fp8_e4m3fn_scaled.
    Returns the weights the file holds, dequantised (fp8 x scale), in the official names.
    """
    hf_of = {k: v["hf_name"] for k, v in manifest("umt5_xxl_encoder")["keys"].items()}
    tensors = {"spiece_model": torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8)}
    held = dict(weights)
    for name, value in weights.items():
        key = hf_of[name]
        tensors[key] = value
        if fp8 and key.endswith(LINEAR_WEIGHTS):
            scale = value.abs().max() / 448.0
            tensors[key] = (value / scale).to(torch.float8_e4m3fn)
            tensors[key.removesuffix("weight") + "scale_weight"] = scale
            held[name] = tensors[key].float() * scale
    if fp8:
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(path))
    return held


def direct_encoder(cfg: T5Config, weights: dict[str, torch.Tensor]) -> UMT5Encoder:
    model = UMT5Encoder(cfg).eval()
    model.load_state_dict(weights, strict=True)
    return model


def test_prompt_to_context_through_comfy_style_file(spiece: Path, tmp_path: Path) -> None:
    cfg = T5Config.tiny()
    weights = tiny_umt5_weights(cfg)
    path = tmp_path / "umt5_tiny.safetensors"
    write_comfy_umt5(path, weights, spiece)
    tokenizer = load_t5_tokenizer(path)
    model = load_t5(path)
    assert isinstance(model, UMT5Encoder) and model.cfg == cfg
    assert tokenizer.vocab_size <= cfg.vocab

    ids, mask = tokenizer([PROMPT])
    n = len(tokenizer.encode([PROMPT])[0]) + 1
    assert ids[0, n - 1] == 1 and not ids[0, n:].any()
    assert int(mask.sum()) == n
    with torch.no_grad():
        hidden = model(ids, mask)
        assert torch.equal(hidden, direct_encoder(cfg, weights)(ids, mask))  # every key renamed right
    context = context_for_dit(hidden, mask, cfg.text_len)
    assert context.shape == (1, 512, cfg.dim)
    assert bool(context[0, :n].abs().sum(-1).gt(0).all()) and not context[0, n:].any()
    # Same file through the helper that reads only the tokenizer tensor.
    assert torch.equal(UMT5Tokenizer.from_text_encoder_file(path)([PROMPT])[0], ids)


def test_fp8_scaled_comfy_file_encodes_close_to_unquantised(spiece: Path, tmp_path: Path) -> None:
    cfg = T5Config.tiny()
    weights = tiny_umt5_weights(cfg)
    path = tmp_path / "umt5_tiny_fp8_scaled.safetensors"
    held = write_comfy_umt5(path, weights, spiece, fp8=True)
    ids, mask = load_t5_tokenizer(path)([PROMPT])
    n = int(mask.sum())
    with torch.no_grad():
        unquantised = direct_encoder(cfg, weights)(ids, mask)
        hidden = load_t5(path, dtype=torch.float32)(ids, mask)
        assert torch.equal(hidden, direct_encoder(cfg, held)(ids, mask))  # exactly fp8 x scale, no other loss
        default = load_t5(path)(ids, mask)  # fp8 files load as bf16 unless told otherwise
    assert default.dtype == torch.bfloat16
    # e4m3fn rounding leaves each weight ~2.6% off (RMS, 3 mantissa bits); a block adds the errors of up
    # to three quantised matrices, so the output is ~5% off (Frobenius): 4.9% here, 3.9-5.9% over 8 seeds
    # x 3 prompts, fp32 or bf16. Bounds: above 2% (bf16 rounding alone gives 0.8-1.0%), so the weights
    # really went through fp8; below 8%, while one matrix at twice its scale gives 30-44%.
    want = unquantised[0, :n]
    for got in (hidden, default.float()):
        err = float((got[0, :n] - want).norm() / want.norm())
        assert 0.02 < err < 0.08, err
    context = context_for_dit(hidden, mask, cfg.text_len)
    assert context.shape == (1, 512, cfg.dim) and not context[0, n:].any()


# ----- the real umT5 tokenizer, when a user or CI points at one (never downloaded) ------------------------
REAL = os.environ.get("PIXELWIZARD_UMT5_TOKENIZER")


@pytest.mark.skipif(not REAL, reason="set PIXELWIZARD_UMT5_TOKENIZER to a google/umt5-xxl folder, "
                                     "tokenizer.json, spiece.model or Comfy-Org umt5 safetensors file")
def test_real_umt5_tokenizer_known_ids() -> None:
    path = Path(REAL)
    if path.is_dir():
        tok = UMT5Tokenizer.from_folder(path)
    elif path.suffix == ".json":
        tok = UMT5Tokenizer.from_tokenizer_json(path)
    elif path.suffix == ".safetensors":
        tok = UMT5Tokenizer.from_text_encoder_file(path)
    else:
        tok = UMT5Tokenizer.from_spiece_file(path)
    ids, mask = tok(["Wikipedia is a", "Two anthropomorphic cats in comfy boxing gear and bright gloves "
                     "fight intensely on a spotlighted stage."])
    assert ids[0, :4].tolist() == [14164, 339, 289, 1]  # umT5 ids published in transformers PR #22626
    assert mask.sum(1).tolist() == [4, 28]  # Wan's example prompt: 27 pieces + </s>
