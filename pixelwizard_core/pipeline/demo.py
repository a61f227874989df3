"""``generate --demo``: the whole pipeline on tiny random models built in memory (no files, no download).

The models have the real structure (48 latent channels, head size 128, 512 text rows, the Wan2.2 VAE's
stages) but tiny widths, and random weights: the video is noise. What the demo proves is that the
install works end to end: tokenizer, text encoder, both DiT stages with their solvers, the tiled decode
and ffmpeg, in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse

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


def apply_demo_settings(args: argparse.Namespace) -> None:
    """Replace the stage settings with the demo's tiny ones (and give a prompt if none was given)."""
    for name, value in DEMO_SETTINGS.items():
        setattr(args, name, value)
    if not (args.prompt or args.prompt_file):
        args.prompt = DEMO_PROMPT
    if args.device == "cpu":
        args.dtype = "fp32"  # bf16 buys nothing for tiny models on a CPU


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


def demo_models(device: str, dtype: torch.dtype, attention: str = "auto") -> Models:
    """The demo's models under the run's placement policy, as if loaded from files."""
    built = build_demo_models()
    for role in ("lr", "hr"):
        built[role].to(device=device, dtype=dtype)
        built[role].set_attention_backend(attention)  # checked against the device, as for loaded models
    built["text"].encoder.to(dtype)
    return Models(ModelFiles(), device=device, dtype=dtype, attention=attention, prebuilt=built)
