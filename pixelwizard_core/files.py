"""Files that are complete or absent: written under a hidden temporary name, then published.

Every writer of the library (videos, latents and anchors in ``io``, converted weights in ``loading``) goes
through these two functions, so an interrupted or failed write never leaves a file under its final name.
Log-like files that grow by a line (a batch's manifest) use :func:`append_line`: each line whole or absent.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from .errors import ConfigError


def temporary_name(target: Path) -> Path:
    """A hidden, unique sibling of ``target``: same folder, so the final rename cannot cross file systems."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")


def publish(temporary: Path, target: Path, overwrite: bool, *, during: str = "while writing") -> None:
    """Flush a finished temporary file to disk and give it its final name.

    Without ``overwrite`` an existing target is never replaced, not even one that appeared while we were
    writing (a hard link fails where a rename would clobber); ``during`` names that time in the message.
    """
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())  # the data must be on disk before the name says the file is complete
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)
    except FileExistsError:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"{target} was created by something else {during}; nothing was replaced. Choose "
                          "another name or pass --overwrite") from None
    except OSError:  # file systems without hard links
        if target.exists():
            temporary.unlink(missing_ok=True)
            raise ConfigError(f"{target} appeared {during}; nothing was replaced") from None
        os.replace(temporary, target)
        return
    temporary.unlink()


def append_line(path: Path, line: str) -> None:
    """Append one line to a log-like file (a manifest) as a single write on an O_APPEND descriptor, then fsync:
    on a local file system lines from several processes never interleave, and a line is on disk once this
    returns. ``line`` must not contain a newline; one is added."""
    if "\n" in line:
        raise ValueError("append_line takes one line without newlines")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (line + "\n").encode("utf-8")
        if os.write(descriptor, data) != len(data):  # a short write on a regular file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
