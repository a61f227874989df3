"""Import modules of the official Wan2.2 code from a local checkout, for parity measurements only.

The official repository is never vendored: point ``--wan-repo`` (or WAN22_REPO) at a checkout of
Wan-Video/Wan2.2. Modules are imported from ``wan/modules`` as a synthetic package so that the
heavy ``wan/__init__.py`` (pipelines, diffusers schedulers) is not executed.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

PACKAGE = "wan_official_modules"


def official_module(name: str, wan_repo: str | os.PathLike | None = None) -> types.ModuleType:
    """Return the official module ``wan/modules/<name>.py`` (e.g. ``"vae2_2"``, ``"model"``, ``"t5"``)."""
    repo = Path(wan_repo or os.environ.get("WAN22_REPO", ""))
    modules_dir = repo / "wan" / "modules"
    if not modules_dir.is_dir():
        raise SystemExit(f"no official Wan2.2 checkout at {repo!s}: pass --wan-repo or set WAN22_REPO")
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(modules_dir)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|, in float64."""
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
