"""Running the Wan2.2 VAE network in pieces along time, with one :class:`CausalCache` per call.

Encoding feeds the encoder video frame 0 alone, then 4 frames at a time; decoding streams one latent frame
at a time, so memory is bounded by one chunk plus the causal caches (:func:`decoder_cache_elements`).
Spatial pieces are the caller's: :func:`decoder_halo` says how far a cut reaches into a decoded tile.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from .vae_network import CausalCache, Decoder3d, VAEConfig, unpatchify

FRAMES_PER_LATENT = 4  # temporal compression: every latent frame after the first stands for 4 video frames


def _encode_spans(frames: int) -> list[tuple[int, int]]:
    """Frame spans of the encoder calls: frame 0 alone (the first latent frame is one video frame), then 4."""
    step = FRAMES_PER_LATENT
    return [(0, 1)] + [(1 + step * i, 1 + step * (i + 1)) for i in range((frames - 1) // step)]


def encode_chunks(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder output for all latent frames of the patchified video x [B, 12, 4n+1, h, w], one chunk per call."""
    cache = CausalCache()
    latents = []
    for start, stop in _encode_spans(x.shape[2]):
        latents.append(encoder(x[:, :, start:stop], cache))
        cache.first_chunk = False
    del cache  # freed before the concatenation allocates
    return torch.cat(latents, 2)


def decode_frames(decoder: nn.Module, x: torch.Tensor,
                  on_frame: Callable[[int, int], None] | None = None) -> Iterator[torch.Tensor]:
    """Decode x [B, z_dim, T, h, w] (after the model's conv2) one latent frame at a time: yields float32
    frames [B, 3, n, 16h, 16w] clamped to [-1, 1], n = 1 for the first latent frame and 4 after it.
    on_frame(done, total) runs after each latent frame."""
    total = x.shape[2]
    cache = CausalCache()
    for i in range(total):
        cache.first_chunk = i == 0
        # no_grad per step, not as a decorator: torch's generator wrapper keeps the last yielded frames alive
        # while suspended (in frame order that is one piece per tile, 0.2 GiB at 2K, 0.4 GiB at 4K)
        with torch.no_grad():
            decoded = [unpatchify(decoder(x[:, :, i:i + 1], cache)).float().clamp_(-1.0, 1.0)]
        if on_frame is not None:
            on_frame(i + 1, total)
        yield decoded.pop()  # no reference kept while suspended: the consumer's copy is the only one


def decoder_cache_elements(config: VAEConfig, latent_hw: tuple[int, int]) -> int:
    """Elements of the decoder's causal caches once it streams (after a few latent frames) for a latent of
    ``latent_hw``: exact, counted on the meta device (no memory, no compute). Bytes: times the element size."""
    with torch.device("meta"):
        decoder = Decoder3d(config)
    x = torch.empty(1, config.z_dim, 3, *latent_hw, device="meta")
    cache = CausalCache()
    with torch.no_grad():
        for i in range(x.shape[2]):
            cache.first_chunk = i == 0
            decoder(x[:, :, i:i + 1], cache)
    return sum(t.numel() for t in cache.history.values())


def decoder_halo(config: VAEConfig) -> int:
    """Output pixels next to a cut edge that a decode of a cropped latent can get wrong (conv receptive field).

    Every 3x3(x3) convolution widens the affected band by one column at its resolution and every x2
    upsample doubles it; the unpatchify doubles it once more. 276 pixels (17.25 latent columns) for the
    Wan2.2 structure, whatever the channel widths. The middle attention block is NOT included: it mixes
    all positions of a frame, so no finite overlap makes a tiled decode exact.
    """
    band = 1 + 2 * 2  # decoder.conv1, two convolutions in each middle residual block
    for i in range(len(config.dim_mult)):
        band += 2 * (config.num_res_blocks + 1)
        if i != len(config.dim_mult) - 1:
            band = 2 * band + 1  # nearest x2, then the 3x3 convolution
    band += 1  # head convolution
    return 2 * band
