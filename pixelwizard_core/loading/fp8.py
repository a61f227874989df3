"""fp8 weights of Comfy-Org files: validate the scheme, then dequantise one tensor at a time.

Two spellings of the same scheme (per-tensor scaled float8, real weight = fp8 weight x scale):

- older "scaled_fp8" files: ``<layer>.scale_weight`` float32 next to each fp8 ``<layer>.weight``, a marker
  tensor ``scaled_fp8``, optionally ``<layer>.scale_input`` (an activation scale; 1.0 in practice);
- newer files: ``<layer>.weight_scale`` (and optional ``<layer>.input_scale``), with the quantised layers
  listed in the header's ``_quantization_metadata`` JSON or in ``<layer>.comfy_quant`` uint8 JSON tensors.

Input scales only matter for fp8 matmuls; we dequantise to a float dtype, so they are dropped (with a
warning when one is not 1.0, since then the file was calibrated for fp8 activations).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import torch

from ..errors import WeightFormatError
from .formats import KeyPlan

log = logging.getLogger("pixelwizard")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SUPPORTED_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_UNSUPPORTED_SUFFIXES = (".weight_scale_2", ".pre_quant_scale")
_CHUNK_ELEMENTS = 1 << 24  # dequantise in row blocks of ~16M elements (64 MB of float32) at a time

Reader = Callable[[str], torch.Tensor]


def is_fp8(dtype: object) -> bool:
    return dtype in FP8_DTYPES


def check_quantization(plan: KeyPlan, read: Reader, infos: dict, where: str) -> None:
    """Refuse schemes we cannot dequantise exactly; warn about dropped activation scales.

    Reads only the tiny tensors (format markers, input scales), never a weight.
    """
    for source in plan.tensors.values():
        if source.endswith(_UNSUPPORTED_SUFFIXES):
            raise WeightFormatError(
                f"{where} uses a double-scaled quantisation ({source!r}: NVFP4 / MXFP8 style), which PixelWizard "
                "does not load. Use the fp16 file or the fp8_e4m3fn_scaled file."
            )
    formats = dict(plan.quant_layers)
    formats.update({t: _format_of(read(k), k, where) for t, k in plan.quant_configs.items()})
    for target, fmt in formats.items():
        if fmt not in SUPPORTED_FORMATS:
            raise WeightFormatError(
                f"{where}: layer {plan.tensors[target]!r} is quantised as {fmt!r}; PixelWizard dequantises only "
                f"{', '.join(SUPPORTED_FORMATS)}. Use the fp16 file or the fp8_e4m3fn_scaled file."
            )
        if target not in plan.weight_scales:
            raise WeightFormatError(
                f"{where}: layer {plan.tensors[target]!r} is marked as quantised but has no weight_scale tensor; "
                "the file is incomplete. Download it again."
            )
    for target, scale_key in plan.weight_scales.items():
        _check_scale_shape(infos[scale_key].shape, plan.shapes[target], scale_key, where)
    _warn_input_scales(plan.input_scales, read)


def _format_of(marker: torch.Tensor, key: str, where: str) -> str:
    try:
        conf = json.loads(bytes(marker.to(torch.uint8).tolist()).decode("utf-8"))
        return str(conf["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightFormatError(f"{where}: {key!r} is not a JSON quantisation marker ({exc}).") from exc


def _check_scale_shape(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...], key: str, where: str) -> None:
    numel = 1
    for s in scale_shape:
        numel *= s
    per_row = bool(weight_shape) and numel == weight_shape[0]
    if numel != 1 and not per_row:
        raise WeightFormatError(
            f"{where}: scale {key!r} has shape {list(scale_shape)} for a weight of shape {list(weight_shape)}; "
            "only per-tensor and per-output-row scales are supported (block-wise int8 / fp4 files are not)."
        )


def _warn_input_scales(keys: list[str], read: Reader) -> None:
    for key in keys:
        value = read(key).float()
        if not torch.all(value == 1.0):
            log.warning(
                "%s = %s: this fp8 file was calibrated for fp8 activations; PixelWizard dequantises the weights "
                "and runs the layer in a float dtype, so this input scale is ignored.",
                key,
                value.flatten()[:4].tolist(),
            )


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.float() * scale, cast to ``dtype``, built in row blocks so no full float32 copy exists."""
    scale = scale.to(torch.float32)
    if weight.ndim == 0:
        return (weight.float() * scale.reshape(())).to(dtype)
    per_row = scale.numel() != 1
    scale = scale.reshape(-1, *([1] * (weight.ndim - 1))) if per_row else scale.reshape(())
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    row = max(1, weight[0].numel())
    step = max(1, _CHUNK_ELEMENTS // row)
    for start in range(0, weight.shape[0], step):
        stop = start + step
        block_scale = scale[start:stop] if per_row else scale
        out[start:stop] = (weight[start:stop].float() * block_scale).to(dtype)
    return out
