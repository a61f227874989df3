"""Socket types of the pack and the one place where latents cross the ComfyUI boundary."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.vae import denormalize_latent, normalize_latent
from pixelwizard_core.pipeline.handles import ModelHandle

PW_WAN = "PW_WAN"  # the Wan2.2 base: DiT, VAE, text encoder handles
PW_STAGE_MODEL = "PW_STAGE_MODEL"  # a PixelWizard LR or HR checkpoint handle
PW_CONDITIONING = "PW_CONDITIONING"  # positive and negative text context
PW_ANCHOR = "PW_ANCHOR"  # pixelwizard_core.pipeline.anchors.Anchor
PW_POOL = "PW_POOL"  # pixelwizard_core.distributed.pool.PoolSpec: a multi-GPU worker pool, started on first use
CATEGORY = "PixelWizard"


@dataclass(frozen=True)
class WanModels:
    """What the Wan2.2 loader outputs: lazy handles, loaded by the first node that needs them."""

    dit: ModelHandle | None
    vae: ModelHandle
    text: ModelHandle


def pool_input(stage: str) -> dict:
    """The optional multi-GPU input every heavy node takes (appended last: input order is frozen)."""
    return {"pool": (PW_POOL, {"tooltip": f"from PixelWizard Multi-GPU: the {stage} runs on its worker processes"})}


def to_comfy_latent(latent: torch.Tensor) -> dict:
    """Our normalised latent -> ComfyUI LATENT (raw VAE latents, as its own Wan2.2 nodes use)."""
    return {"samples": denormalize_latent(latent.float()).cpu()}


def from_comfy_latent(latent: dict) -> torch.Tensor:
    """ComfyUI LATENT (raw Wan2.2 5B latents [B, 48, T, h, w]) -> our normalised latent [1, 48, T, h, w]."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.dim() != 5 or samples.shape[1] != 48:
        shape = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
        raise ConfigError(f"expected a Wan2.2 5B video LATENT [B, 48, T, H/16, W/16], got {shape}")
    if samples.shape[0] != 1:
        raise ConfigError(f"the LATENT holds a batch of {samples.shape[0]}; PixelWizard takes one video at a time")
    return normalize_latent(samples.float())


def context_from_native(conditioning: list, text_len: int = 512) -> torch.Tensor:
    """ComfyUI CONDITIONING from its own umT5 CLIPTextEncode -> context [1, <=512, 4096].

    Comfy zero-pads to at least 512 rows (as the official pipeline) but never truncates a long prompt;
    the DiT attends exactly 512 rows, so longer contexts are cut as the official tokenizer would."""
    try:
        context = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise ConfigError("CONDITIONING input is empty; connect a CLIPTextEncode with the umT5 text encoder") from None
    if not torch.is_tensor(context) or context.dim() != 3 or context.shape[-1] != 4096:
        shape = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
        raise ConfigError(f"CONDITIONING has shape {shape}; PixelWizard needs umT5-XXL (4096-wide) conditioning "
                          "from the Wan text encoder (umt5_xxl_*.safetensors)")
    return context[:1, :text_len].float()
