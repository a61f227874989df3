"""Parity of our umT5 encoder, prompt cleaning and tokenizer with the official Wan2.2 code.

Run with the reference environment (official code + transformers):

    /work/refvenv/bin/python tools/parity/t5.py --wan-repo /work/ref/wan22

What it does:
1. Builds the official ``T5Encoder`` at a small umT5-like config (per-layer relative position tables,
   gated GELU, dim_attn != dim), gives it seeded random weights, and runs it and our ``UMT5Encoder`` on
   the same ids and mask (three prompts of different lengths, padded; the length 160 exceeds the bucket
   max distance 128 so every bucket kind is used) in float32. Prints the relative error
   max|ours - theirs| / max|theirs|. Also reports (no fixture) the shared-position variant and a
   bfloat16 run (bit-identical or not).
2. Compares our relative-position buckets with the official bucket function for distances -1100..1100.
3. Compares our ``clean_text`` with the official 'whitespace' cleaning on tricky strings.
4. Trains a tiny SentencePiece unigram model, writes it as spiece.model and as a tokenizer.json laid
   out like the umT5 one (Unigram, unk 3, Replace "  +" -> " ", Metaspace, template "$A </s>"), and
   compares the official ``HuggingfaceTokenizer`` (AutoTokenizer on that folder, padding to max_length,
   truncation) with our tokenizer on both backends, including prompts longer than max_length.
5. Writes tests/fixtures/parity_t5.safetensors: the weights (official names = ours), ids, mask, the
   official hidden states and the official buckets; the config is in the header metadata.

Patches needed on a CPU-only machine: the official t5.py evaluates ``torch.cuda.current_device()`` as a
default argument at import time; it is replaced by ``lambda: 0`` while the module is imported.
Nothing else in the official encoder needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # spm_support: the small SentencePiece model the tests train too

from official import official_module, relative_error  # noqa: E402
from spm_support import train_umt5_like_spm, write_umt5_tokenizer_json  # noqa: E402

from pixelwizard_core.loading.tokenizer import UMT5Tokenizer, clean_text  # noqa: E402
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder, bucket_of_distance, trim_context  # noqa: E402

TRICKY = [
    "A  cat\t\ton a\n\nmat ",
    "Fish &amp;amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s&#39;",
    "cafÃ© naÃ¯ve â€œsmart quotesâ€\x9d",
    "\u3000full-width\u3000space\u00a0nbsp\u2009thin\u2028line sep",
    "ctrl\x1c\x1dseparators\x1e\x1fhere",
    "  \r\n leading and trailing \x0b\x0c ",
    "ﬁligree ligature and Ｆｕｌｌｗｉｄｔｈ letters",
    "emoji 🎥 and zero\u200bwidth",
]

PROMPTS = [
    "kari tone mo la",
    "  Kari   TONE &amp; zzz xyzzy café 東京 夜 雨 Москва  ",
    "the quick brown fox jumps over the lazy dog",
    "ka ri to ne su mo la vi de an el or us im pa qu ex th sh ch ing ion er st " * 4,
    "",
]


def load_official_t5(wan_repo: str):
    real = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # default argument evaluated at import time
    try:
        return official_module("t5", wan_repo), official_module("tokenizers", wan_repo)
    finally:
        torch.cuda.current_device = real


def seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of a scale that keeps activations O(1); norms away from 1 so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.2 * noise)
            elif "pos_embedding" in name:
                p.copy_(0.5 * noise)
            elif name == "token_embedding.weight":
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def make_inputs(cfg: T5Config, lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(4, cfg.vocab, (n - 1,), generator=gen)
        ids[row, n - 1] = 1  # </s>
        mask[row, :n] = 1
    return ids, mask


def official_encoder(t5, cfg: T5Config):
    return t5.T5Encoder(vocab=cfg.vocab, dim=cfg.dim, dim_attn=cfg.dim_attn, dim_ffn=cfg.dim_ffn,
                        num_heads=cfg.num_heads, num_layers=cfg.num_layers, num_buckets=cfg.num_buckets,
                        shared_pos=cfg.shared_pos).eval()


def encoder_parity(t5, cfg: T5Config, ids, mask, seed: int):
    theirs_model = official_encoder(t5, cfg)
    seeded_weights(theirs_model, seed)
    ours_model = UMT5Encoder(cfg).eval()
    ours_model.load_state_dict(theirs_model.state_dict(), strict=True)
    with torch.no_grad():
        theirs = theirs_model(ids, mask)
        ours = ours_model(ids, mask)
    return theirs_model, ours_model, theirs, ours


def check_encoder(t5, cfg: T5Config, ids, mask, seed: int) -> tuple[dict, torch.Tensor]:
    theirs_model, ours_model, theirs, ours = encoder_parity(t5, cfg, ids, mask, seed)
    err = relative_error(ours, theirs)
    print(f"encoder fp32 (per-layer pos, L={ids.shape[1]}, lengths {mask.sum(1).tolist()}): rel err {err:.3e}")
    assert err <= 1e-5, err

    # What the official T5EncoderModel returns: rows of real tokens per prompt.
    lens = mask.gt(0).sum(dim=1).long()
    theirs_trim = [u[:v] for u, v in zip(theirs, lens)]
    ours_trim = trim_context(ours, mask)
    assert [t.shape for t in theirs_trim] == [t.shape for t in ours_trim]
    print("trimmed context: shapes equal", [tuple(t.shape) for t in ours_trim])

    shared = T5Config.tiny(shared_pos=True)
    _, _, th, ou = encoder_parity(t5, shared, ids, mask, seed + 1)
    print(f"encoder fp32 (shared pos variant): rel err {relative_error(ou, th):.3e}")

    state = {k: v.clone().contiguous() for k, v in theirs_model.state_dict().items()}  # fp32, before bf16
    tb, ob = theirs_model.to(torch.bfloat16), ours_model.to(torch.bfloat16)
    with torch.no_grad():
        th, ou = tb(ids, mask), ob(ids, mask)
    same = torch.equal(th, ou)
    print(f"encoder bf16 on CPU: bit-identical {same}, rel err {relative_error(ou, th):.3e}")
    return state, theirs


def check_buckets(t5, cfg: T5Config) -> tuple[torch.Tensor, torch.Tensor]:
    rel = torch.arange(-1100, 1101)
    emb = t5.T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, bidirectional=True)
    theirs = emb._relative_position_bucket(rel.clone())
    ours = bucket_of_distance(rel, cfg.num_buckets, cfg.max_distance)
    mismatches = int((theirs != ours).sum())
    print(f"relative buckets, distances -1100..1100: {mismatches} mismatches")
    assert mismatches == 0
    return rel, theirs


def check_cleaning(tok_mod) -> None:
    bad = 0
    for s in TRICKY:
        theirs = tok_mod.whitespace_clean(tok_mod.basic_clean(s))
        ours = clean_text(s)
        bad += theirs != ours
        print(f"clean {s!r:60} -> {ours!r}{'' if theirs == ours else f'  OFFICIAL {theirs!r}'}")
    print(f"cleaning: {len(TRICKY) - bad}/{len(TRICKY)} equal")
    assert bad == 0


def official_tokenizer(tok_mod, folder: Path, cls_name: str, max_length: int):
    """The official HuggingfaceTokenizer on ``folder``, with AutoTokenizer resolving to ``cls_name``."""
    config = {"tokenizer_class": cls_name, "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok_mod.HuggingfaceTokenizer(name=str(folder), seq_len=max_length, clean="whitespace")


def compare_tokenizers(official, ours: UMT5Tokenizer, title: str, must_match: bool) -> None:
    o_ids, o_mask = official(PROMPTS, return_mask=True, add_special_tokens=True)
    ids, mask = ours(PROMPTS)
    same = torch.equal(ids, o_ids) and torch.equal(mask, o_mask.long())
    rows = [int(r) for r in (ids != o_ids).any(1).nonzero().flatten()]
    print(f"{title}: {'equal' if same else f'DIFFER in prompts {rows}'}")
    if must_match:
        assert same
    elif not same:
        # transformers 5.x rebuilds a T5Tokenizer's Unigram with unk id 2 (<s>); the official pin
        # (4.49-4.51.3) loads tokenizer.json as it is, with umT5's unk id 3.
        only_unk = bool(((ids == o_ids) | ((ids == 3) & (o_ids == 2))).all())
        print(f"    differences are only <unk>: 3 (ours, the file) vs 2 (transformers 5 T5Tokenizer): {only_unk}")


def check_tokenizer(tok_mod) -> None:
    # "PreTrainedTokenizerFast" loads tokenizer.json verbatim, as T5TokenizerFast does in the
    # transformers 4.x the official code pins; "T5Tokenizer" shows what transformers 5.x does.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spiece = train_umt5_like_spm(folder)
        write_umt5_tokenizer_json(spiece, folder / "tokenizer.json")
        for max_length in (12, 512):
            ours = {"tokenizer.json": UMT5Tokenizer.from_tokenizer_json(folder / "tokenizer.json", max_length),
                    "spiece.model": UMT5Tokenizer.from_spiece_file(spiece, max_length)}
            for cls_name in ("PreTrainedTokenizerFast", "T5Tokenizer"):
                official = official_tokenizer(tok_mod, folder, cls_name, max_length)
                for label, tok in ours.items():
                    title = f"tokenizer max_length {max_length:3}, official via {cls_name:23} vs ours ({label:14})"
                    compare_tokenizers(official, tok, title, must_match=cls_name == "PreTrainedTokenizerFast")
        full = UMT5Tokenizer.from_spiece_file(spiece).encode([PROMPTS[3]])[0]
        cut, _ = UMT5Tokenizer.from_spiece_file(spiece, 12)([PROMPTS[3]])
        print(f"truncation: {len(full)} pieces -> first 11 + </s>: {cut[0].tolist() == full[:11] + [1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wan-repo", default=None, help="checkout of Wan-Video/Wan2.2")
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "parity_t5.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from safetensors.torch import save_file

    logging.getLogger("pixelwizard").setLevel(logging.ERROR)  # truncation warnings are expected here
    t5, tok_mod = load_official_t5(args.wan_repo)
    torch.manual_seed(args.seed)
    cfg = T5Config.tiny()
    ids, mask = make_inputs(cfg, [160, 37, 5], 160, args.seed)
    state, hidden = check_encoder(t5, cfg, ids, mask, args.seed)
    rel, buckets = check_buckets(t5, cfg)
    check_cleaning(tok_mod)
    check_tokenizer(tok_mod)

    tensors = {f"weights.{k}": v for k, v in state.items()}
    tensors.update(ids=ids, mask=mask, hidden=hidden.contiguous(), bucket_distance=rel, bucket=buckets)
    meta = {"config": json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}),
            "source": "tools/parity/t5.py, official wan/modules/t5.py T5Encoder, float32"}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
