"""Write our checkpoints (DiT, PixelWizard HR DiT, umT5 encoder; any layout we load) to GGUF.

    python -m pixelwizard_core.loading.convert IN OUT.gguf --gguf [Q8_0]

The block Linears are quantized (``Q8_0`` by default: about half the bytes of bf16), everything else keeps
its stored float type, as in published Wan GGUFs; keys are ours (the official names). The header and the
tensor infos are written first, then the data one tensor at a time, so converting never holds the model.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import publish, temporary_name
from ..errors import ConfigError
from ..models.quantized import QUANT_TYPES
from .formats import KeyPlan, plan_keys
from .gguf import META_PREFIX, PLAIN_TYPES, gguf_package
from .load import open_weights, plan_for
from .readers import TensorSource

log = logging.getLogger("pixelwizard")

# Types the writer makes (the gguf package quantizes these; K-quants it only dequantizes).
WRITE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")
_ARCH = {"dit": "wan", "hr_dit": "wan", "t5": "t5encoder"}
_FLOAT_KINDS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F32"}


def should_quantize(name: str, shape: tuple[int, ...], qtype: str) -> bool:
    """Whether the writer quantizes a tensor: the 2-D weights of the transformer blocks' Linears (what
    published Wan GGUFs quantize). Norms, biases, modulations, embeddings, the relative-position tables,
    the time / text / head layers and the HR additions (dt embedding, anchor injector) keep their type."""
    if qtype in ("BF16", "F16"):
        block = 1
    else:
        block = QUANT_TYPES.get(qtype).block_size
    return (name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2
            and "pos_embedding" not in name and shape[-1] % block == 0)


def convert_to_gguf(src: str | Path, dst: str | Path, *, qtype: str = "Q8_0", component: str | None = None,
                    use_ema: bool = False, overwrite: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write the DiT, HR DiT or umT5 weights at ``src`` (any layout we load) to ``dst`` as GGUF, the block
    Linears in ``qtype`` (:data:`WRITE_TYPES`), everything else in its stored float type (fp8 weights
    dequantized; float64 as F32). Keys are ours (the official names, no prefix); string metadata (e.g. the
    step-size conditioning) is kept. ``dst`` is written under a temporary name and published whole; an
    existing one is replaced only when ``overwrite``. Returns the number of tensors written per type."""
    if qtype not in WRITE_TYPES:
        raise ConfigError(f"GGUF type {qtype!r}: the writer makes {', '.join(WRITE_TYPES)}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_destination(dst, overwrite)
    with open_weights(src, component or "dit", use_ema=use_ema) as source:
        found = plan_keys(source.infos, source.metadata, source.describe()).layout.component
        if found not in _ARCH:
            raise ConfigError(f"{src} holds {found!r}; GGUF conversion is for the DiT, the HR DiT and the umT5 "
                              "encoder (the VAE has no Linears to quantize).")
        plan = plan_for(source, component or found)
        entries = _entries(plan, source, qtype)
        temporary = temporary_name(dst)
        try:
            _write(temporary, entries, source, plan, found, progress)
            publish(temporary, dst, overwrite, during="during the conversion")
        finally:
            temporary.unlink(missing_ok=True)
    counts = Counter(kind for _, _, kind in entries)
    log.info("wrote %s to %s: %s", src, dst, ", ".join(f"{k} x{n}" for k, n in counts.most_common()))
    return dict(counts)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.is_dir():
        raise ConfigError(f"{dst} is a folder: give the name of the .gguf file to write")
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists: choose another name, delete it, or pass --overwrite")
    if not dst.parent.is_dir():
        raise ConfigError(f"the folder {dst.parent} does not exist: create it first")


def _entries(plan: KeyPlan, source: TensorSource, qtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(our name, torch shape, GGUF type) of every tensor to write, in file order."""
    position = {k: i for i, k in enumerate(source.infos)}
    out = []
    for target, key in sorted(plan.tensors.items(), key=lambda kv: position[kv[1]]):
        shape = tuple(plan.shapes[target])
        stored = source.infos[key].dtype
        if should_quantize(target, shape, qtype):
            kind = qtype
        elif isinstance(stored, str) or target in plan.weight_scales:
            kind = "F32" if isinstance(stored, str) else "BF16"  # a quantized source, or scaled fp8
        else:
            kind = _FLOAT_KINDS.get(stored, "BF16" if stored.is_floating_point else "F32")
        out.append((target, shape, kind))
    return out


def _write(path: Path, entries: list, source: TensorSource, plan: KeyPlan, component: str,
           progress: Callable[[int, int], None] | None) -> None:
    """Header and tensor infos first, then the data one tensor at a time (never the whole model in memory)."""
    gguf = gguf_package()
    writer = gguf.GGUFWriter(path, _ARCH[component])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in _metadata(source, component).items():
        writer.add_string(key, value)
    for name, shape, kind in entries:
        spec = QUANT_TYPES.get(kind) if kind in QUANT_TYPES else None
        nbytes = _numel(shape) * PLAIN_TYPES[kind].itemsize if spec is None else \
            _numel(shape) // spec.block_size * spec.type_size
        writer.add_tensor_info(name, shape, _np_float32(), nbytes, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (name, shape, kind) in enumerate(entries, 1):
        writer.write_tensor_data(_encode(_read_float(source, plan, name), kind))
        if progress is not None:
            progress(done, len(entries))
    writer.close()
    with open(path, "rb+") as file:
        os.fsync(file.fileno())  # on disk before the name says the file is complete


def _metadata(source: TensorSource, component: str) -> dict[str, str]:
    """String metadata to keep, under ``pixelwizard.``; the container's own entries are not ours to copy."""
    out = {META_PREFIX + "component": component}
    for key, value in source.metadata.items():
        if isinstance(value, str) and not key.startswith(("general.", "tokenizer.", "_quantization_metadata")):
            out.setdefault(key if key.startswith(META_PREFIX) else META_PREFIX + key, value)
    return out


def _read_float(source: TensorSource, plan: KeyPlan, target: str) -> torch.Tensor:
    from .fp8 import dequantize

    tensor = source.read(plan.tensors[target])
    if target in plan.weight_scales:
        tensor = dequantize(tensor, source.read(plan.weight_scales[target]), torch.float32)
    return tensor


def _encode(tensor: torch.Tensor, kind: str) -> Any:
    """The bytes of ``tensor`` in GGUF type ``kind``, as the numpy array the writer takes."""
    gguf = gguf_package()
    if kind == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint8")
    if kind in PLAIN_TYPES:
        return tensor.to(PLAIN_TYPES[kind]).contiguous().numpy()
    rows = tensor.float().reshape(-1, tensor.shape[-1]).numpy()
    return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[kind])


def _np_float32() -> Any:
    import numpy as np

    return np.dtype(np.float32)  # any non-uint8 dtype: the writer then takes our shape as the value shape


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


