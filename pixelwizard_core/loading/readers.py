"""Read weight containers tensor by tensor, without ever materialising a whole file.

A *source* lists every tensor (name, shape, dtype) cheaply and reads one tensor on request:

- :class:`SafetensorsSource`: one ``.safetensors`` file; the listing comes from its JSON header only.
- :class:`ShardedSafetensorsSource`: a ``*.safetensors.index.json`` and its shards, read shard by shard.
- :class:`StateDictSource`: one section of a torch pickle (``.pt``/``.pth``) opened with
  ``weights_only=True`` and ``mmap=True``, so tensor data stays on disk until it is read.
- GGUF files: ``GGUFSource`` in :mod:`.gguf`, registered in :data:`CONTAINER_READERS`.

The container is recognised by the first bytes of the file, never by its name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import MissingFileError, UnsafeCheckpointError, WeightFormatError

log = logging.getLogger("pixelwizard")

# safetensors header dtype names -> torch dtypes (those torch can hold).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_DAMAGED = "the file is damaged or was not written by a safetensors library: download or export it again"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor (``dtype`` is a string when torch has no such dtype)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class TensorSource:
    """Base class: an ordered listing of tensors plus a way to read one of them."""

    container: str = "?"

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.infos = infos
        self.metadata: dict[str, str] = metadata or {}

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.path} ({self.container}, {len(self.infos)} tensors)"

    def close(self) -> None:
        """Release open file handles."""

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- sniffing

def sniff_container(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-legacy', 'gguf', 'index-json' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:  # checked first: a header length can start with any byte
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if head.lstrip()[:1] == b"{":
        return "index-json"
    return "unknown"


# ---------------------------------------------------------------------------------------------- safetensors

def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor listing and ``__metadata__`` of a safetensors file, from its header alone."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightFormatError(f"{path} is too short ({size} bytes) to be a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightFormatError(
                f"{path}: the safetensors header claims {n} bytes but the file has {size}; "
                "the file is truncated or not a safetensors file. Download it again."
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise WeightFormatError(f"{path}: the safetensors header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise WeightFormatError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object; "
                                f"{_DAMAGED}")
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    end = 0
    for key, entry in header.items():
        infos[key], stop = _header_entry(path, key, entry)
        end = max(end, stop)
    if 8 + n + end > size:
        raise WeightFormatError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}. "
            "Download it again."
        )
    return infos, metadata


def _header_entry(path: Path, key: str, entry: object) -> tuple[TensorInfo, int]:
    """One tensor's header entry checked: its TensorInfo and where its data ends. A damaged header must
    say so here, not fail later as a KeyError or inside the safetensors library."""
    if not isinstance(entry, dict):
        raise WeightFormatError(f"{path}: the safetensors header entry {key!r} is not an object; {_DAMAGED}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise WeightFormatError(f"{path}: the safetensors header entry {key!r} has no 'dtype'; {_DAMAGED}")
    if not isinstance(shape, list) or not all(_whole(s) for s in shape):
        raise WeightFormatError(f"{path}: the safetensors header entry {key!r} has no valid 'shape' "
                                f"(got {shape!r}); {_DAMAGED}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_whole, offsets))
            and offsets[0] <= offsets[1]):
        raise WeightFormatError(f"{path}: the safetensors header entry {key!r} has no valid 'data_offsets' "
                                f"(got {offsets!r}); {_DAMAGED}")
    return TensorInfo(tuple(shape), _ST_DTYPES.get(dtype, dtype)), offsets[1]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safe_open(path: Path) -> Any:
    """``safetensors.safe_open`` with its errors (a header the library rejects) turned into ours."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as exc:
        raise WeightFormatError(f"{path} could not be opened as a safetensors file ({exc}); {_DAMAGED}") from None


def _get_tensor(handle: Any, path: Path, key: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(key)
    except SafetensorError as exc:
        raise WeightFormatError(f"{path}: tensor {key!r} could not be read ({exc}); {_DAMAGED}") from None


class SafetensorsSource(TensorSource):
    """One safetensors file; tensors are read one at a time through ``safe_open``."""

    container = "safetensors"

    def __init__(self, path: Path) -> None:
        infos, metadata = read_safetensors_header(path)
        super().__init__(path, infos, metadata)
        self._handle: Any = None

    def read(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = _safe_open(self.path)
        return _get_tensor(self._handle, self.path, key)

    def close(self) -> None:
        self._handle = None


class ShardedSafetensorsSource(TensorSource):
    """Shards named by an index json (``weight_map``: key -> shard file); listed in shard order."""

    container = "sharded safetensors"

    def __init__(self, index_path: Path) -> None:
        weight_map = _read_weight_map(index_path)
        folder = index_path.parent
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MissingFileError(
                f"{index_path.name} names {len(shards)} shard files, but {len(missing)} are not in {folder}: "
                f"{', '.join(missing[:4])}. Download the missing shards next to the index file."
            )
        infos: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        self._shard_of: dict[str, Path] = {}
        for shard in shards:
            shard_infos, shard_meta = read_safetensors_header(folder / shard)
            metadata.update(shard_meta)
            for key, info in shard_infos.items():
                if weight_map.get(key) != shard:
                    continue  # a tensor the index does not assign to this shard: not part of the model
                infos[key] = info
                self._shard_of[key] = folder / shard
        absent = [k for k in weight_map if k not in infos]
        if absent:
            raise WeightFormatError(
                f"{index_path} lists {len(absent)} tensors that are not in their shard files, e.g. "
                f"{absent[0]!r} (expected in {weight_map[absent[0]]}). A shard is incomplete or from another "
                "release: download the folder again."
            )
        super().__init__(index_path, infos, metadata)
        self._open_path: Path | None = None
        self._handle: Any = None

    def read(self, key: str) -> torch.Tensor:
        shard = self._shard_of[key]
        if shard != self._open_path:
            self._handle = _safe_open(shard)
            self._open_path = shard
        return _get_tensor(self._handle, shard, key)

    def describe(self) -> str:
        n = len(set(self._shard_of.values()))
        return f"{self.path} (index of {n} safetensors shards, {len(self.infos)} tensors)"

    def close(self) -> None:
        self._handle = None
        self._open_path = None


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightFormatError(
            f"{index_path} is not a safetensors index (a JSON object with a 'weight_map' of key -> shard file)."
        ) from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFormatError(f"{index_path}: 'weight_map' is empty or not an object.")
    return {str(k): str(v) for k, v in weight_map.items()}


# ---------------------------------------------------------------------------------------------- pickles

class StateDictSource(TensorSource):
    """Tensors already in a mapping (one section of a torch pickle, or tensors made in memory)."""

    container = "torch pickle"

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor], section: str = "",
                 metadata: dict[str, str] | None = None) -> None:
        infos = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in tensors.items()}
        super().__init__(path, infos, metadata)
        self.section = section
        self._tensors = tensors

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def describe(self) -> str:
        where = f"['{self.section}']" if self.section else ""
        return f"{self.path}{where} ({self.container}, {len(self.infos)} tensors)"

    def close(self) -> None:
        self._tensors = {}


@dataclass
class PickleCheckpoint:
    """A torch pickle split into sections: '' = top-level tensors, other names = nested state dicts."""

    path: Path
    sections: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)  # top-level string entries (e.g. training notes)

    def source(self, section: str) -> StateDictSource:
        return StateDictSource(self.path, self.sections[section], section, self.metadata)


def open_pickle(path: Path) -> PickleCheckpoint:
    """Load a ``.pt``/``.pth`` with ``weights_only=True`` (memory-mapped when the file allows it)."""
    if os.fspath(path).endswith(".safetensors"):  # torch.load goes by this name and hands it to safetensors
        raise WeightFormatError(
            f"{path} is a torch pickle checkpoint, not a safetensors file, although its name ends in .safetensors. "
            f"Rename it to {path.with_suffix('.pt').name} and give that path, or download the real safetensors "
            "file again."
        )
    obj = _torch_load_safely(path)
    if not isinstance(obj, Mapping):
        raise WeightFormatError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors; it is not a weight checkpoint."
        )
    sections: dict[str, dict[str, torch.Tensor]] = {}
    bare = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if bare:
        sections[""] = bare
    for name, value in obj.items():
        if isinstance(value, Mapping):
            flat = dict(_flatten_tensors(value, ""))
            if flat:
                sections[str(name)] = flat
    if not sections:
        raise WeightFormatError(
            f"{path} contains no tensors (top-level entries: {', '.join(map(str, list(obj)[:8])) or 'none'})."
        )
    metadata = {str(k): v for k, v in obj.items() if isinstance(v, str)}
    return PickleCheckpoint(path, sections, metadata)


def _flatten_tensors(mapping: Mapping, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in mapping.items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(key), value
        elif isinstance(value, Mapping):
            yield from _flatten_tensors(value, f"{prefix}{key}.")


_GLOBAL_RE = re.compile(r"(?:GLOBAL|Unsupported global:?|global)\s+([\w.]+)")


def _torch_load_safely(path: Path) -> Any:
    """torch.load with weights_only=True; a pickle that wants to run code becomes UnsafeCheckpointError."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (pre-zip) serialisation cannot be memory-mapped: it is read into memory once.
            log.warning("%s uses the legacy torch format; reading it without mmap (needs its size in RAM).", path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unsafe_error(path, str(exc)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightFormatError(
            f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {str(exc)[:200]}). "
            "The file may be truncated: compare its size with the published one or download it again."
        ) from exc


def _unsafe_error(path: Path, detail: str) -> UnsafeCheckpointError:
    found = _GLOBAL_RE.search(detail)
    what = f" (it references {found.group(1)})" if found else ""
    return UnsafeCheckpointError(
        f"{path}: this pickle checkpoint tried to run code while loading{what}, so it is refused; "
        "PixelWizard only opens .pt/.pth files with torch.load(weights_only=True). "
        "If you trust where the file came from, convert it once to safetensors and load that file instead: "
        f"python -m pixelwizard_core.loading.convert \"{path}\" \"{Path(path).with_suffix('.safetensors')}\" "
        "--trust-code"
    )


# ---------------------------------------------------------------------------------------------- entry

# Containers read by their own modules, which register here when imported (loading/__init__.py imports
# them): "gguf" -> loading/gguf.py.
CONTAINER_READERS: dict[str, Callable[[Path], TensorSource]] = {}


def open_file_source(path: Path) -> TensorSource | PickleCheckpoint:
    """Open one weight file: a safetensors source, a sharded index, a GGUF file, or a pickle split into
    sections."""
    if not path.is_file():
        raise MissingFileError(f"weight file not found: {path}")
    kind = sniff_container(path)
    if kind == "safetensors":
        return SafetensorsSource(path)
    if kind in ("torch-zip", "torch-legacy"):
        return open_pickle(path)
    if kind == "index-json":
        return ShardedSafetensorsSource(path)
    if kind in CONTAINER_READERS:
        return CONTAINER_READERS[kind](path)
    raise WeightFormatError(
        f"{path} is not a weight file PixelWizard can read: looked for a safetensors header, a torch zip or "
        "legacy pickle, or a safetensors index json, and found none of them in its first bytes."
    )
