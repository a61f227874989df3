"""GGUF weight files: read one as a tensor source, and write our checkpoints to GGUF.

GGUF is llama.cpp's container, read and written here with the ``gguf`` PyPI package: the magic ``GGUF``,
key/value metadata, then per tensor its name, its dims innermost first (so the torch shape is the list
reversed), its ggml type and offset, then the aligned data, memory-mapped here and read tensor by tensor.

- Names: the Wan / Comfy names, as in safetensors files (bare, or with ``model.diffusion_model.``), so
  :mod:`.formats` recognises DiT, HR DiT and umT5 files by their keys like every other layout. umT5
  encoders made with llama.cpp's tools use llama.cpp names (``enc.blk.N.attn_q.weight``,
  ``token_embd.weight``); they are renamed here to the Hugging Face names. ComfyUI-GGUF's metadata
  ``comfy.gguf.orig_shape.<name>`` (an int array) gives the torch shape of a tensor stored in another one.
- Types: F32, F16, BF16 (and F64 / integers) are plain tensors. The block quantizations of
  :data:`~pixelwizard_core.models.quantized.QUANT_TYPES` are handed to the loader as raw blocks
  (:meth:`GGUFSource.read_raw`), which keeps them quantized in the layers that can
  (models/quantized.py); :meth:`GGUFSource.read` dequantizes them for any other reader. Every other type
  (Q2_K, Q3_K, IQ*, TQ*, ...) is refused by name when the file is opened.
- Metadata: string entries become the source's metadata; ``pixelwizard.<key>`` (what
  :mod:`.gguf_write` writes, e.g. the HR model's step-size conditioning) is also given as ``<key>``.

The writer (our checkpoints to GGUF) is :mod:`.gguf_write`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MissingFileError, WeightFormatError
from ..models.quantized import QUANT_TYPES, dequantize, install_quantized, is_quantized, quantized_class
from .readers import CONTAINER_READERS, TensorInfo, TensorSource

log = logging.getLogger("pixelwizard")

PLAIN_TYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
META_PREFIX = "pixelwizard."
_SUPPORTED = ("F32", "F16", "BF16", *QUANT_TYPES.names())

# llama.cpp names of umT5 encoder files -> Hugging Face names (which formats.py renames to ours)
_T5_BLOCK = re.compile(r"^enc\.blk\.(\d+)\.(\w+)\.weight$")
_T5_PARTS = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_T5_WHOLE = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}


def gguf_package() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingFileError("reading or writing GGUF files needs the 'gguf' package: pip install 'gguf>=0.10'"
                               ) from None
    return gguf


def llama_t5_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp umT5 tensor name (other names are returned as they are)."""
    if name in _T5_WHOLE:
        return _T5_WHOLE[name]
    match = _T5_BLOCK.match(name)
    if match and match.group(2) in _T5_PARTS:
        return f"encoder.block.{match.group(1)}.{_T5_PARTS[match.group(2)]}.weight"
    return name


# ---------------------------------------------------------------------------------------------- reading

class GGUFSource(TensorSource):
    """One GGUF file, memory-mapped; quantized tensors are listed with their type name as dtype."""

    container = "gguf"

    def __init__(self, path: Path) -> None:
        reader = _open_reader(path)
        fields = reader.fields
        llama_t5 = any(t.name.startswith("enc.blk.") for t in reader.tensors)
        self._tensors: dict[str, Any] = {}
        self._types: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for tensor in reader.tensors:
            name = llama_t5_name(tensor.name) if llama_t5 else tensor.name
            kind = tensor.tensor_type.name
            shape = _orig_shape(fields, tensor, path) or tuple(int(d) for d in reversed(tensor.shape.tolist()))
            infos[name] = TensorInfo(shape, PLAIN_TYPES.get(kind, kind))
            self._tensors[name], self._types[name] = tensor, kind
        _refuse_types(path, self._types)
        super().__init__(path, infos, _string_fields(fields))
        self._reader = reader

    def quant_type(self, key: str) -> str | None:
        """The block quantization of ``key`` (e.g. 'Q8_0'), None for a plain tensor."""
        kind = self._types[key]
        return kind if is_quantized(kind) else None

    def read_raw(self, key: str) -> torch.Tensor:
        """The stored blocks of a quantized tensor, uint8 [rows, bytes per row], a view of the file."""
        return _from_numpy(self._tensors[key].data).reshape(-1, self._tensors[key].data.shape[-1])

    def read(self, key: str) -> torch.Tensor:
        """The tensor in its torch shape: plain types as stored (a view of the file), quantized ones
        dequantized to float32."""
        info, kind = self.infos[key], self._types[key]
        if is_quantized(kind):
            return dequantize(self.read_raw(key), kind, info.shape)
        data = _from_numpy(self._tensors[key].data)
        if kind == "BF16":  # stored as raw bytes: numpy has no bfloat16
            data = data.view(torch.uint8).reshape(-1).view(torch.bfloat16)
        return data.reshape(info.shape)

    def describe(self) -> str:
        counts = Counter(self._types.values()).most_common()
        types = ", ".join(f"{k} x{n}" for k, n in counts)
        return f"{self.path} (gguf, {len(self.infos)} tensors: {types})"

    def close(self) -> None:
        self._reader = None
        self._tensors = {}


CONTAINER_READERS["gguf"] = GGUFSource


def _open_reader(path: Path) -> Any:
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(path, "r")
    except ValueError as exc:
        if "is not a valid GGMLQuantizationType" in str(exc):
            raise WeightFormatError(f"{path} holds a tensor of a GGUF type this gguf package does not know ({exc}); "
                                    f"PixelWizard loads {', '.join(_SUPPORTED)}.") from None
        raise _damaged(path, exc) from None
    except (OSError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: Exception) -> WeightFormatError:
    return WeightFormatError(f"{path} could not be read as a GGUF file ({type(exc).__name__}: {str(exc)[:200]}); "
                             "the file is truncated or damaged: download or convert it again.")


def _refuse_types(path: Path, types: dict[str, str]) -> None:
    other = [(name, kind) for name, kind in types.items() if kind not in PLAIN_TYPES and not is_quantized(kind)]
    if other:
        kinds = sorted({kind for _, kind in other})
        raise WeightFormatError(
            f"{path} holds tensors quantized as {', '.join(kinds)} (e.g. {other[0][0]!r} is {other[0][1]}); "
            f"PixelWizard dequantizes only {', '.join(_SUPPORTED)}. Use a Q8_0, Q6_K, Q5_K_M or Q4_K_M file, "
            "or the fp16 safetensors file."
        )


def _orig_shape(fields: dict, tensor: Any, path: Path) -> tuple[int, ...] | None:
    field = fields.get(ORIG_SHAPE_PREFIX + tensor.name)
    if field is None:
        return None
    shape = tuple(int(v) for v in field.contents())
    numel = 1
    for s in shape:
        numel *= s
    if numel != int(tensor.n_elements):
        raise WeightFormatError(f"{path}: {ORIG_SHAPE_PREFIX}{tensor.name} says {list(shape)} but the tensor has "
                                f"{int(tensor.n_elements)} values; the file is damaged.")
    return shape


def _string_fields(fields: dict) -> dict[str, str]:
    gguf = gguf_package()
    out: dict[str, str] = {}
    for name, field in fields.items():
        if field.types == [gguf.GGUFValueType.STRING]:
            out[name] = str(field.contents())
            if name.startswith(META_PREFIX):
                out.setdefault(name[len(META_PREFIX):], out[name])
    return out


def _from_numpy(array: Any) -> torch.Tensor:
    with warnings.catch_warnings():  # the memory map is read-only; the loader copies what it keeps
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------- loading

def keep_quantized(model: nn.Module, target: str, source: TensorSource, key: str, dtype: torch.dtype,
                   device: torch.device) -> bool:
    """Put the stored blocks of ``key`` in place as the quantized weight ``target`` of ``model`` (computing
    in ``dtype``), when ``key`` is a GGUF block type and its layer can compute from blocks (a Linear or an
    Embedding, models/quantized.py); whether it did. Otherwise the loader reads the tensor, dequantized."""
    qtype = source.quant_type(key) if isinstance(source, GGUFSource) else None
    if qtype is None:
        return False
    owner_name, _, leaf = target.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if quantized_class(owner, leaf) is None:
        log.debug("%s (%s) is dequantized at load: a %s computes from full weights", target, qtype,
                  type(owner).__name__)
        return False
    install_quantized(owner, source.read_raw(key).to(device, copy=True), qtype, dtype)  # our copy, not the file's
    return True
