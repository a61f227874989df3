"""Tiled VAE decode: the reference's tile plans and masks, exact partition of unity, streaming, seams."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import scaled_tiny_vae

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.vae import VAEConfig, WanVAE
from pixelwizard_core.pipeline.tile_plan import SCALE, plan_tiles, split_axis
from pixelwizard_core.pipeline.tiled_decode import blend_plan, cosine_axis_weights, tiled_decode, tiled_decode_stream

# Measured on this tiny random VAE (seed 0) and latent (seed 1), 3 patches along w, overlap 3:
# max |tiled - untiled| = 0.305 (cosine and reference blend), mean 0.0202 (cosine) / 0.0210 (reference);
# grid (2, 3): max 0.294, mean 0.0229. With overlap 0: max 0.623 / 0.708, mean 0.0455 / 0.0700.
# Most of the error is not at the seams: the VAE's middle attention block sees the whole frame, and a
# tile only sees itself. Bounds carry about 15% of margin for other CPUs and torch builds.
SEAM_MAX_BOUND = 0.35
SEAM_MEAN_BOUND = 0.027


tiny_vae = scaled_tiny_vae

@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return tiny_vae()


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 48, 2, 8, 24, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def untiled(vae, latent) -> torch.Tensor:
    return vae.decode(latent)


def weight_sum(plan) -> torch.Tensor:
    total = torch.zeros(plan.height, plan.width)
    for tile, mask in zip(plan.tiles, plan.masks):
        total[tile.pixels()] += mask
    return total


# --------------------------------------------------------------------------------------------------
# Planning


def test_reference_tile_plans_2k_4k():
    # pixelwizard_reference.md §6
    assert split_axis(160, 3, 3) == [(0, 56), (50, 109), (103, 160)]
    assert [(a * 16, b * 16) for a, b in split_axis(160, 3, 3)] == [(0, 896), (800, 1744), (1648, 2560)]
    assert split_axis(240, 4, 3) == [(0, 63), (57, 123), (117, 183), (177, 240)]
    assert [(a * 16, b * 16) for a, b in split_axis(240, 4, 3)] == [(0, 1008), (912, 1968), (1872, 2928),
                                                                     (2832, 3840)]
    tiles = plan_tiles((90, 160), 3, "w", 3)
    assert [t.cols for t in tiles] == split_axis(160, 3, 3) and {t.rows for t in tiles} == {(0, 90)}
    tiles = plan_tiles((134, 240), 2, "h", 3)
    assert [t.rows for t in tiles] == [(0, 70), (64, 134)] and {t.cols for t in tiles} == {(0, 240)}
    grid = plan_tiles((20, 30), (2, 3), "hw", (1, 2))
    assert [(t.rows, t.cols) for t in grid[:4]] == [((0, 11), (0, 12)), ((0, 11), (8, 22)), ((0, 11), (18, 30)),
                                                    ((9, 20), (0, 12))]
    assert len(grid) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_patches=25), "more than the latent's 24 width"),
    (dict(num_patches=-1), "at least 1"),
    (dict(overlap=-1), "overlap must be 0 or more"),
    (dict(patch_dim="x"), "patch_dim"),
    (dict(num_patches=(2, 2)), "must be an int"),
    (dict(patch_dim="hw", num_patches=(9, 2)), "height"),
    (dict(blend="linear"), "blend"),
    (dict(order="row"), "order"),
])
def test_arguments_are_checked_before_decoding(vae, latent, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiled_decode_stream(vae, latent, **kwargs)


def test_latent_shape_is_checked(vae):
    with pytest.raises(ConfigError, match="latent"):
        tiled_decode_stream(vae, torch.zeros(48, 2, 8, 24))
    with pytest.raises(ConfigError, match="48 latent channels"):
        tiled_decode_stream(vae, torch.zeros(1, 16, 2, 8, 24))


# --------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("patch_dim, num_patches, overlap", [
    ("w", 3, 3), ("h", 2, 3), ("hw", (2, 3), (3, 2)), ("hw", 3, 1), ("w", 5, 7), ("w", 4, 0), ("w", 24, 2),
    ("hw", 2, 4),  # overlap = base: both row tiles cover every row
])
def test_cosine_weights_sum_to_exactly_one(patch_dim, num_patches, overlap):
    plan = blend_plan((8, 24), num_patches, patch_dim, overlap, "cosine")
    assert plan.divisor is None
    total = weight_sum(plan)
    assert torch.equal(total, torch.ones_like(total))  # exactly, not approximately
    for mask in plan.masks:
        assert mask.dtype == torch.float32 and mask.min() >= 0 and mask.max() <= 1
        assert torch.equal(mask * 2**24, (mask * 2**24).round())  # dyadic: all sums and products exact


def test_cosine_weights_are_complementary_raised_cosines():
    (left, right) = cosine_axis_weights([(0, 80), (48, 128)], 128)  # band [48, 80): 32 pixels
    assert torch.equal(left[:48], torch.ones(48)) and torch.equal(right[32:], torch.ones(48))
    band_in = right[:32].double()
    expected = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(32, dtype=torch.float64) + 0.5) / 32)
    assert (band_in - expected).abs().max() <= 2.0**-13  # quantised to 2**-12
    assert bool((band_in.diff() > 0).all()) and 0 < band_in[0] < 0.01 and 0.99 < band_in[-1] < 1
    assert torch.equal(left[48:] + right[:32], torch.ones(32))


def reference_mask(size: int, ramp_length: int, leading: bool, trailing: bool) -> torch.Tensor:
    """Written from the reference's description (build_spatial_blend_mask), independently of ours."""
    mask = torch.ones(size)
    length = min(ramp_length, size)
    if length >= 2:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * torch.linspace(0, 1, steps=length))
    else:
        ramp = torch.zeros(length)
    if length and leading:
        mask[:length] = mask[:length] * ramp
    if length and trailing:
        mask[size - length:] = mask[size - length:] * ramp.flip(0)
    return mask


def reference_decode(vae: WanVAE, latent: torch.Tensor, num_patches: int, patch_dim: str, overlap: int):
    """The reference's whole-canvas algorithm (decode_latent_gpu_chunked), one axis, independently coded."""
    _, _, frames, h_lat, w_lat = latent.shape
    length = w_lat if patch_dim == "w" else h_lat
    base = length // num_patches
    canvas = torch.zeros(1, 3, 4 * (frames - 1) + 1, h_lat * 16, w_lat * 16)
    weight = torch.zeros(1, 1, h_lat * 16, w_lat * 16)
    for i in range(num_patches):
        start = max(0, base * i - (overlap if i > 0 else 0))
        stop = min(length, (length if i == num_patches - 1 else base * (i + 1)) + (overlap if i < num_patches - 1
                                                                                   else 0))
        ramp = reference_mask((stop - start) * 16, overlap * 16, i > 0, i < num_patches - 1)
        if patch_dim == "w":
            piece = vae.decode(latent[..., start:stop])
            mask = torch.ones(h_lat * 16)[:, None] * ramp[None, :]
            canvas[..., start * 16:stop * 16] += piece * mask
            weight[..., start * 16:stop * 16] += mask
        else:
            piece = vae.decode(latent[..., start:stop, :])
            mask = ramp[:, None] * torch.ones(w_lat * 16)[None, :]
            canvas[..., start * 16:stop * 16, :] += piece * mask
            weight[..., start * 16:stop * 16, :] += mask
    return canvas / weight.clamp_min(1e-6)


@pytest.mark.parametrize("patch_dim, num_patches, overlap", [("w", 3, 3), ("h", 2, 1), ("w", 2, 0)])
def test_reference_mode_equals_the_reference_algorithm(vae, latent, patch_dim, num_patches, overlap):
    ours = tiled_decode(vae, latent, num_patches, patch_dim, overlap, blend="reference")
    theirs = reference_decode(vae, latent, num_patches, patch_dim, overlap)
    assert torch.equal(ours, theirs)


def test_reference_masks_match_the_reference_formula():
    plan = blend_plan((8, 24), 3, "w", 3, "reference")
    for i, (tile, mask) in enumerate(zip(plan.tiles, plan.masks)):
        width = (tile.cols[1] - tile.cols[0]) * SCALE
        expected = reference_mask(width, 48, i > 0, i < 2)
        assert torch.equal(mask, expected.expand(128, width))
    assert mask[0, -1] == 1 and plan.masks[1][0, 0] == 0  # ramp starts at exactly 0 on interior edges only


# --------------------------------------------------------------------------------------------------
# Decoding


def whole_tile_blend(vae, latent, num_patches, patch_dim, overlap):
    """Non-streaming: decode each tile fully, then blend into one canvas with the same weights."""
    plan = blend_plan(tuple(latent.shape[-2:]), num_patches, patch_dim, overlap)
    canvas = torch.zeros(1, 3, 4 * (latent.shape[2] - 1) + 1, plan.height, plan.width)
    for tile, mask in zip(plan.tiles, plan.masks):
        piece = vae.decode(latent[..., tile.rows[0]:tile.rows[1], tile.cols[0]:tile.cols[1]])
        canvas[..., tile.pixels()[0], tile.pixels()[1]] += piece * mask
    return canvas


def test_stream_equals_whole_tile_decode(vae, latent):
    chunks = list(tiled_decode_stream(vae, latent, (2, 3), "hw", 2))
    assert [c.shape[2] for c in chunks] == [1, 4]
    streamed = torch.cat(chunks, dim=2)
    assert torch.equal(streamed, whole_tile_blend(vae, latent, (2, 3), "hw", 2))
    assert torch.equal(tiled_decode(vae, latent, (2, 3), "hw", 2), streamed)
    for blend in ("cosine", "reference"):  # one tile at a time gives the same bits
        frame_order = tiled_decode(vae, latent, 3, "w", 3, blend)
        assert torch.equal(tiled_decode(vae, latent, 3, "w", 3, blend, order="tile"), frame_order)


@pytest.mark.parametrize("patch_dim, num_patches", [("w", 1), ("h", 1), ("hw", (1, 1))])
def test_one_patch_is_the_untiled_decode(vae, latent, untiled, patch_dim, num_patches):
    assert torch.equal(tiled_decode(vae, latent, num_patches, patch_dim, 3), untiled)


@pytest.mark.parametrize("patch_dim, num_patches", [("w", 3), ("hw", (2, 3))])
def test_seam_error_is_bounded_and_overlap_helps(vae, latent, untiled, patch_dim, num_patches):
    errors, jumps = {}, {}
    seam = 8 * SCALE  # first boundary between width tiles, in pixels
    for overlap in (0, 3):
        error = tiled_decode(vae, latent, num_patches, patch_dim, overlap) - untiled
        errors[overlap] = (error.abs().max().item(), error.abs().mean().item())
        # a visible seam is a jump of the error between the two pixel columns either side of the cut
        jumps[overlap] = (error[..., seam] - error[..., seam - 1]).abs().max().item()
    assert errors[3][0] <= SEAM_MAX_BOUND and errors[3][1] <= SEAM_MEAN_BOUND, errors
    assert errors[0][0] > 1.5 * errors[3][0] and errors[0][1] > 1.5 * errors[3][1], errors
    assert jumps[0] > 1.5 * jumps[3], jumps


def test_progress_and_interrupt(vae, latent):
    calls = []
    list(tiled_decode_stream(vae, latent, 3, "w", 3, on_step=lambda done, total: calls.append((done, total))))
    assert calls == [(i, 6) for i in range(1, 7)]  # 2 latent frames x 3 tiles

    class Interrupted(Exception):
        pass

    def stop_at_4(done: int, total: int) -> None:
        if done == 4:
            raise Interrupted

    received = []
    with pytest.raises(Interrupted):
        for chunk in tiled_decode_stream(vae, latent, 3, "w", 3, on_step=stop_at_4):
            received.append(chunk)
    assert len(received) == 1  # the first latent frame came out before the interrupt
