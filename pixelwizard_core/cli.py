"""``python -m pixelwizard_core generate|anchor|upscale|decode``: the reference's command line, stage by stage.

Every check (arguments: :mod:`.cli_checks`; files, sizes, frame counts, output folders) runs before a model
is loaded. A user error ends as one message and exit code 2; a stop signal (SIGINT, SIGTERM, SIGHUP) aborts
the output being written, prints one line saying what was kept and exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import cli_batch
from . import cli_checks as checks
from .cli_checks import decode_settings, hr_settings, lr_settings
from . import setup_cli
from .cli_progress import RunRecord, item_label, leads_a_group, logs_above_bars, stage_bar
from .errors import ConfigError, PixelWizardError
from .io.paths import check_folder
from .loading.folders import resolve as resolve_weights_path
from .models.attention import attention_choices
from .pipeline.anchors import Anchor, load_hr_latent, save_hr_latent
from .pipeline.demo import demo_models
from .pipeline.engine import DecodeSettings
from .pipeline.jobs import PromptJob, read_prompts
from .pipeline.models import LOAD_MODES, ModelFiles, Models
from .pipeline.presets import HR_CFG, HR_PRESETS, LR_DEFAULTS, StageSettings, prompt_seeds
from .pipeline.runner import PixelWizard, StageStats
from .pipeline.tile_plan import ORDERS, PATCH_DIMS
from .pipeline.tiled_decode import BLEND_MODES
from .sampling import solver_choices
from .system import DEVICE_CHOICES, launched_world_size, resolve_device, stop_on_signals, supported_dtype

log = logging.getLogger("pixelwizard")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HR_SEED_OFFSET = 9900  # upscale's default HR seed: the anchor's + this, as generate derives them


# --- help --------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default at the end of its help, unless the help already says it; lists as typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS  # 0 is a default to show
        if not action.option_strings or "default" in text or hidden or isinstance(action, argparse._StoreConstAction):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


# --- arguments ---------------------------------------------------------------------------------


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_weights(p: argparse.ArgumentParser, roles: tuple[str, ...]) -> None:
    """The weight flags of the models ``roles`` load, and the placement options that matter for them."""
    g = p.add_argument_group("weights (default: found in the models folder)")
    served = [name for role, name in (("text", "text encoder"), ("vae", "VAE"), ("lr", "base DiT")) if role in roles]
    if served:
        g.add_argument("--ckpt_dir", help=f"official Wan-AI/Wan2.2-TI2V-5B folder (its {', '.join(served)})")
    if "lr" in roles:
        g.add_argument("--dit", help="base DiT for the LR stage when there is no --lr_ckpt (e.g. Comfy-Org "
                                     "wan2.2_ti2v_5B_fp16.safetensors)")
        g.add_argument("--lr_ckpt", help="PixelWizard LR checkpoint (PixelWizard/lr/model.pt)")
    if "hr" in roles:
        g.add_argument("--hr_ckpt", help="PixelWizard HR checkpoint (PixelWizard/2k/model.pt or 4k/model.pt)")
    if "lr" in roles:
        g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="a LoRA for the LR stage's DiT (repeatable; strength 1.0 unless given; a bare name is "
                            "looked for in the models folder's loras/)")
    if "hr" in roles:
        g.add_argument("--hr_lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="a LoRA for the HR model (repeatable). LoRAs are trained for the base model: the HR "
                            "model shares its architecture, but try a lower strength")
    if "text" in roles:
        g.add_argument("--text_encoder", help="umT5 file (e.g. umt5_xxl_fp16.safetensors)")
    if "vae" in roles:
        g.add_argument("--vae_path", help="VAE file (Wan2.2_VAE.pth or wan2.2_vae.safetensors)")
    _add_placement(p, roles)


# The placement options a command does not list keep these values (they concern models it never loads)
PLACEMENT_DEFAULTS = {"dtype": "bf16", "vae_dtype": "fp32", "model_load_mode": "auto", "offload_model": None,
                      "t5_cpu": False, "block_swap": 0, "attention": "auto", "compile": False}


def _add_placement(p: argparse.ArgumentParser, roles: tuple[str, ...]) -> None:
    dits = {"lr", "hr"} & set(roles)
    p.set_defaults(**PLACEMENT_DEFAULTS)
    g = p.add_argument_group("placement and precision")
    g.add_argument("--device", default="auto", metavar="|".join(DEVICE_CHOICES),
                   help="auto: a CUDA or ROCm GPU, else Apple MPS, else the CPU")
    if dits or "text" in roles:
        g.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT and text encoder precision")
    if "vae" in roles:
        g.add_argument("--vae_dtype", choices=DTYPES, default="fp32", help="VAE precision (bf16 halves the decode's "
                                                                           "memory)")
    if len(roles) > 1:
        g.add_argument("--model_load_mode", choices=LOAD_MODES, default="auto",
                       help="resident: keep each model loaded between prompts; reload: load it for each use")
        g.add_argument("--offload_model", type=_str2bool, default=None, metavar="true|false",
                       help="true: move each model to the CPU when its stage ends (one model on the GPU at a time); "
                            "false: keep them all on the GPU (default: true on a CUDA GPU, else false)")
    if "text" in roles:
        g.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    if dits:
        g.add_argument("--block_swap", type=int, default=0, metavar="N",
                       help="stream the last N of the DiTs' 30 blocks from pinned CPU memory while they run "
                            "(small GPUs; ~0.33 GB of bf16 weights off the GPU per block, same output); the DiTs then "
                            "wait on the CPU between stages. 0 = off")
        g.add_argument("--attention", choices=attention_choices(), default="auto",
                       help="attention backend; auto: the fastest that runs on the device")
        g.add_argument("--compile", action="store_true",
                       help="torch.compile the DiTs' blocks (same numerics; the first step compiles, later ones are "
                            "faster)")


def _add_prompts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", help="one prompt (or --prompt_file)")
    g.add_argument("--prompt_file", help=".txt (one prompt per line) or JSONL (keys prompt/text/caption, "
                                         "negative_prompt, id)")
    g.add_argument("--negative_prompt", default="", help="default: Wan's negative prompt")
    g.add_argument("--base_seed", type=int, default=0,
                   help="prompt k gets lr_seed = base + 100k and hr_seed = base + 100(k-1) + 10000; -1 for random")


def _add_image(p: argparse.ArgumentParser, *, pin: bool) -> None:
    g = p.add_argument_group("start image (image to video, TI2V)")
    g.add_argument("--image", help="PNG/JPEG file the video starts from: covered and center-cropped to the anchor "
                                   "size, VAE-encoded and kept as the first frame (every prompt gets it)")
    if pin:
        g.add_argument("--pin_image_hr", action="store_true",
                       help="pin the start image in the HR latent's first frame as well (encoded at the HR size; "
                            "untested with the released HR weights)")


def _add_lr(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LR anchor stage")
    g.add_argument("--lr_size", default=f"{LR_DEFAULTS.width}*{LR_DEFAULTS.height}",
                   help="anchor size WIDTH*HEIGHT, multiples of 32; keep the HR size's aspect ratio")
    g.add_argument("--frame_num", type=int, default=LR_DEFAULTS.frames, help="video frames, 4k+1 (121 = 5 s at 24 fps)")
    g.add_argument("--lr_steps", type=int, default=LR_DEFAULTS.steps, help="sampling steps of the anchor")
    g.add_argument("--lr_shift", type=float, default=LR_DEFAULTS.shift, help="timestep shift of the anchor's schedule")
    g.add_argument("--lr_guide_scale", type=float, default=LR_DEFAULTS.cfg, help="classifier-free guidance scale "
                                                                                 "(1 = no unconditional pass)")
    g.add_argument("--sample_solver", choices=solver_choices(hr=False), default="unipc", help="the anchor's solver")


def _add_hr(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HR stage")
    g.add_argument("--resolution", default="2k", help=f"{', '.join(HR_PRESETS)} or WIDTHxHEIGHT (multiples of 32)")
    g.add_argument("--hr_steps", type=int, help="HR sampling steps, 2..8 (default: the preset's, 4)")
    g.add_argument("--hr_shift", type=float, help="default: the preset's (5.5 for 2k, 5.8 for 4k, else 5.5)")
    g.add_argument("--hr_guide_scale", type=float, default=HR_CFG, help="classifier-free guidance scale of the HR "
                                                                        "stage")
    g.add_argument("--hr_solver", choices=solver_choices(hr=True), default="unipc",
                   help="unipc: the reference's; shortcut: the paper's plain dt update")


def _add_decode(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode and output")
    g.add_argument("--video_dir", default="outputs/videos", help="folder of the mp4 files")
    g.add_argument("--num_patches", type=int, default=0,
                   help="decode tiles per split axis; 0 = automatic: the fewest that fit the GPU's free memory (then "
                        "--patch_dim is chosen and --decode_order frame may become tile), or on a CPU the "
                        "reference's (3 at 2K, 4 at 4K, else 1)")
    g.add_argument("--patch_dim", choices=PATCH_DIMS, default="w", help=PATCH_DIMS.choices_text())
    g.add_argument("--overlap", type=int, default=3, help="latent columns (16 pixels each) added on each interior "
                                                          "tile side")
    g.add_argument("--blend", choices=BLEND_MODES, default="cosine", help=BLEND_MODES.choices_text())
    g.add_argument("--decode_order", choices=ORDERS, default="frame", help=ORDERS.choices_text())
    g.add_argument("--decode_budget_gib", type=float, default=0.0,
                   help="cap on the decode's memory beyond the VAE weights, in GiB per GPU (per process with "
                        "torchrun), used to choose automatic tiles and the order: min(cap, free memory); on a CPU "
                        "the cap alone. 0 = the free memory only")
    g.add_argument("--crf", type=int, default=10, help="libx264 CRF, 0 best .. 51 worst (10 ~ reference quality 8)")
    g.add_argument("--png", action="store_true", help="also write PNG frames, in <video_dir>/<name>_frames/")
    g.add_argument("--overwrite", action="store_true", help="replace outputs instead of adding _N")


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("comfyui-pixelwizard")
    except (ImportError, PackageNotFoundError):
        from . import __version__

        return __version__


def _command(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelwizard", formatter_class=HelpFormatter,
                                     description="PixelWizard 2K/4K video on Wan2.2-TI2V-5B. Also run as "
                                                 "`python -m pixelwizard_core`.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    generate = _command(sub, "generate", "prompts -> anchor -> HR latent -> video")
    _add_weights(generate, ("text", "lr", "hr", "vae"))
    for adder in (_add_prompts, _add_lr, _add_hr, _add_decode):
        adder(generate)
    _add_image(generate, pin=True)
    generate.add_argument("--save_dir", help="also save HR latents (safetensors) here (default: not saved)")
    g = generate.add_argument_group("several processes (run under torchrun; see pixelwizard_core.distributed.launch)")
    g.add_argument("--ulysses_size", type=int, default=1, help="ranks per group: N processes form N/U groups that "
                   "take prompts in turn, each sequence-parallel over its U ranks")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiTs over the processes (FSDP, a unit per block)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder over the processes")
    setup_cli.add_model_source_options(generate, demo=True)
    anchor = _command(sub, "anchor", "prompts -> anchor files (the LR stage alone)")
    _add_weights(anchor, ("text", "lr", "vae"))  # the VAE only to encode --image
    for adder in (_add_prompts, _add_lr):
        adder(anchor)
    _add_image(anchor, pin=False)
    anchor.add_argument("--anchor_dir", default="outputs/anchors", help="folder of the anchor files")
    anchor.add_argument("--overwrite", action="store_true", help="replace anchors instead of adding _N")
    setup_cli.add_model_source_options(anchor)
    upscale = _command(sub, "upscale", "anchor files -> HR latents (and videos)")
    _add_weights(upscale, ("text", "hr", "vae"))
    for adder in (_add_hr, _add_decode):
        adder(upscale)
    upscale.add_argument("anchors", nargs="+", help="anchor files")
    upscale.add_argument("--hr_seed", type=int, help=f"default: the anchor's seed + {HR_SEED_OFFSET}, as generate "
                                                     "derives it")
    upscale.add_argument("--negative_prompt", help="default: the anchor's")
    upscale.add_argument("--save_dir", default="outputs/latents", help="folder of the HR latent files")
    upscale.add_argument("--latent_only", action="store_true", help="save the HR latent, do not decode")
    setup_cli.add_model_source_options(upscale)
    decode = _command(sub, "decode", "HR latent files -> videos")
    _add_weights(decode, ("vae",))
    _add_decode(decode)
    decode.add_argument("latents", nargs="+", help="HR latent files")
    setup_cli.add_model_source_options(decode)
    for name, command in COMMANDS.items():
        sub.choices[name].set_defaults(run=command)
        cli_batch.add_resume(sub.choices[name])
    for module in PLUGINS:
        importlib.import_module(module).add_subcommand(sub, HelpFormatter)
    return parser


# --- models ------------------------------------------------------------------------------------


def make_models(args: argparse.Namespace, *roles: str) -> Models:
    if getattr(args, "demo", False):
        return demo_models(args.device, DTYPES[args.dtype], args.attention, kind=args.demo)
    files = model_files(args, roles)
    files.require(*roles)
    files.check_kinds(*roles)
    device = torch.device(args.device)
    return Models(files, device=device, dtype=supported_dtype(DTYPES[args.dtype], device),
                  vae_dtype=supported_dtype(DTYPES[args.vae_dtype], device), load_mode=args.model_load_mode,
                  offload=args.offload_model, t5_cpu=args.t5_cpu, attention=args.attention,
                  block_swap=args.block_swap, compile_blocks=args.compile, loras=getattr(args, "loras", None))


# role -> (its flags, most specific first; the loader component): as ModelFiles.resolve, a single file
# overrides the official folder, and the HR checkpoint never comes from that folder
_ROLE_SOURCES = {"text": (("text_encoder", "ckpt_dir"), "t5"), "vae": (("vae_path", "ckpt_dir"), "vae"),
                 "lr": (("lr_ckpt", "dit", "ckpt_dir"), "dit"), "hr": (("hr_ckpt",), "hr_dit")}


def model_files(args: argparse.Namespace, roles: tuple[str, ...]) -> ModelFiles:
    """The file of each role the command loads, and only those: an official folder holding just the VAE
    serves ``decode`` (ModelFiles.resolve would look for every component in it)."""
    paths = {}
    for role in roles:
        flags, component = _ROLE_SOURCES[role]
        source = next((getattr(args, flag) for flag in flags if getattr(args, flag, None)), None)
        paths[role] = None if source is None else resolve_weights_path(source, component)
    return ModelFiles(text_encoder=paths.get("text"), vae=paths.get("vae"), lr=paths.get("lr"), hr=paths.get("hr"))


def make_pipeline(args: argparse.Namespace, *roles: str) -> PixelWizard:
    """One process, or (under torchrun, or with the parallel options) this rank of a multi-process run."""
    models = make_models(args, *roles)
    if getattr(args, "ulysses_size", 1) > 1 or getattr(args, "dit_fsdp", False) or getattr(args, "t5_fsdp", False) \
            or launched_world_size() > 1:
        from .distributed.launch import from_env

        return from_env(models, ulysses=args.ulysses_size, dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp)
    return PixelWizard(models)


# --- stages with their bars --------------------------------------------------------------------


def _sample(record: RunRecord, label: str, stage: str, size: StageSettings, run: Callable, *args: object,
            **options: object):
    """One sampling stage under its bar, drawn once the model is in place, with the steps as its total."""
    record.doing = f"the {stage} stage of {label}"
    with stage_bar(f"{label} {stage} {size.width}x{size.height}", "step", size.steps) as bar:
        return run(*args, on_step=bar, **options)


def _decode_to(pw: PixelWizard, record: RunRecord, latent: torch.Tensor, args: argparse.Namespace, path: Path,
               decode: DecodeSettings, label: str, metadata: dict) -> Path:
    png_dir = path.with_name(f"{path.stem}_frames") if args.png else None
    record.doing = f"the decode of {label} into {path}"
    with stage_bar(f"{label} decode", "tile-frame", per=latent.shape[2]) as bar:
        video = pw.decode(latent, path, decode, overwrite=args.overwrite, png_dir=png_dir, on_step=bar,
                          metadata=metadata)
    if pw.is_main:
        record.wrote(video)
    return video


def _save(record: RunRecord, what: str, flag: str, path: Path, save: Callable[[], Path]) -> Path:
    """Save a file; a full (or read-only) disk becomes a message naming the file and the option to change."""
    try:
        saved = save()
    except OSError as error:
        raise ConfigError(f"could not save the {what} to {path}: {error.strerror or error}; free some space on that "
                          f"disk or choose another {flag}") from None
    except Exception as error:  # safetensors reports its I/O errors as SafetensorError, not OSError
        if type(error).__name__ != "SafetensorError" or "I/O error" not in str(error):
            raise
        raise ConfigError(f"could not save the {what} to {path}: {str(error).split('I/O error: ')[-1]}; free some "
                          f"space on that disk or choose another {flag}") from None
    record.wrote(saved)
    return saved


# --- commands ----------------------------------------------------------------------------------


def _base_seed(args: argparse.Namespace) -> int:
    return random.randint(0, 2**31 - 1) if args.base_seed == -1 else args.base_seed


def cmd_generate(args: argparse.Namespace) -> None:
    checks.check_paths(args)
    setup_cli.prepare_generate_settings(args)  # --demo's tiny settings, before they are checked
    jobs = read_prompts(args.prompt, args.prompt_file)
    checks.check_base_seed(args.base_seed, len(jobs))
    cli_batch.check_resume(args)
    image, args.loras = checks.start_image(args), checks.lora_refs(args)
    lr = lr_settings(args)
    hr = hr_settings(args, lr.frames)
    decode = decode_settings(args, checks.hr_latent_hw(hr))
    checks.warn_anchor_geometry((lr.width, lr.height), hr, "--lr_size and --resolution")
    checks.warn_checkpoint_preset(args.hr_ckpt, hr)
    for folder in filter(None, (args.video_dir, args.save_dir)):
        if cli_batch.writes_outputs(args):  # under torchrun only each group's first rank touches the folders
            check_folder(Path(folder), make_dirs=True)
    setup_cli.prepare_generate(args)  # weights from the models folder (--download: fetched first)
    pw = make_pipeline(args, "text", "lr", "hr", "vae")
    base = pw.agree(_base_seed(args))  # every rank samples from the same seed
    record: RunRecord = args.record
    lr_first = hr_first = None
    if image is not None:
        record.doing = "the encoding of --image"
        lr_first = pw.first_frame(image, lr.width, lr.height)
        hr_first = pw.first_frame(image, hr.width, hr.height) if args.pin_image_hr else None
    batch = cli_batch.Batch(pw, args, args.video_dir, ".mp4",
                            cli_batch.prompt_targets(pw, jobs, args, base, lr=lr, hr=hr, decode=decode))

    def one(position: int, path: Path) -> Path:
        job = jobs[position]
        label = item_label(job.index, len(jobs))
        pw.stats = StageStats()
        lr_seed, hr_seed = prompt_seeds(base, job.index)
        record.doing = f"the text encoding of {label}"
        text = pw.conditioning(job.prompt, job.negative_prompt or args.negative_prompt)
        anchor = _sample(record, label, "LR", lr, pw.anchor, text, lr, lr_seed, first_frame=lr_first)
        latent = _sample(record, label, "HR", hr, pw.upscale, anchor, text, hr, hr_seed, first_frame=hr_first)
        saved = batch.extra_output(position, args.save_dir, ".safetensors") if args.save_dir and pw.is_main else None
        if saved is not None:
            metadata = {**_latent_metadata(job, anchor, hr, hr_seed, pw.identity("hr")), **batch.metadata(position)}
            _save(record, "HR latent", "--save_dir", saved,
                  lambda: save_hr_latent(saved, latent, metadata, overwrite=args.overwrite))
        video = _decode_to(pw, record, latent, args, path, decode, label, batch.metadata(position))
        log.info("%s %s -> %s (lr_seed %d, hr_seed %d)", label, pw.stats.summary(), video, lr_seed, hr_seed)
        return video

    batch.run(one)


def cmd_anchor(args: argparse.Namespace) -> None:
    checks.single_process("anchor")
    checks.check_paths(args)
    jobs = read_prompts(args.prompt, args.prompt_file)
    checks.check_base_seed(args.base_seed, len(jobs))
    cli_batch.check_resume(args)
    image, args.loras = checks.start_image(args), checks.lora_refs(args)
    lr = lr_settings(args)
    check_folder(Path(args.anchor_dir), make_dirs=True)
    roles = ("text", "lr", *(() if image is None else ("vae",)))
    setup_cli.resolve_weights(args, roles)
    pw = PixelWizard(make_models(args, *roles))
    base, record = _base_seed(args), args.record
    first = None if image is None else pw.first_frame(image, lr.width, lr.height)
    batch = cli_batch.Batch(pw, args, args.anchor_dir, ".safetensors",
                            cli_batch.prompt_targets(pw, jobs, args, base, lr=lr))

    def one(position: int, path: Path) -> Path:
        job = jobs[position]
        label = item_label(job.index, len(jobs))
        pw.stats = StageStats()
        lr_seed, _ = prompt_seeds(base, job.index)
        record.doing = f"the text encoding of {label}"
        text = pw.conditioning(job.prompt, job.negative_prompt or args.negative_prompt)
        anchor = _sample(record, label, "LR", lr, pw.anchor, text, lr, lr_seed, first_frame=first)
        _save(record, "anchor", "--anchor_dir", path,
              lambda: anchor.save(path, overwrite=args.overwrite, extra=batch.metadata(position)))
        log.info("%s %s -> %s (seed %d)", label, pw.stats.summary(), path, lr_seed)
        return path

    batch.run(one)


def cmd_upscale(args: argparse.Namespace) -> None:
    checks.single_process("upscale")
    checks.check_paths(args)
    anchors = [(Path(p), Anchor.load(p)) for p in args.anchors]
    if args.hr_seed is not None:
        checks.check_seed("--hr_seed", args.hr_seed)
    for path, anchor in anchors:
        checks.check_seed(f"{path.name}'s seed + {HR_SEED_OFFSET}", anchor.seed + HR_SEED_OFFSET)
    settings = [hr_settings(args, anchor.frames) for _, anchor in anchors]
    decode = decode_settings(args, checks.hr_latent_hw(settings[0]))
    for (path, anchor), hr in zip(anchors, settings):
        checks.warn_anchor_geometry((anchor.width, anchor.height), hr, path.name)
    checks.warn_checkpoint_preset(args.hr_ckpt, settings[0])
    args.loras = checks.lora_refs(args)
    check_folder(Path(args.save_dir), make_dirs=True)
    if not args.latent_only:
        check_folder(Path(args.video_dir), make_dirs=True)
    roles = ("text", "hr", *(() if args.latent_only else ("vae",)))
    setup_cli.resolve_weights(args, roles, settings[0].width, settings[0].height)
    pw = PixelWizard(make_models(args, *roles))
    record: RunRecord = args.record
    seeds = [args.hr_seed if args.hr_seed is not None else anchor.seed + HR_SEED_OFFSET for _, anchor in anchors]
    negatives = [args.negative_prompt if args.negative_prompt is not None else a.negative_prompt for _, a in anchors]
    folder, suffix = (args.save_dir, ".safetensors") if args.latent_only else (args.video_dir, ".mp4")
    batch = cli_batch.Batch(pw, args, folder, suffix, [cli_batch.file_target(
        "upscale", pw, roles, path, anchor.prompt, anchor=anchor.metadata(), hr=hr, hr_seed=seed,
        negative_prompt=negative, decode=None if args.latent_only else decode)
        for (path, anchor), hr, seed, negative in zip(anchors, settings, seeds, negatives)])

    def one(index: int, output: Path) -> Path:
        (path, anchor), hr, position = anchors[index], settings[index], index + 1
        label = item_label(position, len(anchors))
        pw.stats = StageStats()
        hr_seed, negative = seeds[index], negatives[index]
        record.doing = f"the text encoding of {label}"
        text = pw.conditioning(anchor.prompt, negative)
        latent = _sample(record, label, "HR", hr, pw.upscale, anchor, text, hr, hr_seed)
        target = output if args.latent_only else batch.extra_output(index, args.save_dir, ".safetensors")
        metadata = {**_latent_metadata(PromptJob(1, anchor.prompt), anchor, hr, hr_seed, pw.identity("hr")),
                    **batch.metadata(index)}
        if target is not None:  # None: --resume found it made already
            saved = _save(record, "HR latent", "--save_dir", target,
                          lambda: save_hr_latent(target, latent, metadata, overwrite=args.overwrite))
        if not args.latent_only:
            saved = _decode_to(pw, record, latent, args, output, decode, label, batch.metadata(index))
        log.info("%s %s: %s -> %s (hr_seed %d)", label, path.name, pw.stats.summary(), saved, hr_seed)
        return saved

    batch.run(one)


def cmd_decode(args: argparse.Namespace) -> None:
    checks.single_process("decode")
    checks.check_paths(args)
    latents = [(Path(p), load_hr_latent(p)) for p in args.latents]
    # the same settings for every latent, each checked against its size
    decode = [decode_settings(args, tuple(latent.shape[-2:])) for _, (latent, _) in latents][-1]
    check_folder(Path(args.video_dir), make_dirs=True)
    setup_cli.resolve_weights(args, ("vae",))
    pw = PixelWizard(make_models(args, "vae"))
    batch = cli_batch.Batch(pw, args, args.video_dir, ".mp4", [cli_batch.file_target(
        "decode", pw, ("vae",), path, str(metadata.get("prompt", "")), latent=metadata, decode=decode)
        for path, (_, metadata) in latents])

    def one(index: int, output: Path) -> Path:
        path, (latent, _) = latents[index]
        label = item_label(index + 1, len(latents))
        pw.stats = StageStats()
        video = _decode_to(pw, args.record, latent, args, output, decode, label, batch.metadata(index))
        log.info("%s %s: %s -> %s", label, path.name, pw.stats.summary(), video)
        return video

    batch.run(one)


def _latent_metadata(job: PromptJob, anchor: Anchor, hr: StageSettings, hr_seed: int, hr_model: str) -> dict:
    return {"prompt": job.prompt, "prompt_id": job.prompt_id, "negative_prompt": anchor.negative_prompt,
            "lr_seed": anchor.seed, "seed": hr_seed, "width": hr.width, "height": hr.height, "frames": hr.frames,
            "steps": hr.steps, "shift": hr.shift, "cfg": hr.cfg, "solver": hr.solver, "anchor_model": anchor.model,
            "hr_model": hr_model}


COMMANDS = {"generate": cmd_generate, "anchor": cmd_anchor, "upscale": cmd_upscale, "decode": cmd_decode}
# Modules that add subcommands of their own: each has add_subcommand(subparsers, formatter) registering a
# parser with set_defaults(run=function taking the parsed args).
PLUGINS: tuple[str, ...] = ("pixelwizard_core.setup_cli", "pixelwizard_core.training.cli", "pixelwizard_core.toy.cli")

# OSErrors that are about the user's files and disks, not a bug: a message, not a traceback
USER_OS_ERRORS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOENT", "EISDIR",
                                                    "ENOTDIR") if hasattr(errno, name)}  # EDQUOT: not on Windows


def stop_exit_code(signal_name: str) -> int:
    """128 + the signal's number, as a shell reports a process ended by it: SIGINT 130, SIGTERM 143, SIGHUP 129
    (Windows' Ctrl-Break counts as Ctrl-C)."""
    if signal_name in ("SIGINT", "SIGBREAK"):
        return 130
    return 128 + int(getattr(signal, signal_name, signal.SIGINT))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `pixelwizard`: the help, not an error
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    args.record = record = RunRecord()
    try:
        with stop_on_signals(), logs_above_bars():
            if args.run in COMMANDS.values():
                args.device = str(resolve_device(args.device))
            code = args.run(args)
    except PixelWizardError as error:
        log.error("error: %s", error)
        return 2
    except OSError as error:
        if error.errno not in USER_OS_ERRORS:
            raise
        log.error("error: %s", error)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, Ctrl-Break, SIGTERM, SIGHUP: outputs were aborted on the way out
        return _stopped(record, stop, getattr(args, "ulysses_size", 1))
    except Exception as error:
        stop = _stop_behind(error)
        if stop is None:
            raise  # a bug: its traceback is wanted
        return _stopped(record, stop, getattr(args, "ulysses_size", 1))
    return code or 0


def _stop_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The stop signal an error was raised while handling, if any: under torchrun, a rank that stops first
    closes its connections, so the others' clean-up after the same signal fails with "connection closed"."""
    seen = error.__context__
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__context__
    return seen


def _stopped(record: RunRecord, stop: KeyboardInterrupt, ulysses: int) -> int:
    name = getattr(stop, "signal_name", "SIGINT")
    if leads_a_group(ulysses):  # each group's leader: with groups of one, the rank writing the file may be any
        log.error("%s", record.stopped_line(name))
    return stop_exit_code(name)


if __name__ == "__main__":
    sys.exit(main())
