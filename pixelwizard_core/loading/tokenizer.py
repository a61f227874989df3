"""umT5 tokenizer, offline: the official tokenizer.json / spiece.model, or the SentencePiece model that
Comfy-Org text-encoder files carry as a uint8 tensor ``spiece_model``.

Output matches what Wan2.2 gets from its Hugging Face tokenizer call (padding to max_length,
truncation, special tokens on): the pieces of the cleaned prompt, cut to max_length - 1, then </s>
(id 1), then <pad> (id 0) up to max_length. The mask marks the pieces and the </s>.

Two backends read the two file kinds: ``tokenizers`` for tokenizer.json (the file the official
AutoTokenizer uses when present) and ``sentencepiece`` for a serialized SentencePiece model. For the
same model they give the same ids on cleaned prompts (tested on a model trained in the tests). Known
difference: tokenizer.json also matches special-token strings typed into a prompt (``</s>``,
``<extra_id_0>``) as single ids, SentencePiece spells them out piece by piece.
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from ..errors import MissingFileError, WeightFormatError

log = logging.getLogger("pixelwizard")

TEXT_LEN = 512
TOKENIZER_SUBFOLDER = Path("google") / "umt5-xxl"
SPIECE_TENSOR = "spiece_model"

# The official cleaner uses the third-party `regex` module, whose \s is Unicode White_Space; the
# standard `re` \s would also match U+001C..U+001F, so the set is written out.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

_HOW_TO_PROVIDE = (
    "The umT5 tokenizer is needed and nothing is downloaded. Provide one of: "
    "(a) tokenizer.json or spiece.model from the google/umt5-xxl sub-folder of the official "
    "Wan2.2-TI2V-5B checkpoint folder - point to that folder, to the sub-folder, or copy the file(s) "
    "next to the text encoder weights; "
    "(b) a Comfy-Org umT5 text encoder file (umt5_xxl_fp16.safetensors or "
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors, in models/text_encoders), which carries the tokenizer as "
    "the tensor 'spiece_model'."
)

PathLike = Union[str, os.PathLike]
SpieceData = Union[bytes, bytearray, memoryview, torch.Tensor]


def clean_text(text: str) -> str:
    """Wan2.2's 'whitespace' prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    import ftfy  # only needed to tokenize: the models and pipeline import without it (bare GPU images)

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


class UMT5Tokenizer:
    """Callable on a list of prompts -> (ids [B, max_length] int64, mask [B, max_length] int64)."""

    def __init__(self, encode_batch: Callable[[list[str]], list[list[int]]], eos_id: int, pad_id: int,
                 vocab_size: int, source: str, max_length: int | None = TEXT_LEN) -> None:
        max_length = TEXT_LEN if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        self._encode_batch = encode_batch
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.source = source
        self.max_length = max_length

    # ----- constructors -------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: PathLike, max_length: int | None = None) -> "UMT5Tokenizer":
        """A folder holding tokenizer.json or spiece.model, or a checkpoint folder with google/umt5-xxl.

        tokenizer.json wins when both exist, as with the official AutoTokenizer. ``max_length`` None: the
        length a tokenizer.json sets for truncation, else Wan's 512.
        """
        folder = Path(folder)
        for where in (folder, folder / TOKENIZER_SUBFOLDER):
            if (where / "tokenizer.json").is_file():
                return cls.from_tokenizer_json(where / "tokenizer.json", max_length)
            if (where / "spiece.model").is_file():
                return cls.from_spiece_file(where / "spiece.model", max_length)
        raise MissingFileError(
            f"no umT5 tokenizer in {folder} (looked for tokenizer.json and spiece.model there and in "
            f"{folder / TOKENIZER_SUBFOLDER}). {_HOW_TO_PROVIDE}")

    @classmethod
    def from_tokenizer_json(cls, path: PathLike, max_length: int | None = None) -> "UMT5Tokenizer":
        from tokenizers import Tokenizer

        path = _existing(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise WeightFormatError(f"{path} is not a readable tokenizer.json ({err}). {_HOW_TO_PROVIDE}") from err
        # A file may set its own truncation length (the toy world's does: its DiTs read 16 rows); the
        # umT5 release sets none, and Wan's pipeline passes 512.
        if max_length is None:
            max_length = (tok.truncation or {}).get("max_length") or TEXT_LEN
        # Truncation and padding are applied here, identically for both backends.
        tok.no_truncation()
        tok.no_padding()
        eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
        _check_special_ids(eos, pad, path)

        def encode_batch(texts: list[str]) -> list[list[int]]:
            # One by one: encode_batch's thread pool is not worth it for a few prompts and misbehaves
            # in forked worker processes.
            return [tok.encode(t, add_special_tokens=False).ids for t in texts]

        log.info("umT5 tokenizer: %s (tokenizers backend)", path)
        return cls(encode_batch, eos, pad, tok.get_vocab_size(with_added_tokens=True), str(path), max_length)

    @classmethod
    def from_spiece_file(cls, path: PathLike, max_length: int | None = None) -> "UMT5Tokenizer":
        path = _existing(path)
        return cls.from_spiece_bytes(path.read_bytes(), max_length, source=str(path))

    @classmethod
    def from_spiece_bytes(cls, data: SpieceData, max_length: int | None = None,
                          source: str = "serialized SentencePiece model") -> "UMT5Tokenizer":
        """From the bytes of a SentencePiece model, or the uint8 tensor ``spiece_model`` holding them."""
        import sentencepiece

        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8:
                raise WeightFormatError(f"{source}: tensor '{SPIECE_TENSOR}' must be uint8, got {data.dtype}")
            data = data.cpu().contiguous().numpy().tobytes()
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(data))
        except Exception as err:  # sentencepiece raises RuntimeError/OSError depending on version
            raise WeightFormatError(f"{source} is not a valid SentencePiece model ({err}). {_HOW_TO_PROVIDE}") from err
        _check_special_ids(sp.eos_id(), sp.pad_id(), source)

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return sp.encode(texts, out_type=int, add_bos=False, add_eos=False)

        log.info("umT5 tokenizer: %s (sentencepiece backend)", source)
        return cls(encode_batch, sp.eos_id(), sp.pad_id(), sp.get_piece_size(), source, max_length)

    @classmethod
    def from_text_encoder_file(cls, path: PathLike, max_length: int | None = None) -> "UMT5Tokenizer":
        """The tokenizer embedded in a Comfy-Org umT5 safetensors file (reads only that tensor)."""
        from safetensors import safe_open

        path = _existing(path)
        with safe_open(str(path), framework="pt") as f:
            if SPIECE_TENSOR not in f.keys():
                raise MissingFileError(f"{path} carries no '{SPIECE_TENSOR}' tensor, so no tokenizer. "
                                       f"{_HOW_TO_PROVIDE}")
            data = f.get_tensor(SPIECE_TENSOR)
        return cls.from_spiece_bytes(data, max_length, source=f"{path}:{SPIECE_TENSOR}")

    # ----- use ----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Cleaned prompts -> piece ids, no </s>, no truncation."""
        return self._encode_batch([clean_text(t) for t in texts])

    def __call__(self, texts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.int64)
        for row, pieces in enumerate(self.encode(texts)):
            if len(pieces) >= self.max_length:
                log.warning("prompt %d has %d tokens; cut to %d plus </s>", row, len(pieces), self.max_length - 1)
            # Like the HF call: truncation leaves room for the </s> appended after it.
            seq = pieces[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"tokenizer file {path} does not exist. {_HOW_TO_PROVIDE}")
    return path


def _check_special_ids(eos: int | None, pad: int | None, source: object) -> None:
    # The encoder was trained with <pad> = 0 and </s> = 1; another numbering means another model.
    if eos != 1 or pad != 0:
        raise WeightFormatError(
            f"{source} is not a umT5 tokenizer: </s> has id {eos} and <pad> id {pad}, expected 1 and 0")
