"""Convert a trusted pickle checkpoint that ``weights_only=True`` refuses into a safetensors file.

    python -m pixelwizard_core.loading.convert IN.pt OUT.safetensors --trust-code [--section generator_ema]

This is the one place where a pickle is unpickled with code execution allowed, and only when the user
passes ``--trust-code`` for a file they trust. The written file holds one state dict (tensors only) and
loads like any other weight file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError, WeightFormatError

log = logging.getLogger("pixelwizard")

_PREFERRED_SECTIONS = ("generator", "generator_ema", "state_dict", "model")


def convert_pickle_to_safetensors(src: str | Path, dst: str | Path, *, trust_code: bool,
                                  section: str | None = None) -> int:
    """Write the tensors of ``src`` (one section of it) to ``dst``; returns the number of tensors written."""
    if not trust_code:
        raise ConfigError(
            "converting a pickle runs whatever code it contains: pass trust_code=True (--trust-code) only for a "
            "file from a source you trust."
        )
    from safetensors.torch import save_file

    obj = torch.load(Path(src), map_location="cpu", weights_only=False, mmap=True)
    tensors = _pick_section(obj, section, src)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared storage: give every tensor its own contiguous copy once.
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    save_file(out, str(dst))
    log.info("wrote %d tensors from %s to %s", len(out), src, dst)
    return len(out)


def _pick_section(obj: object, section: str | None, src: str | Path) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightFormatError(f"{src} holds a {type(obj).__name__}, not a dict of tensors.")
    nested = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
    if section is not None:
        if section not in nested:
            raise ConfigError(f"{src} has no section {section!r}; it has: {', '.join(map(str, nested)) or 'none'}")
        chosen = nested[section]
    else:
        name = next((n for n in _PREFERRED_SECTIONS if n in nested), None)
        chosen = nested[name] if name else obj
    tensors = {str(k): v for k, v in chosen.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFormatError(f"{src}: no tensors found in the chosen section.")
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--trust-code", action="store_true", help="allow the pickle to run code (trusted files only)")
    parser.add_argument(
        "--section", default=None,
        help="which state dict to write (default: generator, else generator_ema, else the top-level tensors)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_pickle_to_safetensors(args.src, args.dst, trust_code=args.trust_code, section=args.section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
