"""``python -m pixelwizard_core generate|anchor|upscale|decode``: the reference's command line, stage by stage.

Every check (files, sizes, frame counts, output folders) runs before a model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import setup_cli
from .errors import PixelWizardError
from .io.paths import check_folder
from .pipeline.anchors import Anchor, load_hr_latent, save_hr_latent
from .pipeline.demo import demo_models
from .pipeline.jobs import PromptJob, output_path, read_prompts
from .pipeline.models import LOAD_MODES, ModelFiles, Models
from .models.attention import attention_choices
from .pipeline.presets import HR_CFG, HR_PRESETS, LR_DEFAULTS, StageSettings, check_stage, parse_resolution, prompt_seeds
from .pipeline.engine import DecodeSettings
from .pipeline.runner import PixelWizard, StageStats
from .pipeline.tile_plan import ORDERS, PATCH_DIMS
from .pipeline.tiled_decode import BLEND_MODES
from .sampling import solver_choices
from .system import DEVICE_CHOICES, resolve_device, stop_on_signals, supported_dtype

log = logging.getLogger("pixelwizard")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- arguments ---------------------------------------------------------------------------------


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_models(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights and placement")
    g.add_argument("--ckpt_dir", help="official Wan-AI/Wan2.2-TI2V-5B folder")
    g.add_argument("--dit", help="base DiT file (e.g. Comfy-Org wan2.2_ti2v_5B_fp16.safetensors)")
    g.add_argument("--text_encoder", help="umT5 file (e.g. umt5_xxl_fp16.safetensors)")
    g.add_argument("--vae_path", help="VAE file (Wan2.2_VAE.pth or wan2.2_vae.safetensors)")
    g.add_argument("--lr_ckpt", help="PixelWizard LR checkpoint (lr/model.pt); default: the base DiT")
    g.add_argument("--hr_ckpt", help="PixelWizard HR checkpoint (2k/model.pt or 4k/model.pt)")
    g.add_argument("--device", default="auto", metavar="|".join(DEVICE_CHOICES),
                   help="auto: a CUDA or ROCm GPU, else Apple MPS, else the CPU")
    g.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT and text encoder precision")
    g.add_argument("--vae_dtype", choices=DTYPES, default="fp32")
    g.add_argument("--model_load_mode", choices=LOAD_MODES, default="auto")
    g.add_argument("--offload_model", type=_str2bool, default=None, help="move idle models to the CPU")
    g.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    g.add_argument("--block_swap", type=int, default=0, metavar="N",
                   help="stream the last N of the LR and HR DiTs' 30 blocks from pinned CPU memory while they run "
                        "(small GPUs; ~0.33 GB of bf16 weights off the GPU per block, same output); the DiTs then "
                        "wait on the CPU between stages. 0 = off")
    g.add_argument("--attention", choices=attention_choices(), default="auto",
                   help="attention backend; auto: the fastest that runs on the device")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiTs' blocks (same numerics; the first step compiles, later ones are faster)")


def _add_prompts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt")
    g.add_argument("--prompt_file", help=".txt (one prompt per line) or JSONL")
    g.add_argument("--negative_prompt", default="", help="default: Wan's negative prompt")
    g.add_argument("--base_seed", type=int, default=0, help="-1 for random")


def _add_lr(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LR anchor stage")
    g.add_argument("--lr_size", default=f"{LR_DEFAULTS.width}*{LR_DEFAULTS.height}")
    g.add_argument("--frame_num", type=int, default=LR_DEFAULTS.frames)
    g.add_argument("--lr_steps", type=int, default=LR_DEFAULTS.steps)
    g.add_argument("--lr_shift", type=float, default=LR_DEFAULTS.shift)
    g.add_argument("--lr_guide_scale", type=float, default=LR_DEFAULTS.cfg)
    g.add_argument("--sample_solver", choices=solver_choices(hr=False), default="unipc")


def _add_hr(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HR stage")
    g.add_argument("--resolution", default="2k",
                   help=f"{', '.join(HR_PRESETS)} or WIDTHxHEIGHT (multiples of 32)")
    g.add_argument("--hr_steps", type=int, help="default: the preset's (4)")
    g.add_argument("--hr_shift", type=float, help="default: the preset's (5.5 for 2k, 5.8 for 4k, else 5.5)")
    g.add_argument("--hr_guide_scale", type=float, default=HR_CFG)
    g.add_argument("--hr_solver", choices=solver_choices(hr=True), default="unipc")


def _add_decode(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode and output")
    g.add_argument("--video_dir", default="outputs/videos")
    g.add_argument("--num_patches", type=int, default=0,
                   help="decode tiles per split axis; 0 (default) = automatic: the fewest that fit the GPU's free "
                        "memory (then --patch_dim is chosen and --decode_order frame may become tile), or on a "
                        "CPU the reference's (3 at 2K, 4 at 4K, else 1)")
    g.add_argument("--patch_dim", choices=PATCH_DIMS, default="w", help=PATCH_DIMS.choices_text())
    g.add_argument("--overlap", type=int, default=3, help="latent columns added on each interior tile side")
    g.add_argument("--blend", choices=BLEND_MODES, default="cosine", help=BLEND_MODES.choices_text())
    g.add_argument("--decode_order", choices=ORDERS, default="frame",
                   help=ORDERS.choices_text())
    g.add_argument("--decode_budget_gib", type=float, default=0.0,
                   help="cap on the decode's memory beyond the VAE weights, in GiB per GPU (per process with "
                        "torchrun), used to choose automatic tiles and the order: min(cap, free memory); on a CPU "
                        "the cap alone. 0 (default) = the free memory only")
    g.add_argument("--crf", type=int, default=10, help="libx264 CRF, 0 best .. 51 worst (10 ~ reference quality 8)")
    g.add_argument("--png", action="store_true", help="also write PNG frames, in <video_dir>/<name>_frames/")
    g.add_argument("--overwrite", action="store_true", help="replace outputs instead of adding _N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelwizard", description="PixelWizard 2K/4K video on Wan2.2-TI2V-5B")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="prompts -> anchor -> HR latent -> video")
    for add in (_add_models, _add_prompts, _add_lr, _add_hr, _add_decode):
        add(generate)
    generate.add_argument("--save_dir", help="also save HR latents (safetensors) here")
    g = generate.add_argument_group("several processes (run under torchrun; see pixelwizard_core.distributed.launch)")
    g.add_argument("--ulysses_size", type=int, default=1, help="sequence-parallel degree: 1 or the number of processes")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiTs over the processes (FSDP, a unit per block)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder over the processes")
    setup_cli.add_generate_options(generate)
    anchor = sub.add_parser("anchor", help="prompts -> anchor files")
    for add in (_add_models, _add_prompts, _add_lr):
        add(anchor)
    anchor.add_argument("--anchor_dir", default="outputs/anchors")
    anchor.add_argument("--overwrite", action="store_true")
    upscale = sub.add_parser("upscale", help="anchor files -> HR latents (and videos)")
    for add in (_add_models, _add_hr, _add_decode):
        add(upscale)
    upscale.add_argument("anchors", nargs="+", help="anchor files")
    upscale.add_argument("--hr_seed", type=int, help="default: the anchor's seed + 9900, as generate derives it")
    upscale.add_argument("--negative_prompt", help="default: the anchor's")
    upscale.add_argument("--save_dir", default="outputs/latents")
    upscale.add_argument("--latent_only", action="store_true", help="save the HR latent, do not decode")
    decode = sub.add_parser("decode", help="HR latent files -> videos")
    for add in (_add_models, _add_decode):
        add(decode)
    decode.add_argument("latents", nargs="+", help="HR latent files")
    for name, command in COMMANDS.items():
        sub.choices[name].set_defaults(run=command)
    for module in PLUGINS:
        importlib.import_module(module).add_subcommand(sub)
    return parser


# --- settings from arguments -------------------------------------------------------------------


def lr_settings(args: argparse.Namespace) -> StageSettings:
    width, height, _ = parse_resolution(args.lr_size)
    settings = StageSettings(width, height, args.frame_num, args.lr_steps, args.lr_shift, args.lr_guide_scale,
                             args.sample_solver)
    check_stage(settings, hr=False)
    return settings


def hr_settings(args: argparse.Namespace, frames: int) -> StageSettings:
    width, height, preset = parse_resolution(args.resolution)
    steps = args.hr_steps or (preset.steps if preset else 4)
    shift = args.hr_shift or (preset.shift if preset else 5.5)
    settings = StageSettings(width, height, frames, steps, shift, args.hr_guide_scale, args.hr_solver)
    check_stage(settings, hr=True)
    return settings


def decode_settings(args: argparse.Namespace) -> DecodeSettings:
    # num_patches 0 stays 0: the decode resolves it from the latent's size and the VAE device's free memory
    if args.num_patches < 0:
        from .errors import ConfigError  # local: this function is edited apart from the module's imports

        raise ConfigError(f"--num_patches must be 0 (automatic) or a tile count of 1 or more, got {args.num_patches}")
    budget = getattr(args, "decode_budget_gib", 0.0)
    if not budget >= 0 or budget == float("inf"):  # also refuses nan
        from .errors import ConfigError

        raise ConfigError(f"--decode_budget_gib must be 0 (no cap: the GPU's free memory) or a number of GiB, got "
                          f"{budget}")
    return DecodeSettings(args.num_patches, args.patch_dim, args.overlap, args.blend, args.decode_order,
                          crf=args.crf, budget_bytes=int(budget * 2**30) if budget else None)


def make_models(args: argparse.Namespace, *roles: str) -> Models:
    if getattr(args, "demo", False):
        return demo_models(args.device, DTYPES[args.dtype], args.attention)
    files = ModelFiles.resolve(ckpt_dir=args.ckpt_dir, dit=args.dit, text_encoder=args.text_encoder,
                               vae=args.vae_path, lr_ckpt=args.lr_ckpt, hr_ckpt=args.hr_ckpt)
    files.require(*roles)
    files.check_kinds(*roles)
    device = torch.device(args.device)
    return Models(files, device=device, dtype=supported_dtype(DTYPES[args.dtype], device),
                  vae_dtype=supported_dtype(DTYPES[args.vae_dtype], device),
                  load_mode=args.model_load_mode, offload=args.offload_model, t5_cpu=args.t5_cpu,
                  attention=args.attention, block_swap=args.block_swap, compile_blocks=args.compile)


def make_pipeline(args: argparse.Namespace, *roles: str) -> PixelWizard:
    """One process, or (under torchrun, or with the parallel options) this rank of a multi-process run."""
    models = make_models(args, *roles)
    if getattr(args, "ulysses_size", 1) > 1 or getattr(args, "dit_fsdp", False) or getattr(args, "t5_fsdp", False) \
            or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed.launch import from_env

        return from_env(models, ulysses=args.ulysses_size, dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp)
    return PixelWizard(models)


def _bar(description: str) -> tuple[tqdm, object]:
    bar = tqdm(desc=description, unit="step", leave=False, disable=os.environ.get("RANK", "0") != "0")

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, on_step


def _run_with_bar(description: str, fn, *args, **kwargs):
    bar, on_step = _bar(description)
    try:
        return fn(*args, on_step=on_step, **kwargs)
    finally:
        bar.close()


# --- commands ----------------------------------------------------------------------------------


def _base_seed(args: argparse.Namespace) -> int:
    return random.randint(0, 2**31 - 1) if args.base_seed == -1 else args.base_seed


def cmd_generate(args: argparse.Namespace) -> None:
    setup_cli.prepare_generate(args)  # --demo settings, or weights from the models folder (--download)
    jobs = read_prompts(args.prompt, args.prompt_file)
    lr, decode = lr_settings(args), decode_settings(args)
    hr = hr_settings(args, lr.frames)
    for folder in filter(None, (args.video_dir, args.save_dir)):
        check_folder(Path(folder), make_dirs=True)
    pw = make_pipeline(args, "text", "lr", "hr", "vae")
    base = pw.share(_base_seed(args))  # every rank samples from the same seed
    for job in jobs:
        pw.stats = StageStats()
        lr_seed, hr_seed = prompt_seeds(base, job.index)
        text = pw.conditioning(job.prompt, job.negative_prompt or args.negative_prompt)
        anchor = _run_with_bar(f"[{job.index}] LR anchor", pw.anchor, text, lr, lr_seed)
        latent = _run_with_bar(f"[{job.index}] HR {hr.width}x{hr.height}", pw.upscale, anchor, text, hr, hr_seed)
        if args.save_dir and pw.is_main:
            save_hr_latent(output_path(args.save_dir, str(job.output_index), ".safetensors", overwrite=args.overwrite),
                           latent, _latent_metadata(job, anchor, hr, hr_seed, pw.identity("hr")),
                           overwrite=args.overwrite)
        video = _decode_to(pw, latent, args, str(job.output_index), decode)
        log.info("[%d] %s -> %s (lr_seed %d, hr_seed %d)", job.index, pw.stats.summary(), video, lr_seed, hr_seed)


def cmd_anchor(args: argparse.Namespace) -> None:
    jobs, lr = read_prompts(args.prompt, args.prompt_file), lr_settings(args)
    check_folder(Path(args.anchor_dir), make_dirs=True)
    pw = PixelWizard(make_models(args, "text", "lr"))
    base = _base_seed(args)
    for job in jobs:
        pw.stats = StageStats()
        lr_seed, _ = prompt_seeds(base, job.index)
        text = pw.conditioning(job.prompt, job.negative_prompt or args.negative_prompt)
        anchor = _run_with_bar(f"[{job.index}] LR anchor", pw.anchor, text, lr, lr_seed)
        path = anchor.save(output_path(args.anchor_dir, str(job.output_index), ".safetensors", overwrite=args.overwrite),
                           overwrite=args.overwrite)
        log.info("[%d] %s -> %s (seed %d)", job.index, pw.stats.summary(), path, lr_seed)


def cmd_upscale(args: argparse.Namespace) -> None:
    anchors = [(Path(p), Anchor.load(p)) for p in args.anchors]
    settings = [hr_settings(args, anchor.frames) for _, anchor in anchors]
    decode = decode_settings(args)
    check_folder(Path(args.save_dir), make_dirs=True)
    if not args.latent_only:
        check_folder(Path(args.video_dir), make_dirs=True)
    pw = PixelWizard(make_models(args, "text", "hr", *(() if args.latent_only else ("vae",))))
    for (path, anchor), hr in zip(anchors, settings):
        pw.stats = StageStats()
        hr_seed = args.hr_seed if args.hr_seed is not None else anchor.seed + 9900
        negative = args.negative_prompt if args.negative_prompt is not None else anchor.negative_prompt
        text = pw.conditioning(anchor.prompt, negative)
        latent = _run_with_bar(f"{path.stem} HR {hr.width}x{hr.height}", pw.upscale, anchor, text, hr, hr_seed)
        job = PromptJob(1, anchor.prompt)
        saved = save_hr_latent(output_path(args.save_dir, path.stem, ".safetensors", overwrite=args.overwrite),
                               latent, _latent_metadata(job, anchor, hr, hr_seed, pw.identity("hr")),
                               overwrite=args.overwrite)
        if not args.latent_only:
            saved = _decode_to(pw, latent, args, path.stem, decode)
        log.info("%s: %s -> %s (hr_seed %d)", path.name, pw.stats.summary(), saved, hr_seed)


def cmd_decode(args: argparse.Namespace) -> None:
    latents = [(Path(p), load_hr_latent(p)) for p in args.latents]
    decode = decode_settings(args)
    check_folder(Path(args.video_dir), make_dirs=True)
    pw = PixelWizard(make_models(args, "vae"))
    for path, (latent, _) in latents:
        pw.stats = StageStats()
        video = _decode_to(pw, latent, args, path.stem, decode)
        log.info("%s: %s -> %s", path.name, pw.stats.summary(), video)


def _decode_to(pw: PixelWizard, latent: torch.Tensor, args: argparse.Namespace, stem: str,
               decode: DecodeSettings) -> Path:
    path = output_path(args.video_dir, stem, ".mp4", overwrite=args.overwrite)
    png_dir = path.with_name(f"{path.stem}_frames") if args.png else None
    return _run_with_bar("decode", pw.decode, latent, path, decode, overwrite=args.overwrite, png_dir=png_dir)


def _latent_metadata(job: PromptJob, anchor: Anchor, hr: StageSettings, hr_seed: int, hr_model: str) -> dict:
    return {"prompt": job.prompt, "prompt_id": job.prompt_id, "negative_prompt": anchor.negative_prompt,
            "lr_seed": anchor.seed, "seed": hr_seed, "width": hr.width, "height": hr.height, "frames": hr.frames,
            "steps": hr.steps, "shift": hr.shift, "cfg": hr.cfg, "solver": hr.solver, "anchor_model": anchor.model,
            "hr_model": hr_model}


COMMANDS = {"generate": cmd_generate, "anchor": cmd_anchor, "upscale": cmd_upscale, "decode": cmd_decode}
# Modules that add subcommands of their own: each has add_subcommand(subparsers) registering a parser
# with set_defaults(run=function taking the parsed args).
PLUGINS: tuple[str, ...] = ("pixelwizard_core.setup_cli", "pixelwizard_core.training.cli")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        with stop_on_signals():
            if args.run in COMMANDS.values():
                args.device = str(resolve_device(args.device))
            code = args.run(args)
    except PixelWizardError as error:
        log.error("error: %s", error)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, Ctrl-Break, SIGTERM, SIGHUP: outputs were aborted on the way out
        log.error("stopped (%s): unfinished outputs were removed, finished ones kept",
                  getattr(stop, "signal_name", "SIGINT"))
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
