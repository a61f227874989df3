"""First-run commands: ``download`` and ``doctor``; the models folder of every stage command (``--models``,
``--download``) and ``generate --demo``.

Registered through ``cli.PLUGINS``; the stage commands' options are added by :func:`add_model_source_options`
and applied by :func:`resolve_weights` once their arguments are checked, before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from . import download as dl
from .errors import ConfigError
from .pipeline.presets import parse_resolution

log = logging.getLogger("pixelwizard")


# --- download --------------------------------------------------------------------------------------


def add_subcommand(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter] = argparse.HelpFormatter
                   ) -> None:
    _add_download(sub, formatter)
    _add_doctor(sub, formatter)


GROUP_HELP = {"cli": "what a command-line 2K run loads", "comfyui": "what the example workflows name",
              "wan": "the Comfy-Org Wan2.2 files", "all": "every Comfy-Org and PixelWizard file"}


def _add_download(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    groups = "; ".join(f"{name}: {GROUP_HELP.get(name, 'the ' + name + ' model')} ({' '.join(keys)})"
                       for name, keys in dl.groups().items() if name != "official")
    p = sub.add_parser("download", help="fetch the model files from the Hugging Face Hub", formatter_class=formatter,
                       description="Fetch model files from the Hugging Face Hub into a models folder (ComfyUI layout: "
                                   "diffusion_models/, text_encoders/, vae/), resuming interrupted downloads and "
                                   "checking every file's keys. Respects HF_ENDPOINT, HF_TOKEN, HF_HOME and "
                                   "HF_HUB_OFFLINE.")
    p.add_argument("items", nargs="*",
                   help=f"what to fetch; default: cli, or comfyui in a ComfyUI models folder. Groups: {groups}; "
                        "official: the Wan-AI folder (34 GB). Or a file key or name (see --list)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--models", metavar="DIR",
                       help=f"a models folder, e.g. ComfyUI/models (default: {dl.default_models_dir()}; "
                            "PIXELWIZARD_MODELS changes it)")
    where.add_argument("--dir", metavar="DIR", help="any folder: every file directly inside it (default: not used)")
    p.add_argument("--text_encoder", choices=tuple(dl.TEXT_ENCODERS), default=None,
                   help="umT5 file to fetch: fp16 (11.4 GB) or fp8 scaled (6.7 GB) (default: fp8 in a ComfyUI models "
                        "folder, as the example workflows name it, else fp16)")
    p.add_argument("--dry_run", action="store_true", help="show what would be downloaded, download nothing")
    p.add_argument("--list", action="store_true", help="list the known files and where they go, then stop")
    p.set_defaults(run=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    root = Path(args.dir or args.models or dl.default_models_dir()).expanduser()
    flat = args.dir is not None
    if args.list:
        _output(list_table(root, flat))
        return 0
    items = args.items or dl.default_items(root)
    files = dl.select(items, text_encoder=args.text_encoder or dl.default_text_encoder(root))
    results = dl.download(files, root, flat=flat, dry_run=args.dry_run)
    log.info("%s:\n%s", root, summary(results))
    bad = [r for r in results if not r.ok]
    if bad:
        log.error("%d file(s) failed their check:\n%s", len(bad), "\n".join(f"  {r.problem}" for r in bad))
        return 1
    return 0


def summary(results: list[dl.FileResult]) -> str:
    """A table for people: status, size, path, and each problem."""
    lines = []
    for r in results:
        size = f"{r.size / 1e9:7.2f} GB" if r.size else "          "
        lines.append(f"  {r.status:<10} {size}  {r.path}")
        if r.problem and r.status == "bad":
            lines.append(f"      {r.problem}")
    return "\n".join(lines)


def list_table(root: Path, flat: bool) -> str:
    """The known files, one short row each (key, size, status, place in the folder); sizes of present files
    are their size on disk. The hub repositories follow, once each."""
    lines = [f"models folder: {root}" + (" (flat)" if flat else ""),
             f"{'key':<18} {'size':>7} {'status':<7} file"]
    for file in dl.known_files():
        found = dl.locate(file, root)
        place = found.relative_to(root) if found else dl.destination(file, root, flat=flat).relative_to(root)
        lines.append(f"{file.key:<18} {_size(file, found):>7} {'present' if found else 'missing':<7} "
                     f"{place.as_posix()}")
    lines.append("from https://huggingface.co/<repository>/resolve/main/<path>:")
    for repo in dict.fromkeys(f.repo for f in dl.known_files()):
        keys = [f.key for f in dl.known_files() if f.repo == repo]
        lines.append(f"  {repo}: {keys[0]} .. {keys[-1]}" if len(keys) > 3 else f"  {repo}: {', '.join(keys)}")
    return "\n".join(lines)


def _size(file: dl.ModelFile, found: Path | None) -> str:
    size = found.stat().st_size / 1e9 if found is not None else file.gigabytes
    if size is None:
        return "?"
    return "<0.1 GB" if size < 0.1 else f"{size:.1f} GB"


def _output(text: str) -> None:
    """The command's product (a table, a report) goes to stdout; messages go through logging."""
    sys.stdout.write(text + "\n")


# --- doctor ----------------------------------------------------------------------------------------


def _add_doctor(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("doctor", help="check this machine, the model files, and which presets fit",
                       formatter_class=formatter,
                       description="Report torch/CUDA, GPUs and free memory, working attention backends, ffmpeg, "
                                   "the model files, and which presets fit in which memory mode. Exit code 0: "
                                   "ready to generate; 1: something blocks generation (the report says what to do).")
    p.add_argument("--models", metavar="DIR", help=f"models folder to check (default: {dl.default_models_dir()})")
    p.add_argument("--frames", type=int, default=121, help="frame count for the memory table")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.run_checks(models_dir=args.models, frames=args.frames)
    _output(report.to_json() if args.json else report.render())
    return report.exit_code


# --- the models folder of generate, anchor, upscale, decode ------------------------------------------


def add_model_source_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """``--models`` and ``--download`` (every stage command), ``--demo`` (generate)."""
    g = p.add_argument_group("models folder and first run")
    g.add_argument("--models", metavar="DIR",
                   help=f"models folder for weights no flag gives (default: {dl.default_models_dir()}; "
                        "PIXELWIZARD_MODELS changes it)")
    g.add_argument("--download", action="store_true",
                   help="fetch the model files this run needs that are missing from the models folder, then run")
    if demo:
        from .pipeline.demo import DEMO_KINDS

        g.add_argument("--demo", nargs="?", const=DEMO_KINDS[0], default=False, choices=DEMO_KINDS,
                       help="no model files needed: 'toy' (the default) runs the tiny PixelWizard of the toy world "
                            "from pixelwizard_core/toy/weights when `train-toy` has written it there (else random "
                            "weights); 'random' builds tiny random models in memory, a pure install check (the video "
                            "is noise)")


def prepare_generate_settings(args: argparse.Namespace) -> None:
    """Before ``generate`` checks its arguments: ``--demo`` replaces the stage settings by its tiny ones."""
    if getattr(args, "demo", False):
        from .pipeline.demo import apply_demo_settings

        apply_demo_settings(args)


def prepare_generate(args: argparse.Namespace) -> None:
    """After the arguments are checked: the weight files from the models folder (none for ``--demo``)."""
    if getattr(args, "demo", False):
        return
    width, height, _ = parse_resolution(args.resolution)
    resolve_weights(args, ("text", "vae", "lr", "hr"), width, height)


def resolve_weights(args: argparse.Namespace, roles: tuple[str, ...], width: int = 0, height: int = 0) -> None:
    """Fill the weight flags of ``roles`` that no flag covers from the models folder (downloading them with
    ``--download``); a missing file stops the run with the download command to type. ``width`` x ``height``
    picks the HR checkpoint (only needed with role "hr")."""
    roles = _missing_roles(args, roles)
    if not roles:
        return
    root = Path(args.models).expanduser() if args.models else dl.default_models_dir()
    found, wanted = dl.run_files(root, width, height, roles)
    if wanted and args.download:
        results = dl.download(wanted, root)
        bad = [r.problem for r in results if not r.ok]
        if bad:
            raise ConfigError("downloaded files failed their check:\n  " + "\n  ".join(bad))
        found, wanted = dl.run_files(root, width, height, roles)
    if wanted:
        raise ConfigError(_missing_message(root, wanted, args, roles))
    for role, path in found.items():
        setattr(args, ROLE_FLAGS[role], str(path))
        log.info("%s model: %s", role, path)


ROLE_FLAGS = {"text": "text_encoder", "vae": "vae_path", "lr": "lr_ckpt", "hr": "hr_ckpt"}


def _missing_roles(args: argparse.Namespace, roles: tuple[str, ...]) -> list[str]:
    """Those of ``roles`` that no flag covers (``--ckpt_dir`` covers text, vae and lr; ``--dit`` lr)."""
    flag = lambda name: getattr(args, name, None)  # noqa: E731 (a command has only its own weight flags)
    given = {
        "text": flag("text_encoder") or flag("ckpt_dir"),
        "vae": flag("vae_path") or flag("ckpt_dir"),
        "lr": flag("lr_ckpt") or flag("dit") or flag("ckpt_dir"),
        "hr": flag("hr_ckpt"),
    }
    return [role for role in roles if not given[role]]


def _missing_message(root: Path, wanted: list[dl.ModelFile], args: argparse.Namespace, roles: list[str]) -> str:
    items = " ".join(f.key for f in wanted)
    models = f" --models {shlex.quote(str(root))}" if args.models else ""
    files = "\n".join(f"  {f.description}: {dl.destination(f, root)}" for f in wanted)
    flags = "/".join(f"--{ROLE_FLAGS[role]}" for role in roles)
    folder = " (or --ckpt_dir)" if set(roles) & {"text", "vae", "lr"} else ""
    return (f"model files for this run are missing from {root}:\n{files}\n"
            f"Download them with:\n  python -m pixelwizard_core download {items}{models}\n"
            f"or add --download to this command, or pass the files with {flags}{folder}.")
