"""Tensors plus JSON metadata in one safetensors file, checksummed and written atomically.

The generic layer under anchor and HR-latent files. Layout of the safetensors header's ``__metadata__``
(a str -> str map):

* every user metadata entry, its value JSON-encoded, under its own key (so any safetensors viewer
  shows ``prompt``, ``seed``, ... readably);
* ``pixelwizard.format`` = ``"pixelwizard-tensors"``, ``pixelwizard.version`` = ``"1"``,
  ``pixelwizard.kind`` = what the file holds (``"tensors"`` unless the caller names it, e.g. ``"anchor"``);
* ``pixelwizard.sha256`` = SHA-256 over the tensors (for each name in sorted order: name, dtype, shape,
  then the raw little-endian bytes) and then the user metadata entries (sorted keys, encoded values),
  checked on load so a damaged or edited file (data or metadata such as a prompt or seed) is refused.

Never pickle: safetensors holds only raw tensor bytes and a JSON header.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ConfigError, MissingFileError, WeightFormatError
from ..files import publish, temporary_name
from .paths import check_writable

FORMAT_NAME = "pixelwizard-tensors"
FORMAT_VERSION = 1
RESERVED_PREFIX = "pixelwizard."
_FORMAT, _VERSION, _KIND, _SHA = (RESERVED_PREFIX + k for k in ("format", "version", "kind", "sha256"))


def tensors_sha256(tensors: Mapping[str, torch.Tensor], encoded_metadata: Mapping[str, str] | None = None) -> str:
    """Hex SHA-256 of the tensors (names sorted, dtypes, shapes, bytes), then of the encoded user metadata.
    Independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    for key in sorted(encoded_metadata or {}):
        digest.update(json.dumps([key, encoded_metadata[key]]).encode())
    return digest.hexdigest()


def save_tensor_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                     *, kind: str = "tensors", overwrite: bool = False, make_dirs: bool = False) -> Path:
    """Write ``tensors`` and JSON-able ``metadata`` to a safetensors file at ``path``; returns the path.

    The file appears only when complete (temporary name in the same folder, fsync, rename); an existing
    file is kept unless ``overwrite``. Tensors are stored from CPU, contiguous, with their own dtype.
    Raises ConfigError for non-tensor values, metadata that JSON cannot encode, reserved keys, or an
    unwritable path.
    """
    target = check_writable(path, overwrite=overwrite, make_dirs=make_dirs)
    prepared = _prepare_tensors(tensors)
    user = _encode_metadata(metadata)
    header = {**user, _FORMAT: FORMAT_NAME, _VERSION: str(FORMAT_VERSION), _KIND: str(kind),
              _SHA: tensors_sha256(prepared, user)}
    from safetensors.torch import save_file

    temporary = temporary_name(target)
    try:
        save_file(prepared, str(temporary), metadata=header)
        publish(temporary, target, overwrite)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def load_tensor_file(path: str | os.PathLike, *, kind: str | None = None,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensor_file`: (tensors, metadata), after checking its checksum.

    ``kind``, when given, must match the kind the file was saved with. Raises MissingFileError when the
    file is absent, WeightFormatError when it is not such a file, was written by a newer version, is
    truncated, or its tensors do not match the stored checksum.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise MissingFileError(f"tensor file {str(source)!r} does not exist")
    header = _read_header(source)
    if header.get(_FORMAT) != FORMAT_NAME:
        raise WeightFormatError(
            f"{str(source)!r} is a safetensors file but not one written by PixelWizard (no "
            f"{_FORMAT!r} = {FORMAT_NAME!r} in its metadata); it has no checksum or metadata to read")
    version = header.get(_VERSION, "?")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise WeightFormatError(
            f"{str(source)!r} has format version {version!r}; this PixelWizard reads up to {FORMAT_VERSION}. "
            "Update PixelWizard to read it")
    if kind is not None and header.get(_KIND) != kind:
        raise WeightFormatError(
            f"{str(source)!r} holds {header.get(_KIND)!r} data, but {kind!r} was expected; pick the right file")
    tensors = _read_tensors(source)
    actual = tensors_sha256(tensors, {k: v for k, v in header.items() if not k.startswith(RESERVED_PREFIX)})
    if actual != header.get(_SHA):
        raise WeightFormatError(
            f"{str(source)!r} is damaged: its tensors or metadata do not match the checksum stored when it was written "
            f"(sha256 {actual[:16]}... instead of {str(header.get(_SHA))[:16]}...). The file was changed or "
            "corrupted after saving; write it again from its source")
    metadata = _decode_metadata(source, header)
    if torch.device(device) != torch.device("cpu"):
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


# --------------------------------------------------------------------------------------------------


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ConfigError("save_tensor_file needs a non-empty dict of name -> tensor")
    prepared: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        if not torch.is_tensor(value) or value.layout != torch.strided:
            raise ConfigError(f"tensor {name!r} must be a dense torch.Tensor, got {type(value).__name__}")
        # A private copy: safetensors refuses tensors sharing memory, and we hash exactly what is written.
        prepared[name] = value.detach().to("cpu", copy=True).contiguous()
    return prepared


def _encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a dict, got {type(metadata).__name__}")
    encoded: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"metadata keys must be non-empty strings, got {key!r}")
        if key.startswith(RESERVED_PREFIX) or key == "__metadata__":
            raise ConfigError(f"metadata key {key!r} is reserved; use a name not starting with {RESERVED_PREFIX!r}")
        try:
            encoded[key] = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"metadata {key!r} = {value!r:.80} cannot be stored as JSON ({e}); use str, int, float (finite), "
                "bool, None, lists and dicts with string keys") from e
    return encoded


def _read_header(source: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise WeightFormatError(
            f"{str(source)!r} is not a readable safetensors file ({e}); it may be truncated or not a tensor "
            "file at all. Write it again from its source") from e


def _read_tensors(source: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(source))
    except Exception as e:
        raise WeightFormatError(
            f"{str(source)!r} cannot be read as safetensors ({e}); it is probably truncated. "
            "Write it again from its source") from e


def _decode_metadata(source: Path, header: Mapping[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for key, text in header.items():
        if key.startswith(RESERVED_PREFIX):
            continue
        try:
            metadata[key] = json.loads(text)
        except ValueError as e:
            raise WeightFormatError(f"metadata {key!r} in {str(source)!r} is not valid JSON ({e}); the file was "
                                    "edited by hand or damaged") from e
    return metadata
