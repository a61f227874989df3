"""The identity of a weight file: what the model store keys on and what anchors and latents record.

Names alone do not tell the PixelWizard checkpoints apart (the LR, 2K and 4K models are all
``model.pt``), so an identity is the file's path below its models folder, its size and a fast content
digest: BLAKE2b of the first 64 KiB (the header, where the keys are), four 64 KiB slices at fixed
fractions of the file, and the size. Reading 320 KiB costs milliseconds even for a 20 GB file, and a
replaced or re-downloaded file with other weights gets another digest. A sharded official folder (its
``.index.json``) is identified by the index and every shard.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingFileError

SLICE_BYTES = 1 << 16
SLICE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # 1.0: the last slice, ending at the end of the file
# ComfyUI's model sub-folders: a file's name is given relative to the one it is in
MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae")


@dataclass(frozen=True)
class FileIdentity:
    """``name`` (POSIX separators, relative to its models folder), total ``size`` and content ``digest``."""

    name: str
    size: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}:{self.size}:{self.digest}"


_cache: dict[tuple, FileIdentity] = {}
_lock = threading.Lock()


def file_identity(path: str | Path) -> FileIdentity:
    """The identity of a weight file or official folder index; cached while its size and mtime hold."""
    path = Path(path)
    files = _member_files(path)
    try:
        stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except FileNotFoundError as error:
        raise MissingFileError(f"{error.filename} does not exist (any more): was it moved or deleted? "
                               "Put it back or choose the model file again") from None
    with _lock:
        if stats not in _cache:
            digest = hashlib.blake2b(digest_size=8)
            for file, (_, size, _) in zip(files, stats):
                _digest_file(digest, file, size)
            _cache[stats] = FileIdentity(display_name(path), sum(s[1] for s in stats), digest.hexdigest())
        return _cache[stats]


def display_name(path: Path) -> str:
    """The path below the ComfyUI model folder holding it (``diffusion_models/PixelWizard/2k/model.pt``),
    else its last three parts; always with ``/`` so records are alike on every platform."""
    parts = path.parts
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] in MODEL_FOLDERS:
            return "/".join(parts[index:])
    return "/".join(parts[-3:])


def _member_files(path: Path) -> list[Path]:
    files = [path]
    if path.suffix == ".json":
        files += sorted(path.parent.glob("*.safetensors"))
    return files


def _digest_file(digest: "hashlib._Hash", file: Path, size: int) -> None:
    digest.update(size.to_bytes(8, "little"))
    with open(file, "rb") as handle:
        for fraction in SLICE_FRACTIONS:
            start = min(int(size * fraction), max(size - SLICE_BYTES, 0))
            handle.seek(start)
            digest.update(handle.read(SLICE_BYTES))
