"""``generate --demo``: the whole pipeline on tiny models, no download.

By default (``kind="toy"``) the models are the toy PixelWizard shipped in ``pixelwizard_core/toy/weights``
(trained on the toy world of :mod:`pixelwizard_core.toy` by ``train-toy``), opened from their files by the
real loaders, at 384x192 from a 128x64 anchor, 5 frames (the default prompt "a red circle moving right on a
dark background"). No trained weights ship yet (issue 17: the trained models do not pass the quality checks);
until they do, the folder is empty and the demo falls back to random weights. The folder's ``demo.json``
(written with the weights) names the files and the stage settings, so this module needs nothing from the toy
package (which sits in a layer above).

``kind="random"`` is the pure install check: tiny random models built in memory with the real structure
(48 latent channels, head size 128, 512 text rows, the Wan2.2 VAE's stages); the video is noise. It is
also the fallback when the toy files are missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

import torch

from ..loading.tokenizer import UMT5Tokenizer
from ..models.dit import DiTConfig, WanDiT
from ..models.hr import WanHRDiT
from ..models.t5 import T5Config, UMT5Encoder
from ..models.vae import VAEConfig, WanVAE
from .models import ModelFiles, Models
from .text import TextEncoder

DEMO_T5 = T5Config.tiny(dim=32)
DEMO_DIT = DiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=2, text_dim=DEMO_T5.dim)
DEMO_VAE = VAEConfig.tiny()
# 9 frames: LR 128x96 in 4 steps, HR 256x192 in 2 steps, 2 decode tiles (the decode dominates the time)
DEMO_SETTINGS = {"lr_size": "128*96", "frame_num": 9, "lr_steps": 4, "resolution": "256x192", "hr_steps": 2,
                 "num_patches": 2, "overlap": 1}
DEMO_PROMPT = "PixelWizard demo: random weights, the video is noise"
DEMO_KINDS = ("toy", "random")
# the toy models' files, by path: the toy package is a front end above this layer
TOY_WEIGHTS = Path(__file__).resolve().parents[1] / "toy" / "weights"
TOY_MANIFEST = "demo.json"

log = logging.getLogger("pixelwizard")


def toy_manifest(folder: Path = TOY_WEIGHTS) -> dict | None:
    """The toy folder's ``demo.json`` ({"files": role -> name, "settings": CLI settings, "prompt"}) when it
    and every file it names exist, else None."""
    path = folder / TOY_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not all((folder / name).is_file() for name in manifest["files"].values()):
        return None
    return manifest


def demo_kind(requested: object = True) -> str:
    """The kind a ``--demo`` value asks for: "random", or "toy" when its files are there (else "random")."""
    kind = requested if isinstance(requested, str) else "toy"
    if kind not in DEMO_KINDS:
        from ..errors import ConfigError

        raise ConfigError(f"--demo {kind!r}: choose one of {', '.join(DEMO_KINDS)}")
    if kind == "toy" and toy_manifest() is None:
        _say_no_toy_models()
        return "random"
    return kind


@functools.cache
def _say_no_toy_models() -> None:
    """Once per process (the settings and the models both ask)."""
    log.info("no toy models in %s (`python -m pixelwizard_core train-toy` writes them): the demo uses random "
             "weights and its video is noise", TOY_WEIGHTS)


def apply_demo_settings(args: argparse.Namespace) -> None:
    """Replace the stage settings with the demo's tiny ones (and give a prompt if none was given)."""
    manifest = toy_manifest() if demo_kind(getattr(args, "demo", True)) == "toy" else None
    settings = manifest["settings"] if manifest else DEMO_SETTINGS
    for name, value in settings.items():
        setattr(args, name, value)
    if not (args.prompt or args.prompt_file):
        args.prompt = manifest["prompt"] if manifest else DEMO_PROMPT
    if args.device == "cpu":
        args.dtype = "fp32"  # bf16 buys nothing for tiny models on a CPU


_FILE_FIELDS = {"text": "text_encoder", "vae": "vae", "lr": "lr", "hr": "hr"}


def byte_tokenizer(vocab: int) -> UMT5Tokenizer:
    """A stand-in tokenizer: UTF-8 bytes folded into the vocabulary (ids 0..3 stay special, as in umT5)."""

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [[4 + b % (vocab - 4) for b in text.encode("utf-8")] for text in texts]

    return UMT5Tokenizer(encode_batch, eos_id=1, pad_id=0, vocab_size=vocab, source="demo (UTF-8 bytes)")


def _random(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """The model's own init, with its zero-initialised layers given small values so every part acts."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()


def build_demo_models(seed: int = 0) -> dict[str, object]:
    """Text encoder, LR DiT, HR DiT and VAE, tiny and random, on the CPU in float32."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = _random(UMT5Encoder(DEMO_T5), generator)
    return {
        "text": TextEncoder(encoder, byte_tokenizer(DEMO_T5.vocab)),
        "lr": _random(WanDiT(DEMO_DIT), generator),
        "hr": _random(WanHRDiT(DEMO_DIT), generator),
        "vae": _random(WanVAE(DEMO_VAE), generator),
    }


def demo_models(device: str, dtype: torch.dtype, attention: str = "auto", kind: object = True) -> Models:
    """The demo's models under the run's placement policy: the toy files through the loaders, or (``kind``
    "random", or no toy files) tiny random models used as if loaded from files."""
    manifest = toy_manifest() if demo_kind(kind) == "toy" else None
    if manifest is not None:
        files = ModelFiles(**{_FILE_FIELDS[role]: TOY_WEIGHTS / name for role, name in manifest["files"].items()})
        return Models(files, device=device, dtype=dtype, vae_dtype=torch.float32, attention=attention)
    built = build_demo_models()
    for role in ("lr", "hr"):
        built[role].to(device=device, dtype=dtype)
        built[role].set_attention_backend(attention)  # checked against the device, as for loaded models
    built["text"].encoder.to(dtype)
    return Models(ModelFiles(), device=device, dtype=dtype, attention=attention, prebuilt=built)
