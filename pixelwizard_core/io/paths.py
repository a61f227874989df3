"""Output paths: up-front writability checks and atomic publication (temporary name + rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError


def check_writable(path: str | os.PathLike, *, overwrite: bool = False, make_dirs: bool = False) -> Path:
    """Check, before any heavy work, that a file can be created at ``path``; returns it as a Path.

    Raises ConfigError when the file exists (and ``overwrite`` is False), when the path is a folder,
    when its folder is missing (created instead if ``make_dirs``) or not a folder, or when a probe file
    cannot be created there (permissions, read-only file system). The probe is a real file, so ACLs and
    read-only mounts are caught where ``os.access`` would say yes.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"output path {str(target)!r} is a folder; give a file name inside it")
    if target.exists() and not overwrite:
        raise ConfigError(
            f"output file {str(target)!r} already exists; choose another name, delete it, or pass overwrite=True")
    check_folder(target.parent, make_dirs)
    return target


def check_folder(folder: Path, make_dirs: bool = False) -> None:
    """ConfigError unless ``folder`` is an existing folder we can create files in (made first if asked)."""
    if make_dirs and not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create output folder {str(folder)!r}: {e.strerror or e}") from e
    if not folder.exists():
        raise ConfigError(f"output folder {str(folder)!r} does not exist; create it first")
    if not folder.is_dir():
        raise ConfigError(f"output folder {str(folder)!r} is not a folder (a file has that name)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pw-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write into output folder {str(folder)!r}: {e.strerror or e}; check its permissions, "
            "or choose another folder") from e


