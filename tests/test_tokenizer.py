"""umT5 tokenizer: cleaning, both backends on one SentencePiece model trained here, truncation and
padding, missing files, and prompt -> context end to end through a Comfy-style safetensors file."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pixelwizard_core.errors import MissingFileError, WeightFormatError
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


# ----- a small umT5-like SentencePiece model --------------------------------------------------------
@pytest.fixture(scope="module")
def spiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syllables = "ka ri to ne su mo la vi de an el or us im pa qu ex th sh ch ing ion er st".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += "café naïve 東京 夜 雨 Москва the quick brown fox".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=300,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>",
        bos_piece="<s>", unk_piece="<unk>", normalization_rule_name="identity", character_coverage=1.0,
        minloglevel=2, num_threads=1)
    return folder / "spiece.model"


def write_tokenizer_json(spiece: Path, out: Path) -> Path:
    """Convert the SentencePiece model to a tokenizer.json laid out like the published umT5 one.

    Done with the `tokenizers` package only (transformers' converter needs protobuf): Unigram with the
    pieces and scores, unk id 3, a normalizer collapsing runs of spaces, Metaspace, template "$A </s>".
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(out))
    return out


# ----- backends ---------------------------------------------------------------------------------------
def test_backends_give_the_same_ids(spiece: Path, tmp_path: Path) -> None:
    by_file = UMT5Tokenizer.from_spiece_file(spiece, max_length=64)
    by_bytes = UMT5Tokenizer.from_spiece_bytes(spiece.read_bytes(), max_length=64)
    by_tensor = UMT5Tokenizer.from_spiece_bytes(torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8), 64)
    by_json = UMT5Tokenizer.from_tokenizer_json(write_tokenizer_json(spiece, tmp_path / "tokenizer.json"), 64)
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
    json_tok = UMT5Tokenizer.from_tokenizer_json(write_tokenizer_json(spiece, tmp_path / "tokenizer.json"), 16)
    for tok in (UMT5Tokenizer.from_spiece_file(spiece, max_length=16), json_tok):
        full = tok.encode([long_prompt])[0]
        assert len(full) > 16
        ids, mask = tok([long_prompt, "kari"])
        assert ids.shape == (2, 16)
        assert ids[0].tolist() == full[:15] + [1]  # first max_length - 1 pieces, then </s>
        assert bool(mask[0].all()) and int(mask[1].sum()) == len(tok.encode(["kari"])[0]) + 1


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
    write_tokenizer_json(spiece, sub / "tokenizer.json")
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


# ----- end to end: Comfy-style file -> tokenizer + tiny encoder -> DiT context -------------------------
def hf_to_official(key: str) -> str:
    """Hugging Face / Comfy umT5 name -> official name (local stand-in for the loader's mapping)."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.layer\.(\d)\.(.+)", key)
    assert m, key
    n, layer, rest = m.groups()
    table = {
        "layer_norm.weight": "norm1.weight" if layer == "0" else "norm2.weight",
        "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    if rest.startswith("SelfAttention.") and rest != "SelfAttention.relative_attention_bias.weight":
        return f"blocks.{n}.attn.{rest.split('.')[1]}.weight"
    return f"blocks.{n}.{table[rest]}"


def test_prompt_to_context_through_comfy_style_file(spiece: Path, tmp_path: Path) -> None:
    cfg = T5Config.tiny()
    manifest = json.loads((Path(__file__).parent / "manifests" / "umt5_xxl_encoder.json").read_text())
    to_hf = {k: v["hf_name"] for k, v in manifest["keys"].items()}
    source = UMT5Encoder(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in source.state_dict().items():
        tensors[to_hf[name]] = torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0)
    tensors["spiece_model"] = torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8)
    path = tmp_path / "umt5_tiny.safetensors"
    save_file(tensors, str(path))

    with safe_open(str(path), framework="pt") as f:
        weights = {hf_to_official(k): f.get_tensor(k) for k in f.keys() if k != "spiece_model"}
        tokenizer = UMT5Tokenizer.from_spiece_bytes(f.get_tensor("spiece_model"))
    assert tokenizer.vocab_size <= cfg.vocab
    model = UMT5Encoder(cfg).eval()
    model.load_state_dict(weights, strict=True)

    prompt = "A neon street at night, rain, the camera slowly moves forward"
    ids, mask = tokenizer([prompt])
    n = len(tokenizer.encode([prompt])[0]) + 1
    assert ids[0, n - 1] == 1 and not ids[0, n:].any()
    assert int(mask.sum()) == n
    with torch.no_grad():
        context = context_for_dit(model(ids, mask), mask, cfg.text_len)
    assert context.shape == (1, 512, cfg.dim)
    assert bool(context[0, :n].abs().sum(-1).gt(0).all()) and not context[0, n:].any()
    # Same file through the helper that reads only the tokenizer tensor.
    assert torch.equal(UMT5Tokenizer.from_text_encoder_file(path)([prompt])[0], ids)


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
