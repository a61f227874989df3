"""The word-level tokenizer of the toy grammar, written as a umT5-numbered ``tokenizer.json``.

Ids 0..3 are umT5's specials (<pad>, </s>, <s>, <unk>), so the project's tokenizer loader accepts the file
(:meth:`~..loading.tokenizer.UMT5Tokenizer.from_tokenizer_json`); the grammar's words follow in a fixed
order. The normaliser keeps only the grammar's words: any other prompt (e.g. Wan's Chinese default
negative prompt) tokenizes to nothing but </s>, exactly like the empty prompt the models
were trained to treat as "unconditional".
"""

from __future__ import annotations

from pathlib import Path

from .world import WORDS

SPECIALS = ("<pad>", "</s>", "<s>", "<unk>")
# the prompt window: the longest grammar prompt is 11 words plus </s>. Written into tokenizer.json as its
# truncation length (the tokenizer loader takes it from there) and into the DiT files as ``text_len``, so
# the toy models attend to 16 rows instead of Wan's 512 (most of their training time went to those rows).
TEXT_ROWS = 16


def vocabulary() -> dict[str, int]:
    """token -> id: the four umT5 specials, then the grammar's words."""
    tokens = list(SPECIALS) + sorted(set(WORDS))
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_json(path: str | Path) -> Path:
    """Write the tokenizer (``tokenizers`` format) to ``path``; the content depends on nothing else."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel(vocabulary(), unk_token="<unk>"))
    known = "|".join(sorted(set(WORDS), key=len, reverse=True))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Lowercase(),
        normalizers.Replace(Regex("[^a-z]+"), " "),
        # words outside the grammar are dropped, not <unk>: "JPEG" in Wan's negative prompt must not
        # make it differ from the empty prompt
        normalizers.Replace(Regex(f"\\b(?!(?:{known})\\b)[a-z]+\\b"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.enable_truncation(max_length=TEXT_ROWS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
