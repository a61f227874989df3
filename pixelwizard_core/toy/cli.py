"""``python -m pixelwizard_core train-toy`` (the toy models from a seed), ``toy-check`` (the quality
checks and the broken variants), ``toy-ablation`` (the shortcut ablation on the toy world) and
``toy-install`` (the toy models into a ComfyUI models folder).

``train-toy --output DIR`` writes the four weight files and ``tokenizer.json``; without ``--output`` it
rewrites the shipped ones in the package. ``toy-check`` prints measured values and pass/fail per prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from .models import WEIGHTS_DIR

log = logging.getLogger("pixelwizard")
STEP_FIELDS = {"clips": "scenes in the HR DiT's data set", "lr_clips": "scenes in the LR DiT's data set",
               "lr_dit_steps": "LR DiT flow-matching steps", "lr_batch": "LR DiT batch size",
               "hr_pretrain_steps": "HR DiT flow-matching steps (dt = 0)",
               "hr_shortcut_steps": "HR DiT shortcut steps (from the flow-matching model)",
               "batch": "HR DiT batch size"}


def add_subcommand(subparsers: argparse._SubParsersAction,
                   formatter: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> None:
    """Register the toy commands on the main parser's subcommands."""
    from .recipe import ToyRecipe

    defaults = ToyRecipe()
    train = subparsers.add_parser("train-toy", help="train the tiny PixelWizard of the toy world from a seed",
                                  description=__doc__.splitlines()[0], formatter_class=formatter)
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random draw of the run")
    train.add_argument("--output", help=f"folder for the weights (default: the shipped ones, {WEIGHTS_DIR})")
    train.add_argument("--cache", help="folder keeping the VAE, data and models between runs (to iterate)")
    train.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1: on a shared machine more threads spin and slow down)")
    for name, what in STEP_FIELDS.items():
        train.add_argument(f"--{name}", type=int, default=getattr(defaults, name), help=what)
    train.add_argument("--vae_scale", type=float, default=1.0,
                       help="multiply the VAE's training steps (e.g. 0.01 for a quick smoke run)")
    train.set_defaults(run=cmd_train_toy)

    check = subparsers.add_parser("toy-check", help="quality checks of the pipeline on the toy models",
                                  formatter_class=formatter)
    check.add_argument("--weights", default=str(WEIGHTS_DIR), help="folder of the toy weight files")
    check.add_argument("--seed", type=int, default=0, help="seed of the LR anchor (the HR stage uses seed + 9900)")
    check.add_argument("--broken", action="store_true", help="also run each deliberately broken variant")
    check.add_argument("--json", help="write the results here")
    check.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    check.set_defaults(run=cmd_toy_check)

    ablate = subparsers.add_parser("toy-ablation", help="HR models scored from ground-truth anchors at 2/4/8 steps",
                                   formatter_class=formatter)
    ablate.add_argument("hr", nargs="*", help="HR files (e.g. trained with other ShortcutConfig options); NAME=FILE "
                                              "names a row; FILE:dt0 samples it with dt = 0 (plain flow matching)")
    ablate.add_argument("--train", metavar="CACHE",
                        help="first train the ablation variants (ablation.VARIANTS) from a `train-toy --cache` "
                             "folder's data and flow-matching start into --output; score them and that start (dt = 0)")
    ablate.add_argument("--output", default="toy_ablation", help="folder for the --train variants' HR files")
    ablate.add_argument("--json", help="write the scores here")
    ablate.add_argument("--weights", default=str(WEIGHTS_DIR), help="folder with the toy VAE and text encoder")
    ablate.add_argument("--scenes", type=int, default=8, help="validation scenes (unseen in training) per score")
    ablate.add_argument("--seeds", type=int, default=2, help="noise seeds (the spread in the table)")
    ablate.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ablate.set_defaults(run=cmd_toy_ablation)

    setup = subparsers.add_parser("toy-install", help="copy the toy models into a ComfyUI models folder",
                                  description="Copy the shipped toy models into <models>/diffusion_models, vae and "
                                              "text_encoders (each under pixelwizard_toy/), where the ComfyUI "
                                              "loaders list them; the toy sizes and settings are in demo.json.",
                                  formatter_class=formatter)
    setup.add_argument("--models", required=True, metavar="DIR", help="the models folder, e.g. ComfyUI/models")
    setup.add_argument("--weights", default=str(WEIGHTS_DIR), help="folder of the toy weight files")
    setup.set_defaults(run=cmd_toy_install)


def cmd_train_toy(args: argparse.Namespace) -> int:
    from .recipe import ToyRecipe, train_all

    torch.set_num_threads(args.threads)
    recipe = replace(ToyRecipe(), seed=args.seed, **{name: getattr(args, name) for name in STEP_FIELDS})
    phases = tuple((max(1, round(steps * args.vae_scale)), *rest) for steps, *rest in recipe.vae_phases)
    recipe = replace(recipe, vae_phases=phases)
    info = train_all(Path(args.output) if args.output else WEIGHTS_DIR, recipe, cache=args.cache)
    print(json.dumps(info["timings_s"], indent=2))
    return 0


def cmd_toy_install(args: argparse.Namespace) -> int:
    from .models import install

    for role, path in install(args.models, args.weights).items():
        log.info("%-9s %s", role, path)
    return 0


def cmd_toy_check(args: argparse.Namespace) -> int:
    from .broken import VARIANTS
    from .evaluate import TEST_PROMPTS, generate, summary, toy_pipeline

    torch.set_num_threads(args.threads)
    pw = toy_pipeline(args.weights)
    results: dict[str, list[dict]] = {"correct": []}
    for prompt in TEST_PROMPTS:
        results["correct"].append(summary(generate(pw, prompt, args.seed)))
    for name, variant in (VARIANTS.items() if args.broken else ()):
        with variant():
            results[name] = [summary(generate(pw, prompt, args.seed)) for prompt in TEST_PROMPTS]
    failed = 0
    for name, rows in results.items():
        for row in rows:
            bad = [k for k, ok in row["checks"].items() if not ok]
            failed += bool(bad) and name == "correct"
            print(f"{name:20s} {row['prompt']:52s} -> {row['colour']:6s} {row['shape']:8s} {row['motion']:7s} "
                  f"sharp {row['sharpness']:.3f} anchor {row['anchor_px']:5.1f}px seam {row['seam']:+.3f} "
                  f"{'ok' if not bad else 'FAIL: ' + ', '.join(bad)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


def cmd_toy_ablation(args: argparse.Namespace) -> int:
    import contextlib

    from ..loading import load_hr_dit
    from .ablation import score, table, validation_items
    from .broken import zero_step_size
    from .evaluate import toy_pipeline

    torch.set_num_threads(args.threads)
    specs = list(args.hr)
    if args.train:
        from .ablation import train_variants
        from .recipe import export_hr, new_hr_dit

        start = new_hr_dit(0)
        start.load_state_dict(torch.load(Path(args.train) / "hr_fm.pt", weights_only=True))
        plain = export_hr(Path(args.output) / "hr_flow_matching.safetensors", start, {"variant": "flow matching"})
        specs = [f"plain flow matching (dt = 0)={plain}:dt0"] + [
            f"{name}={path}" for name, path in train_variants(args.train, args.output).items()] + specs
    pw = toy_pipeline(args.weights)
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    with pw.models.use("vae") as vae, pw.models.use("text") as text:
        items = validation_items(vae, args.scenes)
        for spec in specs:
            name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
            path, dt0 = (path[:-4], True) if path.endswith(":dt0") else (path, False)
            model = load_hr_dit(path, dtype="fp32").eval()
            for steps in (2, 4, 8):
                with zero_step_size() if dt0 else contextlib.nullcontext():
                    runs = [score(model, vae, text, items, steps, seed * 1000) for seed in range(args.seeds)]
                results.setdefault(name, {})[steps] = runs
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
