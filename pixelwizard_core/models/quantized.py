"""GGUF block quantization in torch: dequantization kernels, and layers whose weights stay quantized.

A quantized weight is kept as its raw blocks, a uint8 tensor [rows, bytes per row], in the ``weight``
parameter of its layer. Placement, offload and block swap move parameters, so they move the blocks as they
are; the memory the model takes is their real size. Just before the layer runs the blocks are dequantized
in torch, on the device they are on, to the layer's compute dtype; the full-precision weight exists only
for that one layer call.

Block formats (ggml's definitions; multi-byte fields little-endian; "nibbles": value i < 16 of a 32-value
group is the low half of byte i, value i >= 16 the high half of byte i - 16):

- Q8_0: 32 values in 34 bytes: f16 d, 32 int8 q; value d * q.
- Q4_0: 32 in 18: f16 d, 16 bytes of nibbles q; d * (q - 8).
- Q4_1: 32 in 20: f16 d, f16 m, nibbles; d * q + m.
- Q5_0: 32 in 22: f16 d, 4 bytes holding the fifth bit of value i at bit i, nibbles; d * (q - 16).
- Q5_1: 32 in 24: f16 d, f16 m, fifth bits, nibbles; d * q + m.
- Q4_K: 256 in 144: f16 d, f16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes: 4 chunks of 32
  bytes, low nibbles = sub-block 2c, high = 2c+1; d * scale_j * q - dmin * min_j.
- Q5_K: 256 in 176: as Q4_K with 32 bytes of fifth bits (bit j of byte l: value l of sub-block j) before
  the nibbles.
- Q6_K: 256 in 210: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16 values),
  f16 d; d * scale * (q - 32).

Arithmetic is float32 with the operations in the order of ``gguf.quants.dequantize`` (the PyPI package),
so the values equal it bit for bit (tests/test_gguf.py); the result is then cast to the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import Registry
from .layers import FP32Linear, Linear

QK_K = 256
_CHUNK_ELEMENTS = 1 << 24  # dequantize in row blocks of ~16M values (64 MB of float32) at a time

Kernel = Callable[[torch.Tensor], torch.Tensor]  # [n, type_size] uint8 -> [n, block_size] float32


@dataclass(frozen=True)
class QuantType:
    """One GGUF block format: its ggml type id, values per block, bytes per block, and its kernel."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    kernel: Kernel

    @property
    def bytes_per_value(self) -> float:
        return self.type_size / self.block_size

    def row_bytes(self, values: int) -> int:
        """Bytes of a row of ``values`` values (a whole number of blocks)."""
        if values % self.block_size:
            raise ConfigError(f"a {self.name} row holds whole blocks of {self.block_size} values; {values} is not "
                              "a multiple")
        return values // self.block_size * self.type_size


# ---------------------------------------------------------------------------------------------- byte fields

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] values: the low nibbles of all bytes, then the high ones."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int, step: int = 1, mask: int = 1) -> torch.Tensor:
    """[n, k] bytes -> [n, count, k]: field j is ``(byte >> (j * step)) & mask``."""
    shifts = torch.arange(0, count * step, step, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts.view(count, 1)) & mask


def _fifth_bits(packed: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes -> [n, 32]: bit i of the little-endian 32-bit word (value i's fifth bit)."""
    return _bits(packed, 8).transpose(-1, -2).reshape(packed.shape[0], 32)


# ---------------------------------------------------------------------------------------------- kernels

def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _f16(blocks, 2)


def _q5(blocks: torch.Tensor, high: int) -> torch.Tensor:
    """The 5-bit values of a Q5_0 / Q5_1 block whose fifth bits start at byte ``high``."""
    return _nibbles(blocks[:, high + 4:]) | (_fifth_bits(blocks[:, high:high + 4]) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _q5(blocks, 2).to(torch.int8) - 16
    return _f16(blocks, 0) * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _q5(blocks, 4).float() + _f16(blocks, 2)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 6-bit scales and mins of a Q4_K / Q5_K block (bytes 4..15), as float32 [n, 8, 1] each.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 mins 0-3; scales and mins 4-7 have their low 4 bits
    in the nibbles of bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 and 4-7."""
    packed = blocks[:, 4:16]
    low, mid, top = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mins = torch.cat([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scales.float().unsqueeze(-1), mins.float().unsqueeze(-1)


def _k_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n, 8, 32]: chunk c of 32 bytes gives sub-block 2c (low nibbles) and 2c+1 (high)."""
    chunks = packed.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks)
    d = _f16(blocks, 0).unsqueeze(-1) * scales
    dm = _f16(blocks, 2).unsqueeze(-1) * mins
    return (d * _k_nibbles(blocks[:, 16:]).float() - dm).reshape(-1, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks)
    d = _f16(blocks, 0).unsqueeze(-1) * scales
    dm = _f16(blocks, 2).unsqueeze(-1) * mins
    q = _k_nibbles(blocks[:, 48:]) | (_bits(blocks[:, 16:48], 8) << 4)
    return (d * q.float() - dm).reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # Each half of 128 values: 64 bytes of low nibbles (values 0-31 and 32-63 low, 64-95 and 96-127 high)
    # and 32 bytes holding the 2-bit tops of the four groups of 32 at shifts 0, 2, 4, 6.
    halves = blocks[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([halves & 0x0F, halves >> 4], dim=2).reshape(-1, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 4, step=2, mask=3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16)
    d = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()
    return (d.unsqueeze(-1) * q.float()).reshape(-1, QK_K)


QUANT_TYPES: Registry[QuantType] = Registry("GGUF quantization type")
for _entry in (
    QuantType("Q8_0", 8, 32, 34, _q8_0),
    QuantType("Q4_0", 2, 32, 18, _q4_0),
    QuantType("Q4_1", 3, 32, 20, _q4_1),
    QuantType("Q5_0", 6, 32, 22, _q5_0),
    QuantType("Q5_1", 7, 32, 24, _q5_1),
    QuantType("Q4_K", 12, QK_K, 144, _q4_k),
    QuantType("Q5_K", 13, QK_K, 176, _q5_k),
    QuantType("Q6_K", 14, QK_K, 210, _q6_k),
):
    QUANT_TYPES.register(_entry.name, _entry)


def is_quantized(dtype: object) -> bool:
    """Whether a stored dtype (a torch dtype, or a GGUF type name) is a block quantization we dequantize."""
    return isinstance(dtype, str) and dtype in QUANT_TYPES


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of the blocks ``raw`` (uint8, last dim = bytes per row) as a ``dtype`` tensor of ``shape``.

    Works on ``raw``'s device; built in row blocks so only one block's float32 temporaries exist at once."""
    spec = QUANT_TYPES.get(qtype)
    rows = raw.reshape(-1, raw.shape[-1])
    if rows.shape[-1] % spec.type_size:
        raise ConfigError(f"{qtype} data rows of {rows.shape[-1]} bytes are not whole blocks of {spec.type_size}")
    per_row = rows.shape[-1] // spec.type_size * spec.block_size
    out = torch.empty(rows.shape[0], per_row, dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step]
        values = spec.kernel(part.reshape(-1, spec.type_size))
        out[start:start + step] = values.reshape(part.shape[0], per_row).to(dtype)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------- layers

class QuantizedWeight:
    """Mixin of the layers below: the ``weight`` parameter holds raw blocks of ``qtype``; ``dequant_dtype``
    is the dtype the layer computes in (the loader's target dtype)."""

    qtype: str
    dequant_dtype: torch.dtype
    weight: torch.Tensor

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight (a new tensor, on the blocks' device): for a layer call or a LoRA."""
        return dequantize(self.weight, self.qtype, self.weight_shape, dtype or self.dequant_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.qtype} -> {str(self.dequant_dtype).replace('torch.', '')}"


class _QuantizedLinearBase(QuantizedWeight):
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dequant_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)


class QuantizedLinear(_QuantizedLinearBase, Linear):
    """A DiT :class:`~.layers.Linear` with quantized weights: computes in ``dequant_dtype``."""


class QuantizedFP32Linear(_QuantizedLinearBase, FP32Linear):
    """An :class:`~.layers.FP32Linear` with quantized weights: still computes in float32."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32


class QuantizedTorchLinear(_QuantizedLinearBase, nn.Linear):
    """A plain ``nn.Linear`` (the umT5 encoder's) with quantized weights."""


class QuantizedEmbedding(QuantizedWeight, nn.Embedding):
    """An ``nn.Embedding`` whose table stays quantized: only the looked-up rows are dequantized."""

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]  # each row is whole blocks, so rows dequantize on their own
        return dequantize(rows, self.qtype, (*ids.shape, self.embedding_dim), self.dequant_dtype)


# Exact classes only: a subclass we do not know may compute differently, so its weight is dequantized at load.
_QUANTIZED_CLASSES: dict[type, type] = {
    Linear: QuantizedLinear,
    FP32Linear: QuantizedFP32Linear,
    nn.Linear: QuantizedTorchLinear,
    nn.Embedding: QuantizedEmbedding,
}


def quantized_class(module: nn.Module, leaf: str) -> type | None:
    """The quantized class ``module`` becomes when its parameter ``leaf`` is quantized (None: no such class)."""
    if leaf != "weight" or getattr(module, "padding_idx", None) is not None or getattr(module, "max_norm", None):
        return None
    return _QUANTIZED_CLASSES.get(type(module))


def install_quantized(owner: nn.Module, raw: torch.Tensor, qtype: str, dtype: torch.dtype) -> None:
    """Make ``owner`` (a Linear or Embedding, see :func:`quantized_class`) keep ``raw`` blocks as its weight
    and compute in ``dtype``. ``raw`` must already be the layer's own copy, on its device."""
    cls = quantized_class(owner, "weight")
    if cls is None:
        raise ConfigError(f"a {type(owner).__name__} cannot keep quantized weights")
    spec = QUANT_TYPES.get(qtype)
    rows, width = owner.weight.shape
    raw = raw.reshape(rows, spec.row_bytes(width))
    owner.__class__ = cls  # same parameters and state-dict keys; only forward changes
    owner.qtype, owner.dequant_dtype = qtype, dtype
    owner._parameters["weight"] = nn.Parameter(raw, requires_grad=False)


@torch.no_grad()
def quantize_linears_on_meta(module: nn.Module, qtype: str) -> int:
    """Give every block-quantizable Linear under ``module`` the meta blocks of ``qtype`` (shapes only):
    how a quantized file lays out its layers, for the memory model. Returns how many were converted."""
    spec, converted = QUANT_TYPES.get(qtype), 0
    for layer in module.modules():
        if type(layer) is Linear and layer.in_features % spec.block_size == 0:
            raw = torch.empty(layer.out_features, spec.row_bytes(layer.in_features), dtype=torch.uint8,
                              device="meta")
            install_quantized(layer, raw, qtype, layer.weight.dtype)
            converted += 1
    return converted
