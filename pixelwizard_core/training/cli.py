"""``python -m pixelwizard_core train`` (shortcut fine-tuning) and ``metrics`` (mHD-MSE / mHD-LPIPS).

Every option of the objective is a flag, so an ablation is one flag: ``--index_sampling uniform``,
``--calibration_power 0``, ``--beta 1.0``, ``--sc_rate 0`` (plain flow matching), ``--step_size_conditioning
log_snr_span``. Several GPUs: ``torchrun --nproc_per_node N -m pixelwizard_core train ...`` (FSDP).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.paths import check_folder
from ..models.hr import STEP_SIZE_CONDITIONINGS
from .checkpoint import MODEL_FILE, latest_checkpoint, list_checkpoints
from .degrade import DegradeConfig
from .objective import LOSS_NORMALIZATIONS, TIMESTEP_WEIGHTINGS, ShortcutConfig
from .schedule import CALIBRATION_REFERENCES, INDEX_SAMPLINGS
from .trainer import OptimConfig

log = logging.getLogger("pixelwizard")
DEFAULTS, OPTIM, DEGRADE = ShortcutConfig(), OptimConfig(), DegradeConfig()


def _size(text: str) -> tuple[int, int]:
    """'448*256' or '448x256' (width, height) -> (height, width)."""
    for sep in ("*", "x"):
        if sep in text:
            width, height = text.split(sep)
            return int(height), int(width)
    raise argparse.ArgumentTypeError(f"expected WIDTH*HEIGHT, got {text!r}")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and models")
    g.add_argument("--data", required=True, help="folder (or .txt list) of clips with .txt prompts and/or latent files")
    g.add_argument("--output_dir", required=True, help="checkpoints go to <output_dir>/checkpoint_NNNNNN/")
    g.add_argument("--init", help="HR checkpoint (2k/model.pt, a trained model.safetensors) or base DiT to start from; "
                                  "not needed when resuming")
    g.add_argument("--vae_path", help="Wan2.2 VAE (needed for clips)")
    g.add_argument("--text_encoder", help="umT5 file (needed for prompts without a stored context)")
    g.add_argument("--empty_context", help="tensor file with 'context': the \"\" prompt's umT5 rows, for CFG dropout "
                                           "without the text encoder")
    g.add_argument("--width", type=int, help="training clip width (multiple of 32)")
    g.add_argument("--height", type=int, help="training clip height (multiple of 32)")
    g.add_argument("--frames", type=int, help="training clip frames (4n+1)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model trains (cuda with torchrun: each process's own GPU)")
    g.add_argument("--t5_device", help="where the text encoder runs (default: --device)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: FSDP mixed precision (float32 master weights and optimiser); fp32: all float32")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--attention", choices=("auto", "sdpa", "flash"), default="auto",
                   help="attention backend; auto: the fastest that runs on the device")
    g.add_argument("--trainable", choices=("all", "conditioning"), default="all",
                   help="all weights (the reference's --trainable_backbone) or only dt_embedding + spatial_adapter")


def _add_objective(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shortcut objective (defaults: the reference trainer)")
    g.add_argument("--step_size_conditioning",
                   help=f"registered name ({', '.join(sorted(STEP_SIZE_CONDITIONINGS))}, or one a --plugin adds); "
                        "default: the one the --init checkpoint was trained with (sinusoidal for the release)")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (e.g. one that calls register_step_size_conditioning); repeatable")
    g.add_argument("--shift", type=float, default=DEFAULTS.shift, help="training grid time shift (4K config: 5.8)")
    g.add_argument("--sc_rate", type=float, default=DEFAULTS.sc_rate, help="share of self-consistency steps")
    g.add_argument("--t_anchors", type=float, nargs="+", default=list(DEFAULTS.t_anchors), help="SC timesteps T")
    g.add_argument("--dt_candidates", type=int, default=DEFAULTS.dt_candidates, help="K: dt = floor(T/2^k), k < K")
    g.add_argument("--index_sampling", choices=INDEX_SAMPLINGS, default=DEFAULTS.index_sampling,
                   help="how the step-size index k is drawn")
    g.add_argument("--beta", type=float, default=DEFAULTS.beta, help="p(k) ~ exp(-beta k)")
    g.add_argument("--calibration_power", type=float, default=DEFAULTS.calibration_power,
                   help="noise-span weight (span / mean)^p; 0 turns calibration off")
    g.add_argument("--calibration_clamp", type=float, nargs=2, default=list(DEFAULTS.calibration_clamp),
                   metavar=("LOW", "HIGH"), help="bounds of the noise-span weight")
    g.add_argument("--calibration_reference", choices=CALIBRATION_REFERENCES, default=DEFAULTS.calibration_reference,
                   help="batch: mean span of the batch (reference; a no-op with one sample per batch); running: a "
                        "running mean")
    g.add_argument("--timestep_weighting", choices=TIMESTEP_WEIGHTINGS, default=DEFAULTS.timestep_weighting,
                   help="per-timestep loss weight")
    g.add_argument("--loss_normalization", choices=LOSS_NORMALIZATIONS, default=DEFAULTS.loss_normalization,
                   help="weight_sum: sum(w mse)/sum(w) (reference: weights cancel with one sample per batch); "
                        "mean: mean(w mse)")
    g.add_argument("--sc_loss_weight", type=float, default=DEFAULTS.sc_loss_weight,
                   help="weight of the self-consistency loss beside the flow-matching loss")
    g.add_argument("--cfg_dropout", type=float, default=DEFAULTS.cfg_dropout,
                   help="share of samples trained with the empty prompt (for classifier-free guidance)")


def _add_anchor(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("anchor synthesis from clips")
    g.add_argument("--anchor_down", type=float, nargs=2, default=list(DEGRADE.down_range), metavar=("LOW", "HIGH"),
                   help="area factor range")
    g.add_argument("--anchor_size", type=_size, default=DEGRADE.size, help=f"degraded frame size WIDTH*HEIGHT (default: {DEGRADE.size[1]}*{DEGRADE.size[0]})")
    g.add_argument("--anchor_blur_kernels", type=int, nargs="+", default=list(DEGRADE.blur_kernels),
                   help="Gaussian blur kernel sizes, one drawn per clip")
    g.add_argument("--anchor_blur_sigma", type=float, nargs=2, default=list(DEGRADE.blur_sigma_range),
                   metavar=("LOW", "HIGH"), help="blur sigma range")
    g.add_argument("--anchor_noise_prob", type=float, default=DEGRADE.noise_prob,
                   help="probability of adding noise to the degraded clip")
    g.add_argument("--anchor_noise_max", type=float, default=DEGRADE.noise_max,
                   help="largest noise standard deviation")


def _add_optim(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation and checkpoints (defaults: the reference's 4K config)")
    g.add_argument("--steps", type=int, required=True, help="total optimiser steps (a resumed run continues to it)")
    g.add_argument("--batch_size", type=int, default=1, help="per process")
    g.add_argument("--lr", type=float, default=OPTIM.lr, help="AdamW learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=list(OPTIM.betas), metavar=("B1", "B2"),
                   help="AdamW betas")
    g.add_argument("--weight_decay", type=float, default=OPTIM.weight_decay, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=OPTIM.grad_clip, help="0: off")
    g.add_argument("--ema_decay", type=float, default=OPTIM.ema_decay, help="0: no EMA")
    g.add_argument("--ema_start", type=int, default=OPTIM.ema_start, help="step from which the EMA is updated")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and dropout")
    g.add_argument("--save_every", type=int, default=50, help="checkpoint interval in steps")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints kept (0: all)")
    g.add_argument("--export_pt", action="store_true", help="also write the reference's model.pt layout")
    g.add_argument("--resume", default="auto", help="auto (latest checkpoint in --output_dir), none, or a folder")
    g.add_argument("--log_every", type=int, default=1, help="log the losses every N steps")


def add_subcommand(subparsers: argparse._SubParsersAction,
                   formatter: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> None:
    """Register ``train`` and ``metrics`` on the main parser's subcommands (``formatter``: the main parser's,
    which shows every default)."""
    train = subparsers.add_parser("train", help="shortcut fine-tuning of the HR model (research baseline)",
                                  description=__doc__.splitlines()[0], formatter_class=formatter)
    for add in (_add_data, _add_objective, _add_anchor, _add_optim):
        add(train)
    train.set_defaults(run=cmd_train)
    metrics = subparsers.add_parser("metrics", help="mHD-MSE / mHD-LPIPS of videos (detail metrics)",
                                    formatter_class=formatter)
    metrics.add_argument("videos", nargs="+", help="mp4 files, or tensor files with 'frames'")
    metrics.add_argument("--scales", type=int, nargs="+", default=[3, 4, 5], help="k: downsample by 2^k")
    metrics.add_argument("--reduce", choices=("mean", "sum"), default="mean",
                         help="mean over k (paper) or sum (the reference's script)")
    metrics.add_argument("--lpips", action="store_true", help="also mHD-LPIPS (needs lpips and its weights)")
    metrics.add_argument("--device", default="cpu", help="where LPIPS runs")
    metrics.add_argument("--json", help="write the scores here (default: printed only)")
    metrics.set_defaults(run=cmd_metrics)


# --- train ---------------------------------------------------------------------------------------


def objective_config(args: argparse.Namespace) -> ShortcutConfig:
    return ShortcutConfig(
        shift=args.shift, sc_rate=args.sc_rate, t_anchors=tuple(args.t_anchors), dt_candidates=args.dt_candidates,
        index_sampling=args.index_sampling, beta=args.beta, calibration_power=args.calibration_power,
        calibration_clamp=tuple(args.calibration_clamp), calibration_reference=args.calibration_reference,
        timestep_weighting=args.timestep_weighting, loss_normalization=args.loss_normalization,
        sc_loss_weight=args.sc_loss_weight, cfg_dropout=args.cfg_dropout)


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       ema_decay=args.ema_decay, ema_start=args.ema_start)


def degrade_config(args: argparse.Namespace) -> DegradeConfig:
    return DegradeConfig(down_range=tuple(args.anchor_down), size=tuple(args.anchor_size),
                         blur_kernels=tuple(args.anchor_blur_kernels), blur_sigma_range=tuple(args.anchor_blur_sigma),
                         noise_prob=args.anchor_noise_prob, noise_max=args.anchor_noise_max)


def resume_folder(choice: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refused over existing checkpoints)."""
    if choice == "auto":
        return latest_checkpoint(output_dir)
    if choice == "none":
        if list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir} already holds checkpoints; resume them (--resume auto) or choose "
                              "another --output_dir")
        return None
    folder = Path(choice)
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"--resume {choice}: not a checkpoint folder (no {MODEL_FILE})")
    return folder


def cmd_train(args: argparse.Namespace) -> None:
    from ..loading import load_t5, load_t5_tokenizer, load_vae
    from ..pipeline.text import TextEncoder
    from .build import build_training_model
    from .data import ClipSettings, TrainingData, check_items, discover, sample_order
    from .objective import ShortcutObjective
    from .sharding import init_distributed, shutdown, training_device
    from .trainer import Trainer

    # every check before anything heavy is loaded
    for module in args.plugin:
        _import_plugin(module)
    if args.step_size_conditioning and args.step_size_conditioning not in STEP_SIZE_CONDITIONINGS:
        raise ConfigError(f"unknown --step_size_conditioning {args.step_size_conditioning!r}; registered: "
                          f"{', '.join(sorted(STEP_SIZE_CONDITIONINGS))} (a --plugin module can register more)")
    objective, optim, degrade = objective_config(args), optim_config(args), degrade_config(args)
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError(f"--steps and --batch_size must be >= 1, got {args.steps} and {args.batch_size}")
    sizes = (args.width, args.height, args.frames)
    clip = ClipSettings(*sizes) if all(v is not None for v in sizes) else None
    items = discover(args.data)
    check_items(items, have_vae=bool(args.vae_path), have_text=bool(args.text_encoder), have_clip=clip is not None,
                have_empty=bool(args.empty_context), cfg_dropout=objective.cfg_dropout)
    output = Path(args.output_dir)
    check_folder(output, make_dirs=True)
    resume = resume_folder(args.resume, output)
    init = resume / MODEL_FILE if resume else args.init
    if resume is not None and args.step_size_conditioning:
        _check_same_conditioning(resume, args.step_size_conditioning)
    if init is None:
        raise ConfigError("nothing to start from: pass --init (an HR checkpoint or the base DiT) or resume a run")
    empty = _empty_context(args.empty_context) if args.empty_context else None

    world = init_distributed(args.device, need_group=args.precision == "bf16")
    device = training_device(args.device, world)
    model = build_training_model(init, step_size_conditioning=args.step_size_conditioning, device=device,
                                 shard=world.world_size > 1 or args.precision == "bf16", precision=args.precision,
                                 activation_checkpointing=args.gradient_checkpointing, trainable=args.trainable,
                                 seed=args.seed)
    model.set_attention_backend(args.attention)
    vae = load_vae(args.vae_path, dtype="fp32", device=device) if args.vae_path else None
    text = None
    if args.text_encoder:
        t5_device = args.t5_device or device
        text = TextEncoder(load_t5(args.text_encoder, dtype="bf16", device=t5_device),
                           load_t5_tokenizer(args.text_encoder))
    data = TrainingData(items, vae=vae, text_encoder=text, empty_context=empty, clip=clip, degrade=degrade,
                        cfg_dropout=objective.cfg_dropout)
    metadata = {"init": str(args.init or init), "data": str(args.data), "precision": args.precision,
                "batch_size": args.batch_size, "world_size": world.world_size, "seed": args.seed}
    trainer = Trainer(model, ShortcutObjective(objective, device), optim, seed=args.seed, world=world,
                      generator_device=device, metadata=metadata)
    if resume is not None:
        trainer.resume(resume, load_weights=False)

    def batches(step: int):
        indices = sample_order(step, args.batch_size, len(data), args.seed, world.rank, world.world_size)
        return data.batch(indices, trainer.generator)

    try:
        trainer.fit(batches, args.steps, output_dir=output, save_every=args.save_every, keep_last=args.keep_last,
                    export_pt=args.export_pt, log_every=args.log_every)
    finally:
        shutdown()


def _import_plugin(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"--plugin {module}: cannot import it ({error}); is it on PYTHONPATH?") from error


def _check_same_conditioning(folder: Path, requested: str) -> None:
    from .checkpoint import read_metadata

    recorded = read_metadata(folder / MODEL_FILE).get("step_size_conditioning", "sinusoidal")
    if recorded != requested:
        raise ConfigError(f"{folder} was trained with --step_size_conditioning {recorded}; a resumed run keeps it "
                          f"(asked for {requested}). Start a new run with --init {folder / MODEL_FILE} to switch.")


def _empty_context(path: str) -> torch.Tensor:
    from ..io.latents import load_tensor_file

    tensors, _ = load_tensor_file(path)
    if "context" not in tensors:
        raise ConfigError(f"--empty_context {path} has no 'context' tensor (has {sorted(tensors)})")
    return tensors["context"]


# --- metrics -------------------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace) -> None:
    from ..metrics import video_scores

    results, totals = {}, {}
    for path in args.videos:
        scores = video_scores(path, scales=args.scales, reduce=args.reduce, lpips=args.lpips, device=args.device)
        results[path] = {s.metric: {"value": s.value, "per_scale": s.per_scale} for s in scores}
        for score in scores:
            log.info("%s: %s", path, score.summary())
            totals.setdefault(score.metric, []).append(score.value)
    if len(args.videos) > 1:
        for metric, values in totals.items():
            log.info("%s over %d videos: %.6g", metric, len(values), sum(values) / len(values))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
