"""Convert a trusted pickle checkpoint that ``weights_only=True`` refuses into a safetensors file.

    python -m pixelwizard_core.loading.convert IN.pt OUT.safetensors --trust-code [--section generator_ema]
        [--overwrite]
    python -m pixelwizard_core.loading.convert IN OUT.gguf --gguf [Q8_0] [--section generator_ema] [--overwrite]

``--gguf`` writes a DiT, HR DiT or umT5 file of any layout we load (read safely, no code runs) to GGUF,
the block Linears quantized (loading/gguf_write.py).

This is the one place where a pickle is unpickled with code execution allowed, and only when the user
passes ``--trust-code`` for a file they trust. The written file holds one state dict (tensors only) and
loads like any other weight file. It is written under a temporary name next to OUT and renamed once
complete, so OUT is never half-written; an existing OUT is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Mapping

import torch

from ..files import publish, temporary_name
from ..errors import ConfigError, MissingFileError, PixelWizardError, WeightFormatError

log = logging.getLogger("pixelwizard")

_PREFERRED_SECTIONS = ("generator", "generator_ema", "state_dict", "model")


def convert_pickle_to_safetensors(src: str | Path, dst: str | Path, *, trust_code: bool,
                                  section: str | None = None, overwrite: bool = False) -> int:
    """Write the tensors of ``src`` (one section of it) to ``dst``; returns the number of tensors written.
    An existing ``dst`` is replaced only when ``overwrite``."""
    if not trust_code:
        raise ConfigError(
            "converting a pickle runs whatever code it contains: pass trust_code=True (--trust-code) only for a "
            "file from a source you trust."
        )
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_paths(src, dst, overwrite)  # before the (slow, code-running) load
    tensors = _pick_section(_load_trusted(src), section, src)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared storage: give every tensor its own contiguous copy once.
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    _write_atomically(out, dst, overwrite)
    log.info("wrote %d tensors from %s to %s", len(out), src, dst)
    return len(out)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_file():
        raise MissingFileError(f"{src} does not exist (or is not a file): give the pickle checkpoint to convert")
    if dst.is_dir():
        raise ConfigError(f"{dst} is a folder: give the name of the .safetensors file to write")
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists: choose another name, delete it, or pass --overwrite")
    if not dst.parent.is_dir():
        raise ConfigError(f"the folder {dst.parent} does not exist: create it first")


def _load_trusted(src: Path) -> object:
    try:
        return torch.load(src, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, ValueError, OSError, ImportError, AttributeError) as exc:
        raise WeightFormatError(f"{src} could not be read as a torch checkpoint ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); it may be truncated or need code this Python does not have"
                                ) from exc


def _write_atomically(tensors: dict[str, torch.Tensor], dst: Path, overwrite: bool) -> None:
    """Write to a hidden temporary sibling, then publish it: ``dst`` is complete or absent."""
    from safetensors.torch import save_file

    temporary = temporary_name(dst)
    try:
        save_file(tensors, str(temporary))
        publish(temporary, dst, overwrite, during="during the conversion")
    except OSError as exc:
        raise ConfigError(f"could not write {dst}: {exc.strerror or exc}; check the folder's free space and "
                          "permissions, or choose another folder") from None
    finally:
        temporary.unlink(missing_ok=True)


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
    """The command line: 0 when written, 2 with one message for a refusal or an unreadable file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--trust-code", action="store_true", help="allow the pickle to run code (trusted files only)")
    parser.add_argument(
        "--section", default=None,
        help="which state dict to write (default: generator, else generator_ema, else the top-level tensors)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    parser.add_argument("--gguf", nargs="?", const="Q8_0", default=None, metavar="TYPE",
                        help="write GGUF instead: the block Linears in TYPE (default Q8_0, about half of bf16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.gguf:
            _to_gguf(args)
        else:
            convert_pickle_to_safetensors(args.src, args.dst, trust_code=args.trust_code, section=args.section,
                                          overwrite=args.overwrite)
    except PixelWizardError as error:
        log.error("error: %s", error)
        return 2
    except KeyboardInterrupt:  # the temporary file is already removed
        log.error("stopped: %s was not written", args.dst)
        return 130
    return 0


def _to_gguf(args: argparse.Namespace) -> None:
    from .gguf_write import convert_to_gguf

    if args.section not in (None, "generator", "generator_ema"):
        raise ConfigError(f"--section {args.section!r}: with --gguf the weights are chosen as the loader does; "
                          "pass generator (the default) or generator_ema")
    convert_to_gguf(args.src, args.dst, qtype=args.gguf.upper(), use_ema=args.section == "generator_ema",
                    overwrite=args.overwrite)


if __name__ == "__main__":
    raise SystemExit(main())
