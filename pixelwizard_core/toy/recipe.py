"""Training the tiny PixelWizard on the toy world, from one seed, with the project's training code.

Order (each step's output feeds the next):

1. the tokenizer (written) and a random, frozen umT5-structured text encoder (seeded);
2. the VAE, trained to reconstruct fresh clips (:mod:`.vae_training`): crops of HR-scale renders, whole
   anchor-size clips and single frames; first the whole VAE, then the decoder alone;
3. the data sets: ``lr_clips`` scenes for the LR DiT, their HR renders 3x area-downsampled (the
   reference's first degradation step) and encoded at the anchor size; ``clips`` other scenes for the HR
   DiT, encoded at both sizes (the HR latent and its anchor); prompts encoded to 16-row contexts;
4. the LR DiT by flow matching on the anchor latents, through :class:`~..training.ShortcutObjective` with
   ``sc_rate`` 0 (a flow-matching-only objective; the LR model has no dt and no anchor), on an unshifted
   grid (``lr_shift``) with large batches;
5. the HR DiT: flow matching first (``sc_rate`` 0, dt = 0), then the paper's noise-span aligned shortcut
   training (``ShortcutConfig`` defaults: SC rate 0.3, exponential index sampling beta 0.7, calibration
   power 0.5), both through :class:`~..training.Trainer`.

The weights are exported in the published layouts (:mod:`.models`). Every random draw comes from
generators seeded from ``seed``; on one machine with the same thread count a run is reproducible.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..loading.tokenizer import UMT5Tokenizer
from ..models.dit import WanDiT
from ..models.hr import WanHRDiT
from ..models.t5 import UMT5Encoder
from ..models.vae import WanVAE
from ..pipeline.stages import resize_anchor
from ..pipeline.text import TextEncoder
from ..training import OptimConfig, ShortcutConfig, ShortcutObjective, Trainer, TrainingBatch
from .models import DIT, FILES, MANIFEST_FILE, SIZES, T5, TOKENIZER_FILE, VAE, ToySizes, manifest
from .vae_training import train_vae
from .vocab import write_tokenizer_json
from .world import dataset, render, to_model_video

log = logging.getLogger("pixelwizard")


@dataclass(frozen=True)
class ToyRecipe:
    """Sizes and rates of the toy training run (defaults: the run reported in BENCHMARKS.md)."""

    seed: int = 0
    clips: int = 320        # HR stage: scenes encoded at both sizes
    lr_clips: int = 3000    # LR stage: scenes encoded at the anchor size only (cheap; the LR DiT needs many)
    # what one VAE step renders, cycling: (width, height, frames, batch, crop); the crop is a square window
    # around the object (the 128x64 clips are whole). HR-scale edges from crops of 512x256 renders, whole
    # objects at the anchor size, single frames (cheap) for the spatial part.
    vae_mix: tuple[tuple[int, int, int, int, int], ...] = (
        (512, 256, 5, 2, 96), (128, 64, 5, 4, 128), (512, 256, 1, 4, 128))
    # VAE phases (steps, peak lr, decoder only), each a one-cycle schedule of its own: the whole VAE, then
    # the decoder alone (sharper edges; the encoder, so the DiTs' latents, stays as it is)
    vae_phases: tuple[tuple[int, float, bool], ...] = ((1500, 3e-3, False), (1000, 1e-3, True))
    lr_dit_steps: int = 8000
    lr_batch: int = 32      # many small clips per step: a step of 16-token clips is cheap
    # the LR DiT's flow matching: an unshifted grid and no timestep weighting (its 16-token latent is far
    # smaller than the release's, so the high-noise bias of shift 5 would leave the object undertrained)
    lr_shift: float = 1.0
    lr_timestep_weighting: str = "none"
    hr_pretrain_steps: int = 1500
    hr_shortcut_steps: int = 600
    batch: int = 8
    dit_lr: float = 1e-3
    ema_decay: float = 0.995
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ToyData:
    """An encoded data set of one stage: clean latents, their anchors (HR stage) and text contexts."""

    latent: torch.Tensor           # [N, 48, T, H/16, W/16]
    context: torch.Tensor          # [N, text rows, text_dim]
    empty: torch.Tensor            # [text rows, text_dim]: the "" prompt (CFG dropout)
    prompts: list[str]
    anchor: torch.Tensor | None = None  # [N, 48, T, H/32, W/32]: the anchor latent on the HR token grid


# ---------------------------------------------------------------------------------------------- models

def build_text_encoder(folder: Path, seed: int) -> TextEncoder:
    """Write the tokenizer into ``folder``; a random umT5-structured encoder (frozen: never trained)."""
    tokenizer = UMT5Tokenizer.from_tokenizer_json(write_tokenizer_json(folder / TOKENIZER_FILE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5Encoder(T5).eval().requires_grad_(False)
    return TextEncoder(encoder, tokenizer)


def new_hr_dit(seed: int) -> WanHRDiT:
    """A fresh HR DiT with the reference's training init: dt MLP output and injector output at zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanHRDiT(DIT)
    output = model.spatial_adapter.zero_layers["1"]
    nn.init.zeros_(output.weight)
    nn.init.zeros_(output.bias)
    return model


class FlowOnly(nn.Module):
    """The LR DiT behind the objective's interface ``model(x, t, context, dt=, anchor=)`` (both unused)."""

    def __init__(self, dit: WanDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, dt: torch.Tensor,
                anchor: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, context)


# ---------------------------------------------------------------------------------------------- data

def downsample_clip(clip: torch.Tensor, factor: int) -> torch.Tensor:
    """Area downsampling of clip [F, H, W, 3] by ``factor`` (the anchor's degradation)."""
    x = F.interpolate(clip.permute(0, 3, 1, 2), scale_factor=1 / factor, mode="area")
    return x.permute(0, 2, 3, 1)


def encode_prompts(text: TextEncoder, prompts: list[str], chunk: int = 64) -> torch.Tensor:
    """Contexts of ``prompts``, each distinct prompt encoded once."""
    distinct = sorted(set(prompts))
    rows = torch.cat([text.encode(distinct[i:i + chunk]) for i in range(0, len(distinct), chunk)])
    where = {prompt: i for i, prompt in enumerate(distinct)}
    return rows[[where[p] for p in prompts]]


@torch.no_grad()
def encode_dataset(vae: WanVAE, text: TextEncoder, count: int, seed: int, sizes: ToySizes = SIZES,
                   chunk: int = 8, *, stage: str) -> ToyData:
    """``count`` scenes of ``seed`` encoded for one stage: the LR stage's latents are the anchors (HR
    renders area-downsampled, the reference's first degradation step); the HR stage's are the HR clips,
    with those anchors resized to the token grid."""
    if stage not in ("lr", "hr"):
        raise ConfigError(f"encode_dataset: stage {stage!r}; choose lr or hr")
    scenes = dataset(count, seed, sizes.frames)
    factor = sizes.hr_width // sizes.lr_width
    hr, lr = [], []
    for start in range(0, count, chunk):
        clips = [render(s, sizes.hr_width, sizes.hr_height, sizes.frames) for s in scenes[start:start + chunk]]
        lr.append(vae.encode(torch.cat([to_model_video(downsample_clip(c, factor)) for c in clips])))
        if stage == "hr":
            hr.append(vae.encode(torch.cat([to_model_video(c) for c in clips])))
    prompts = [s.prompt for s in scenes]
    context, empty = encode_prompts(text, prompts), text.encode([""])[0]
    anchors = torch.cat(lr)
    if stage == "lr":
        return ToyData(latent=anchors, context=context, empty=empty, prompts=prompts)
    return ToyData(latent=torch.cat(hr), context=context, empty=empty, prompts=prompts,
                   anchor=resize_anchor(anchors, sizes.hr_width, sizes.hr_height))


def batches(data: ToyData, batch: int, seed: int):
    """batches(step) -> TrainingBatch, a pure function of (seed, step); the LR stage's anchors are zeros
    (its model takes none)."""
    count = data.latent.shape[0]

    def make(step: int) -> TrainingBatch:
        index = torch.randint(count, (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        latent = data.latent[index]
        if data.anchor is None:
            anchor = latent.new_zeros(*latent.shape[:3], latent.shape[3] // 2, latent.shape[4] // 2)
        else:
            anchor = data.anchor[index]
        return TrainingBatch(latent=latent, context=data.context[index], anchor=anchor, empty_context=data.empty)

    return make


# ---------------------------------------------------------------------------------------------- DiTs

def fit(model: nn.Module, objective: ShortcutConfig, data: ToyData, *, stage: str, steps: int, recipe: ToyRecipe,
        seed: int, batch: int | None = None) -> Trainer:
    """Train through the project's Trainer (AdamW with beta1 0.9: from scratch, beta1 0 is slow), then
    load the EMA weights into the model."""
    optim = OptimConfig(lr=recipe.dit_lr, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0,
                        ema_decay=recipe.ema_decay, ema_start=min(100, steps // 4))
    trainer = Trainer(model, ShortcutObjective(objective), optim, seed=seed)
    start = time.perf_counter()

    def report(step: int, logs: dict[str, float]) -> None:
        if step % 250 == 0 or step == steps:
            log.info("%s step %d/%d loss %.4f (%.0f s)", stage, step, steps, logs["loss"], time.perf_counter() - start)

    trainer.fit(batches(data, batch or recipe.batch, seed), steps, log_every=0, on_step=report)
    if trainer.ema.shadow is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in trainer.ema.shadow.items():
                params[name].copy_(value)
    return trainer


def train_lr_dit(data: ToyData, recipe: ToyRecipe) -> WanDiT:
    """Flow matching at the anchor size (``lr_dit_steps`` at ``dit_lr``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 1)
        dit = WanDiT(DIT)
    objective = replace(recipe.shortcut, sc_rate=0.0, shift=recipe.lr_shift,
                        timestep_weighting=recipe.lr_timestep_weighting)
    fit(FlowOnly(dit), objective, data, stage="lr", steps=recipe.lr_dit_steps, recipe=recipe, seed=recipe.seed + 1,
        batch=recipe.lr_batch)
    return dit.eval()


def pretrain_hr_dit(data: ToyData, recipe: ToyRecipe) -> WanHRDiT:
    """The starting point: flow matching only (dt = 0), as the reference fine-tunes a non-shortcut model."""
    model = new_hr_dit(recipe.seed + 2)
    fit(model, replace(recipe.shortcut, sc_rate=0.0), data, stage="hr-fm", steps=recipe.hr_pretrain_steps,
        recipe=recipe, seed=recipe.seed + 2)
    return model


def shortcut_hr_dit(start: WanHRDiT, data: ToyData, recipe: ToyRecipe, config: ShortcutConfig | None = None,
                    seed_offset: int = 3) -> WanHRDiT:
    """Shortcut fine-tuning of a copy of ``start`` with ``config`` (default: the recipe's, the paper's)."""
    model = new_hr_dit(0)
    model.load_state_dict(start.state_dict())
    fit(model, config or recipe.shortcut, data, stage="hr-sc", steps=recipe.hr_shortcut_steps, recipe=recipe,
        seed=recipe.seed + seed_offset)
    return model.eval()


# ---------------------------------------------------------------------------------------------- export

def _half(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """fp16 copies (the shipped files; the loaders convert to the run's dtype) with a key prefix."""
    return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def export(folder: Path, *, text: TextEncoder, vae: WanVAE, lr: WanDiT, hr: WanHRDiT, info: dict) -> dict[str, Path]:
    """Write the four weight files (published layouts, fp16) into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"toy_recipe": json.dumps(info, sort_keys=True)}
    paths = {role: folder / name for role, name in FILES.items()}
    save_file(_half(text.encoder.state_dict()), str(paths["text"]), metadata=meta)
    save_file(_half(vae.state_dict()), str(paths["vae"]), metadata=meta)
    save_file(_half(lr.state_dict()), str(paths["lr"]), metadata={**meta, "text_len": str(lr.config.text_len)})
    export_hr(paths["hr"], hr, info)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest(), indent=2) + "\n", encoding="utf-8")
    for path in paths.values():
        path.chmod(0o644)  # package data: readable by everyone (safetensors writes 0600)
    return paths


def export_hr(path: Path, hr: WanHRDiT, info: dict) -> Path:
    """The reference's HR layout: every key under "model.", the conditioning recorded in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_half(hr.state_dict(), "model."), str(path),
              metadata={"toy_recipe": json.dumps(info, sort_keys=True), "text_len": str(hr.config.text_len),
                        "step_size_conditioning": hr.step_size_conditioning})
    path.chmod(0o644)
    return path


def _cached(cache: Path | None, name: str, make, *, module: nn.Module | None = None):
    """``make()``, or its result from ``cache/name`` (a module's state dict, or a ToyData's tensors)."""
    path = None if cache is None else cache / f"{name}.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if module is not None:
            module.load_state_dict(saved)
            return module.eval()
        return ToyData(**saved)
    result = make()
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(result.state_dict() if module is not None else vars(result), path)
    return result


def train_all(folder: str | Path, recipe: ToyRecipe = ToyRecipe(), cache: str | Path | None = None) -> dict:
    """Train all four models and write them into ``folder``; returns the timings (seconds) and recipe.
    ``cache``: a folder keeping the VAE, the encoded data and the models between runs (for iterating)."""
    folder, cache = Path(folder), (None if cache is None else Path(cache))
    timings: dict[str, float] = {}   # seconds of each piece computed in this run
    reused: list[str] = []            # pieces taken from the cache (their time is that of an earlier run)

    def piece(name: str, make, module: nn.Module | None = None):
        if cache is not None and (cache / f"{name}.pt").is_file():
            reused.append(name)
            return _cached(cache, name, make, module=module)
        start = time.perf_counter()
        result = _cached(cache, name, make, module=module)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    text = build_text_encoder(folder, recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vae = WanVAE(VAE)

    def make_vae() -> WanVAE:
        for phase, (steps, lr, decoder_only) in enumerate(recipe.vae_phases):
            train_vae(vae, steps=steps, lr=lr, mix=recipe.vae_mix, seed=recipe.seed + phase,
                      decoder_only=decoder_only)
        return vae

    vae = piece("vae", make_vae, vae)
    lr_data = piece("lr_data", lambda: encode_dataset(vae, text, recipe.lr_clips, recipe.seed + 100, stage="lr"))
    hr_data = piece("hr_data", lambda: encode_dataset(vae, text, recipe.clips, recipe.seed, stage="hr"))
    lr_dit = piece("lr_dit", lambda: train_lr_dit(lr_data, recipe), WanDiT(DIT))
    start = piece("hr_fm", lambda: pretrain_hr_dit(hr_data, recipe), new_hr_dit(0))
    hr = piece("hr_sc", lambda: shortcut_hr_dit(start, hr_data, recipe), new_hr_dit(0))
    info = {"recipe": recipe.to_dict(), "timings_s": timings, "from_cache": reused, "threads": torch.get_num_threads()}
    export(folder, text=text, vae=vae, lr=lr_dit, hr=hr, info=info)
    (folder / "toy_training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info
