"""First-run commands: ``download`` and ``doctor``, and the ``generate --download`` / ``--demo`` options.

Registered through ``cli.PLUGINS``; the generate options are added by :func:`add_generate_options` and
applied by :func:`prepare_generate` before anything heavy happens.
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


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    _add_download(sub)
    _add_doctor(sub)


def _add_download(sub: argparse._SubParsersAction) -> None:
    groups = ", ".join(f"{name} ({' '.join(keys) if name != 'official' else 'the Wan-AI folder'})"
                       for name, keys in dl.groups().items())
    p = sub.add_parser("download", help="fetch the model files from the Hugging Face Hub",
                       description="Fetch model files from the Hugging Face Hub into a models folder (ComfyUI layout: "
                                   "diffusion_models/, text_encoders/, vae/), resuming interrupted downloads and "
                                   "checking every file's keys. Respects HF_ENDPOINT, HF_TOKEN, HF_HOME and "
                                   "HF_HUB_OFFLINE.")
    p.add_argument("items", nargs="*", default=list(dl.DEFAULT_ITEMS),
                   help=f"what to fetch (default: {' '.join(dl.DEFAULT_ITEMS)}): {groups}; or a file key or name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--models", metavar="DIR",
                       help=f"a models folder, e.g. ComfyUI/models (default: {dl.default_models_dir()}; "
                            "PIXELWIZARD_MODELS changes it)")
    where.add_argument("--dir", metavar="DIR", help="any folder: every file directly inside it")
    p.add_argument("--text_encoder", choices=tuple(dl.TEXT_ENCODERS), default="fp16",
                   help="umT5 file of the 'wan' set: fp16 (11.4 GB) or fp8 scaled (6.7 GB)")
    p.add_argument("--dry_run", action="store_true", help="show what would be downloaded, download nothing")
    p.add_argument("--list", action="store_true", help="list the known files and where they go, then stop")
    p.set_defaults(run=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    root = Path(args.dir or args.models or dl.default_models_dir()).expanduser()
    flat = args.dir is not None
    if args.list:
        _print_table(root, flat)
        return 0
    files = dl.select(args.items, text_encoder=args.text_encoder)
    results = dl.download(files, root, flat=flat, dry_run=args.dry_run)
    log.info("%s:\n%s", root, dl.summary(results))
    bad = [r for r in results if not r.ok]
    if bad:
        log.error("%d file(s) failed their check:\n%s", len(bad), "\n".join(f"  {r.problem}" for r in bad))
        return 1
    return 0


def _print_table(root: Path, flat: bool) -> None:
    lines = [f"{'key':<18} {'size':>8}  {'status':<8} destination  <-  url"]
    for file in dl.known_files():
        found = dl.locate(file, root)
        size = "?" if file.gigabytes is None else "small" if file.gigabytes < 0.1 else f"{file.gigabytes:.1f} GB"
        status = "present" if found else "missing"
        lines.append(f"{file.key:<18} {size:>8}  {status:<8} {found or dl.destination(file, root, flat=flat)}  <-  "
                     f"{file.url}")
    _output("\n".join(lines))


def _output(text: str) -> None:
    """The command's product (a table, a report) goes to stdout; messages go through logging."""
    sys.stdout.write(text + "\n")


# --- doctor ----------------------------------------------------------------------------------------


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this machine, the model files, and which presets fit",
                       description="Report torch/CUDA, GPUs and free memory, working attention backends, ffmpeg, "
                                   "the model files, and which presets fit in which memory mode. Exit code 0: "
                                   "ready to generate; 1: something blocks generation (the report says what to do).")
    p.add_argument("--models", metavar="DIR", help=f"models folder to check (default: {dl.default_models_dir()})")
    p.add_argument("--frames", type=int, default=121, help="frame count for the memory table (default 121)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.run_checks(models_dir=args.models, frames=args.frames)
    _output(report.to_json() if args.json else report.render())
    return report.exit_code


# --- generate --download / --demo ------------------------------------------------------------------


def add_generate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("first run")
    g.add_argument("--models", metavar="DIR",
                   help=f"models folder for weights not given by a flag (default: {dl.default_models_dir()})")
    g.add_argument("--download", action="store_true",
                   help="fetch the model files this run needs that are missing from the models folder, then generate")
    g.add_argument("--demo", action="store_true",
                   help="tiny random models built in memory, no files: proves the install end to end in seconds "
                        "(the video is noise)")


def prepare_generate(args: argparse.Namespace) -> None:
    """Before ``generate`` checks anything: demo settings, or weight files from the models folder."""
    if getattr(args, "demo", False):
        from .pipeline.demo import apply_demo_settings

        apply_demo_settings(args)
        return
    roles = _missing_roles(args)
    if not roles:
        return
    root = Path(args.models).expanduser() if args.models else dl.default_models_dir()
    width, height, _ = parse_resolution(args.resolution)
    found, wanted = dl.run_files(root, width, height, roles)
    if wanted and args.download:
        results = dl.download(wanted, root)
        bad = [r.problem for r in results if not r.ok]
        if bad:
            raise ConfigError("downloaded files failed their check:\n  " + "\n  ".join(bad))
        found, wanted = dl.run_files(root, width, height, roles)
    if wanted:
        raise ConfigError(_missing_message(root, wanted, args))
    for role, path in found.items():
        setattr(args, _ROLE_FLAGS[role], str(path))
        log.info("%s model: %s", role, path)


_ROLE_FLAGS = {"text": "text_encoder", "vae": "vae_path", "lr": "lr_ckpt", "hr": "hr_ckpt"}


def _missing_roles(args: argparse.Namespace) -> list[str]:
    """Roles that no flag covers (``--ckpt_dir`` covers text, vae and lr)."""
    given = {
        "text": args.text_encoder or args.ckpt_dir,
        "vae": args.vae_path or args.ckpt_dir,
        "lr": args.lr_ckpt or args.dit or args.ckpt_dir,
        "hr": args.hr_ckpt,
    }
    return [role for role, value in given.items() if not value]


def _missing_message(root: Path, wanted: list[dl.ModelFile], args: argparse.Namespace) -> str:
    items = " ".join(f.key for f in wanted)
    models = f" --models {shlex.quote(str(root))}" if args.models else ""
    files = "\n".join(f"  {f.description}: {dl.destination(f, root)}" for f in wanted)
    return (f"model files for this run are missing from {root}:\n{files}\n"
            f"Download them with:\n  python -m pixelwizard_core download {items}{models}\n"
            "or add --download to this command, or pass the files with --text_encoder/--vae_path/--lr_ckpt/"
            "--hr_ckpt (or --ckpt_dir).")
