"""Files that are complete or absent: written under a hidden temporary name, then published.

Every writer of the library (videos, latents and anchors in ``io``, converted weights in ``loading``) goes
through these two functions, so an interrupted or failed write never leaves a file under its final name.
"""

from __future__ import annotations

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
