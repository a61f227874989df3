"""A small umT5-like SentencePiece model and a umT5-style tokenizer.json built from it.

Shared by the tokenizer tests and tools/parity/t5.py (which adds this folder to sys.path). The corpus
and training settings are fixed: the parity script's printed comparisons depend on the exact pieces.
"""

from __future__ import annotations

import random
from pathlib import Path

SYLLABLES = "ka ri to ne su mo la vi de an el or us im pa qu ex th sh ch ing ion er st".split()
# Accented, CJK and Cyrillic words, so the model has pieces for them and the prompts exercise them.
EXTRA_WORDS = "café naïve 東京 夜 雨 Москва улица über the quick brown fox".split()


def train_umt5_like_spm(folder: Path) -> Path:
    """Train a 300-piece unigram model numbered like umT5 (<pad> 0, </s> 1, <s> 2, <unk> 3) into ``folder``.

    Returns the path of ``folder/spiece.model``. Deterministic: seeded corpus, one training thread.
    """
    import sentencepiece as spm

    folder = Path(folder)
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += EXTRA_WORDS
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=300,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>",
        bos_piece="<s>", unk_piece="<unk>", normalization_rule_name="identity", character_coverage=1.0,
        minloglevel=2, num_threads=1)
    return folder / "spiece.model"


def write_umt5_tokenizer_json(spiece: Path, out: Path) -> Path:
    """Write ``out``: a tokenizer.json laid out like the published umT5 one, from the SentencePiece model.

    Built with the `tokenizers` package only (transformers' converter needs protobuf): Unigram with the
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
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(out))
    return out
