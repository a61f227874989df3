"""A command's items as a batch: deterministic output names, ``--resume`` and the manifest.

Every output of ``generate``, ``anchor``, ``upscale`` and ``decode`` records the settings that made it (the
``run`` entry of its metadata: the mp4's comment tag, the safetensors header), so ``--resume`` can skip an
item whose output already exists with the same settings, read back from the file. Item k's output is
``<stem>.<suffix>`` (the prompt's 0-based index, or the input file's stem) whatever the order the items run in;
an existing file made with other settings is kept and the new one gets the first free ``_N`` name (or replaces
it with ``--overwrite``).

Each item's outcome is appended to ``manifest.jsonl`` in the output folder: one JSON object per line with
``index`` (1-based), ``prompt``, ``status`` (done, skipped or failed), ``seconds``, ``file``, ``group``, ``time``
(UTC, when it ended) and ``error`` for a failure. Only the process that writes the outputs (the first rank
of each group under torchrun) reads or writes that folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .distributed.groups import check_groups
from .errors import ConfigError
from .files import append_line
from .io.latents import load_tensor_file
from .io.video import read_video_metadata
from .pipeline.jobs import PromptJob, output_path
from .pipeline.presets import prompt_seeds
from .pipeline.runner import PixelWizard
from .system import launched_world_size

log = logging.getLogger("pixelwizard")

MANIFEST = "manifest.jsonl"
ROLES = {"generate": ("text", "lr", "hr", "vae"), "anchor": ("text", "lr")}  # the models a prompt command uses
RESUME_HELP = ("skip items whose output already exists in the output folder with the same settings (read back "
               "from the file's metadata); outcomes are listed in manifest.jsonl there")


def add_resume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)


def check_resume(args: argparse.Namespace) -> None:
    """Refused up front: a random base seed never gives the settings of an earlier run."""
    if getattr(args, "resume", False) and getattr(args, "base_seed", 0) == -1:
        raise ConfigError("--resume with --base_seed -1: a random seed makes other outputs than the earlier run's, "
                          "so nothing would be skipped; give the earlier run's --base_seed")


def writes_outputs(args: argparse.Namespace) -> bool:
    """Whether this process writes outputs: one process, or under torchrun the first rank of its group of
    ``--ulysses_size`` ranks (:mod:`.distributed.groups`, whose checks of the sizes run here, before any folder
    is touched); the other ranks never touch the output folders."""
    world = launched_world_size()
    if world == 1:
        return True
    size = getattr(args, "ulysses_size", 1)
    check_groups(world, size, getattr(args, "dit_fsdp", False) or getattr(args, "t5_fsdp", False))
    return int(os.environ.get("RANK", "0")) % size == 0


def run_settings(command: str, **parts: Any) -> dict:
    """What makes an output, as its metadata stores it (dataclasses as dicts, JSON types): compared on --resume."""
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}
    return json.loads(json.dumps({"command": command, **plain}, sort_keys=True))


def settings_of(path: Path) -> dict | None:
    """The ``run`` settings recorded in an output file; None when it has none or cannot be read."""
    try:
        if path.suffix == ".mp4":
            metadata = read_video_metadata(path)
        else:
            metadata = load_tensor_file(path)[1]
    except Exception as error:  # a damaged or foreign file is simply not a finished output
        log.debug("%s: settings not readable (%s)", path, error)
        return None
    run = metadata.get("run")
    return run if isinstance(run, dict) else None


def output_for(folder: str | Path, stem: str, suffix: str, settings: dict, *, resume: bool,
               overwrite: bool) -> tuple[Path, bool]:
    """(path, done): with ``resume`` an existing ``stem[_N]suffix`` made with ``settings``; otherwise where a
    new output goes (``stem.suffix``, or the first free ``stem_N.suffix`` unless ``overwrite``)."""
    if resume:
        for candidate in _existing(Path(folder), stem, suffix):
            if settings_of(candidate) == settings:
                return candidate, True
    return output_path(folder, stem, suffix, overwrite=overwrite), False


def _existing(folder: Path, stem: str, suffix: str) -> list[Path]:
    names, counter = [folder / f"{stem}{suffix}"], 1
    while names[-1].exists():
        names.append(folder / f"{stem}_{counter}{suffix}")
        counter += 1
    return names[:-1]


@dataclasses.dataclass(frozen=True)
class Target:
    """One item's output: file name without suffix, the prompt it shows, the settings that make it."""

    stem: str
    prompt: str
    settings: dict


def prompt_targets(pw: PixelWizard, jobs: list[PromptJob], args: argparse.Namespace, base_seed: int,
                   **stages: Any) -> list[Target]:
    """The outputs of ``generate`` and ``anchor``: named by prompt index, made with the prompt, the seeds, the
    stage settings, the start image and the models' identities (LoRAs included)."""
    image = image_identity(args)
    roles = ROLES[args.command] + (("vae",) if image and "vae" not in ROLES[args.command] else ())
    models = {role: pw.identity(role) for role in roles}
    return [Target(str(job.output_index), job.prompt, run_settings(
        args.command, prompt=job.prompt, negative_prompt=job.negative_prompt or args.negative_prompt,
        seeds=prompt_seeds(base_seed, job.index), models=models, image=image, **stages)) for job in jobs]


def image_identity(args: argparse.Namespace) -> dict | None:
    """``--image`` by name and content (and whether ``--pin_image_hr`` pins it), None without one."""
    path = getattr(args, "image", None)
    if not path:
        return None
    return {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "pin_hr": bool(getattr(args, "pin_image_hr", False))}


def file_target(command: str, pw: PixelWizard, roles: tuple[str, ...], source: Path, prompt: str,
                **parts: Any) -> Target:
    """The output of ``upscale`` and ``decode`` for an input file: named after it."""
    models = {role: pw.identity(role) for role in roles}
    return Target(source.stem, prompt, run_settings(command, models=models, **parts))


class Batch:
    """The items of one command run through ``pw`` (in order, or shared by the groups of a torchrun job):
    ``run(work)`` calls ``work(position, path)`` for each item this process's group takes and that --resume
    does not skip; ``work`` returns the file it wrote."""

    def __init__(self, pw: PixelWizard, args: argparse.Namespace, folder: str | Path, suffix: str,
                 targets: list[Target]) -> None:
        self.pw, self.folder, self.suffix, self.targets = pw, Path(folder), suffix, targets
        self.resume, self.overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
        self.command = args.command

    def metadata(self, position: int) -> dict:
        """What an output of item ``position`` stores: its settings, for a later --resume."""
        return {"run": self.targets[position].settings}

    def extra_output(self, position: int, folder: str | Path, suffix: str) -> Path | None:
        """Where a second output of the item goes (generate's latent, upscale's latent next to its video);
        None when --resume finds it made already."""
        path, done = output_for(folder, self.targets[position].stem, suffix, self.targets[position].settings,
                                resume=self.resume, overwrite=self.overwrite)
        return None if done else path

    def run(self, work: Callable[[int, Path], Path]) -> None:
        ok = False
        try:
            while (picked := self.pw.take(len(self.targets), self._choose)) is not None:
                position, path = picked
                self._one(position, Path(path), work)
            ok = True
        finally:
            self.pw.queue.finish(ok)  # a group that ran out of items waits for the others

    def _choose(self, position: int) -> str | None:
        """On the writing process: the item's output path, or None when --resume finds it done."""
        target = self.targets[position]
        path, done = output_for(self.folder, target.stem, self.suffix, target.settings, resume=self.resume,
                                overwrite=self.overwrite)
        if not done:
            return str(path)
        log.info("[%d/%d] skipped: %s has the same settings", position + 1, len(self.targets), path)
        self._record(position, "skipped", 0.0, path)
        return None

    def _one(self, position: int, path: Path, work: Callable[[int, Path], Path]) -> None:
        start = time.perf_counter()
        try:
            written = work(position, path)
        except BaseException as error:
            self._record(position, "failed", time.perf_counter() - start, None, str(error) or type(error).__name__)
            raise
        self._record(position, "done", time.perf_counter() - start, written)

    def _record(self, position: int, status: str, seconds: float, file: Path | None, error: str = "") -> None:
        """One manifest line, by the writing process only; a manifest that cannot be written is a warning."""
        if not self.pw.is_main:
            return
        entry = {"index": position + 1, "prompt": self.targets[position].prompt, "status": status,
                 "seconds": round(seconds, 3), "file": str(file) if file is not None else None,
                 "group": self.pw.queue.group, "command": self.command,
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if error:
            entry["error"] = error
        try:
            append_line(self.folder / MANIFEST, json.dumps(entry, ensure_ascii=False))
        except OSError as failure:
            log.warning("could not add to %s: %s", self.folder / MANIFEST, failure)
