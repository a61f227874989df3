"""Decode tiles chosen from a memory budget (num_patches=0): the choice, its limits, and the decode with it."""

from __future__ import annotations

import logging

import pytest

from pixelwizard_core.pipeline import memory
import torch
from conftest import scaled_tiny_vae

from pixelwizard_core.cli import build_parser, decode_settings
from pixelwizard_core.distributed.tiles import (
    choose_rank_tiles,
    needs_budget,
    plan_for_latent,
    rank_decode_bytes,
    resolve_settings,
)
from pixelwizard_core.pipeline.memory import GIB, HEADROOM_BYTES, HEADROOM_FRACTION, decode_bytes
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline import decode_budget
from pixelwizard_core.pipeline.decode_budget import (
    MIN_TILE_LATENT,
    auto_tiles,
    choose_tiles,
    free_device_bytes,
    preset_tiles,
)
from pixelwizard_core.pipeline.engine import DecodeSettings
from pixelwizard_core.pipeline.tile_plan import plan_tiles
from pixelwizard_core.pipeline.tiled_decode import tiled_decode, tiled_decode_stream

LATENT_2K, LATENT_4K = (90, 160), (134, 240)


def estimate(latent_hw, num_patches, patch_dim, order, precision, overlap=3) -> int:
    return decode_bytes(latent_hw[1] * 16, latent_hw[0] * 16, num_patches=num_patches, overlap=overlap,
                        patch_dim=patch_dim, order=order, vae_precision=precision)


def all_layouts(latent_hw, overlap=3):
    """Every (count, num_patches, patch_dim) the rule allows, enumerated independently of the module: cores of
    at least max(16, 2 * overlap) latent positions, one axis (the longer) or a grid."""
    smallest = max(16, 2 * overlap)
    max_rows, max_cols = max(1, latent_hw[0] // smallest), max(1, latent_hw[1] // smallest)
    layouts = [(1, 1, "w")] + [(c, c, "w") for c in range(2, max_cols + 1)]
    layouts += [(r * c, (r, c), "hw") for r in range(2, max_rows + 1) for c in range(2, max_cols + 1)]
    return layouts


def core_sizes(latent_hw, choice) -> list[int]:
    rows, cols = choice.num_patches if choice.patch_dim == "hw" else (
        (choice.num_patches, 1) if choice.patch_dim == "h" else (1, choice.num_patches))
    return [latent_hw[0] // rows] * (rows > 1) + [latent_hw[1] // cols] * (cols > 1)


# --------------------------------------------------------------------------------------------------
# choose_tiles


def test_a_big_budget_decodes_untiled():
    choice = choose_tiles(LATENT_2K, 200 * GIB, vae_precision="fp32")
    assert (choice.count, choice.order) == (1, "frame")
    assert choice.estimated_bytes == estimate(LATENT_2K, 1, "w", "frame", "fp32")


@pytest.mark.parametrize("latent_hw", [LATENT_2K, LATENT_4K])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shrinking_budgets_give_the_fewest_fitting_tiles_monotonically(latent_hw, precision):
    one_tile = estimate(latent_hw, 1, "w", "frame", precision)
    budgets = [int(one_tile * 1.2 * 0.93**k) for k in range(80)]  # down to 0.4% of the untiled decode
    seen, last = set(), (0, 0)
    for budget in budgets:
        try:
            choice = choose_tiles(latent_hw, budget, vae_precision=precision)
        except ConfigError:
            seen.add("error")
            continue
        assert "error" not in seen, "a smaller budget fitted after a larger one did not"
        assert choice.estimated_bytes <= budget
        assert choice.estimated_bytes == estimate(latent_hw, choice.num_patches, choice.patch_dim, choice.order,
                                                  precision)
        assert min(core_sizes(latent_hw, choice) or [latent_hw[1]]) >= MIN_TILE_LATENT
        # fewest tiles: no allowed layout with fewer tiles fits in this order, and frame order first
        for count, patches, dim in all_layouts(latent_hw):
            if count < choice.count:
                assert estimate(latent_hw, patches, dim, choice.order, precision) > budget, (budget, patches, dim)
            if choice.order == "tile":
                assert estimate(latent_hw, patches, dim, "frame", precision) > budget
        key = (choice.order == "tile", choice.count)
        assert key >= last, f"budget {budget / GIB:.1f} GiB chose {choice} after {last}"
        last = key
        seen.add((choice.order, "1" if choice.count == 1 else choice.patch_dim))
    assert {("frame", "1"), ("frame", "w"), ("tile", "w"), ("tile", "hw"), "error"} <= seen, seen


def test_a_grid_when_one_axis_cannot_fit_then_tile_order():
    layouts = all_layouts(LATENT_2K)
    best_axis = min(estimate(LATENT_2K, p, d, "frame", "fp32") for _, p, d in layouts if d != "hw")
    best_grid = min(estimate(LATENT_2K, p, d, "frame", "fp32") for _, p, d in layouts if d == "hw")
    assert best_grid < best_axis  # the estimate itself makes grids useful in frame order at 2K
    choice = choose_tiles(LATENT_2K, best_axis - 1, vae_precision="fp32")
    assert (choice.patch_dim, choice.order) == ("hw", "frame")
    choice = choose_tiles(LATENT_2K, best_grid - 1, vae_precision="fp32")
    assert choice.order == "tile"
    tiles = plan_tiles(LATENT_2K, choice.num_patches, choice.patch_dim, 3)
    assert choice.estimated_bytes < best_grid and len(tiles) == choice.count


def test_tile_order_asked_for_stays_in_tile_order():
    choice = choose_tiles(LATENT_2K, 200 * GIB, vae_precision="bf16", order="tile")
    assert (choice.count, choice.order) == (1, "tile")
    smaller = choose_tiles(LATENT_2K, 10 * GIB, vae_precision="bf16", order="tile")
    assert smaller.order == "tile" and smaller.count > 1 and smaller.estimated_bytes <= 10 * GIB


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nothing_fits_says_how_much_is_needed_and_what_to_change(precision):
    needed = min(estimate(LATENT_4K, p, d, o, precision)
                 for _, p, d in all_layouts(LATENT_4K) for o in ("frame", "tile"))
    with pytest.raises(ConfigError) as error:
        choose_tiles(LATENT_4K, needed - 1, vae_precision=precision)
    message = str(error.value)
    assert f"at least {needed / GIB:.1f} GiB" in message and "3840x2144" in message
    assert "smaller resolution" in message and "num_patches" in message
    assert ("bf16 VAE" in message) == (precision == "fp32")  # no advice to do what is already done
    assert choose_tiles(LATENT_4K, needed, vae_precision=precision).estimated_bytes == needed


def test_tiles_never_get_smaller_than_the_minimum():
    # 40 columns: 2 tiles of 20 are allowed, 3 of 13 are not; overlap 10 raises the minimum to 20
    assert [c.count for c in decode_budget.candidates((8, 40), vae_precision="fp32") if c.order == "frame"] == [1, 2]
    wide = decode_budget.candidates((8, 40), vae_precision="fp32", overlap=10)
    assert max(c.count for c in wide) == 2
    assert max(c.count for c in decode_budget.candidates((8, 39), vae_precision="fp32", overlap=10)) == 1
    assert {c.count for c in decode_budget.candidates((15, 15), vae_precision="fp32")} == {1}
    portrait = decode_budget.candidates((64, 20), vae_precision="fp32")  # splits the longer axis: height
    assert {c.patch_dim for c in portrait if c.count > 1} == {"h"}


def test_bad_overlap_is_refused():
    with pytest.raises(ConfigError, match="one overlap"):
        choose_tiles(LATENT_2K, GIB, vae_precision="fp32", overlap=(1, 2))
    with pytest.raises(ConfigError, match="order"):
        choose_tiles(LATENT_2K, GIB, vae_precision="fp32", order="row")


# --------------------------------------------------------------------------------------------------
# The budget


def test_no_budget_on_cpu_means_the_reference_defaults():
    assert free_device_bytes("cpu") is None and free_device_bytes(torch.device("cpu")) is None
    for latent_hw, count in ((LATENT_2K, 3), (LATENT_4K, 4), ((45, 80), 1), ((100, 200), 3)):
        choice = auto_tiles(latent_hw, "cpu", vae_precision="fp32")
        assert (choice.num_patches, choice.patch_dim, choice.order) == (count, "w", "frame")
        assert choice == preset_tiles(latent_hw, vae_precision="fp32")
    assert auto_tiles(LATENT_2K, "cpu", vae_precision="bf16", order="tile").order == "tile"


def test_cuda_budget_is_free_plus_reusable_cache_less_the_margin(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: calls.append(i) or (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 7 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 4 * GIB)
    expected = int((13 * GIB - HEADROOM_BYTES) / (1 + HEADROOM_FRACTION))
    assert free_device_bytes("cuda") == expected and free_device_bytes("cuda:1") == expected
    assert calls == [0, 1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (0, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 0)
    assert free_device_bytes("cuda") == 0  # never negative
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 * GIB, 80 * GIB))
    monkeypatch.setenv("PIXELWIZARD_RESERVE_VRAM_BYTES", str(3 * GIB))  # ComfyUI's --reserve-vram 3
    assert free_device_bytes("cuda") == int((7 * GIB - HEADROOM_BYTES) / (1 + HEADROOM_FRACTION))


def test_auto_shares_the_budget_within_a_batch_and_explains_failures(monkeypatch):
    monkeypatch.setattr(decode_budget, "free_device_bytes", lambda device: 40 * GIB)
    assert auto_tiles(LATENT_2K, "cpu", vae_precision="fp32", batch=2) == \
        choose_tiles(LATENT_2K, 20 * GIB, vae_precision="fp32")
    monkeypatch.setattr(decode_budget, "free_device_bytes", lambda device: GIB // 2)
    with pytest.raises(ConfigError, match="Usable memory on cpu"):
        auto_tiles(LATENT_2K, "cpu", vae_precision="bf16")


# --------------------------------------------------------------------------------------------------
# Decoding with num_patches=0


@pytest.fixture(scope="module")
def vae():
    return scaled_tiny_vae()


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 48, 2, 8, 32, generator=torch.Generator().manual_seed(3))  # 2 tiles at most


@pytest.fixture(scope="module")
def untiled(vae, latent) -> torch.Tensor:
    return tiled_decode(vae, latent, num_patches=1)


@pytest.mark.parametrize("expected_order", ["frame", "tile"])
def test_auto_decode_equals_the_explicit_decode_with_the_chosen_tiles(vae, latent, untiled, monkeypatch, caplog,
                                                                       expected_order):
    options = decode_budget.candidates((8, 32), vae_precision="fp32")
    one_tile_bytes = options[0].estimated_bytes
    frame = [c for c in options if c.order == "frame" and c.count > 1]
    # a budget that needs several tiles: just under the untiled decode, or under every frame-order choice
    budget = one_tile_bytes - 1 if expected_order == "frame" else min(c.estimated_bytes for c in frame) - 1
    monkeypatch.setattr(decode_budget, "free_device_bytes", lambda device: budget)
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        chunks = list(tiled_decode_stream(vae, latent, num_patches=0, patch_dim="h", overlap=3))
    choice = choose_tiles((8, 32), budget, vae_precision="fp32")
    assert choice.count > 1 and choice.order == expected_order and choice.patch_dim == "w"
    assert any("decode tiles (auto" in r.getMessage() and choice.describe() in r.getMessage() for r in caplog.records)
    explicit = tiled_decode(vae, latent, num_patches=choice.num_patches, patch_dim=choice.patch_dim, overlap=3,
                            order=choice.order)
    assert torch.equal(torch.cat(chunks, dim=2), explicit)
    assert not torch.equal(explicit, untiled)  # the tiles made a difference


def test_auto_decode_on_cpu_uses_the_preset_default(vae, latent, untiled, caplog):
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        auto = tiled_decode(vae, latent, num_patches=0)
    assert torch.equal(auto, untiled)  # 128x512: below 2K, one tile
    assert any("no memory budget" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="one overlap"):
        tiled_decode_stream(vae, latent, num_patches=0, overlap=(1, 2))


# --------------------------------------------------------------------------------------------------
# Multi-process plan and the command line


def rank_estimate(latent_hw, num_patches, patch_dim, order, world, precision="fp32", overlap=3) -> int:
    """The busiest rank's decode bytes, computed here from the memory model's constants independently of the module:
    the ceil(n / world) largest tiles' caches in frame order (one tile's in tile order), the largest tile's
    transient, and one tile's float32 piece and weighted copy of 4 frames."""
    tiles = plan_tiles(latent_hw, num_patches, patch_dim, overlap)
    areas = sorted(((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiles), reverse=True)
    held = areas[:-(-len(areas) // world)] if order == "frame" else areas[:1]
    half = precision != "fp32"
    cache = sum(held) * memory.VAE_CACHE_BYTES_PER_LATENT_PIXEL // (2 if half else 1)
    transient = areas[0] * (memory.VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL if half
                            else memory.VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL)
    return cache + transient + 4 * 3 * 4 * 2 * 256 * areas[0]


def test_rank_estimate_is_doctors_arithmetic_per_rank():
    for n, dim in ((1, "w"), (3, "w"), (4, "w"), ((2, 3), "hw")):
        tile = estimate(LATENT_4K, n, dim, "tile", "fp32")
        frame = estimate(LATENT_4K, n, dim, "frame", "fp32")
        # one process: tile order is doctor's estimate; frame order without the blended frame (rank 0 blends on
        # the host); as many ranks as tiles: every rank holds one tile, as tile order does
        assert rank_decode_bytes(LATENT_4K, n, dim, 3, order="tile", vae_precision="fp32", world_size=2) == tile
        assert rank_decode_bytes(LATENT_4K, n, dim, 3, order="frame", vae_precision="fp32", world_size=1) == \
            frame - 4 * 3 * 4 * LATENT_4K[0] * LATENT_4K[1] * 256
        assert rank_decode_bytes(LATENT_4K, n, dim, 3, order="frame", vae_precision="fp32", world_size=6) == tile
        assert rank_decode_bytes(LATENT_4K, n, dim, 3, order="frame", vae_precision="bf16", world_size=2) == \
            rank_estimate(LATENT_4K, n, dim, "frame", 2, "bf16")


def test_no_budget_keeps_the_reference_tiles_and_the_order():
    for order in ("frame", "tile"):
        choice = choose_rank_tiles(LATENT_4K, None, 2, vae_precision="fp32", order=order)
        assert (choice.num_patches, choice.patch_dim, choice.order) == (4, "w", order)
        explicit = choose_rank_tiles(LATENT_4K, None, 2, vae_precision="fp32", order=order, num_patches=5,
                                     patch_dim="h")
        assert (explicit.num_patches, explicit.patch_dim, explicit.order) == (5, "h", order)


@pytest.mark.parametrize("world", [2, 3])
def test_frame_order_kept_with_the_fewest_tiles_whose_rank_share_fits(world):
    # a budget the busiest rank's share of the reference's 4 tiles exceeds in frame order (the 24 GB card at
    # 4K the reference's whole-tile decode fitted), but a share of more tiles fits
    budget = rank_estimate(LATENT_2K, 4, "w", "frame", world) - 1
    choice = choose_rank_tiles(LATENT_2K, budget, world, vae_precision="fp32")
    assert choice.order == "frame" and choice.estimated_bytes <= budget
    assert (choice.num_patches, choice.patch_dim) != (4, "w")  # world 2: a 2x2 grid; world 3: 3 tiles, one each
    assert choice.estimated_bytes == rank_estimate(LATENT_2K, choice.num_patches, choice.patch_dim, "frame", world)
    for count, patches, dim in all_layouts(LATENT_2K):
        if count < choice.count:
            assert rank_estimate(LATENT_2K, patches, dim, "frame", world) > budget, (patches, dim)
    # the same budget in one process could not keep frame order with any tiles: the split is what helps
    assert choose_tiles(LATENT_2K, budget, vae_precision="fp32").order == "tile"
    big = choose_rank_tiles(LATENT_2K, 200 * GIB, world, vae_precision="fp32")
    assert (big.count, big.order) == (1, "frame")


def test_tile_order_with_the_fewest_tiles_when_no_frame_share_fits():
    frame_min = min(rank_estimate(LATENT_4K, p, d, "frame", 2) for _, p, d in all_layouts(LATENT_4K))
    budget = min(frame_min - 1, rank_estimate(LATENT_4K, 4, "w", "tile", 2) - 1)
    choice = choose_rank_tiles(LATENT_4K, budget, 2, vae_precision="fp32")
    assert choice.order == "tile" and choice.estimated_bytes <= budget
    assert choice.estimated_bytes == estimate(LATENT_4K, choice.num_patches, choice.patch_dim, "tile", "fp32")
    for count, patches, dim in all_layouts(LATENT_4K):
        if count < choice.count:
            assert estimate(LATENT_4K, patches, dim, "tile", "fp32") > budget
    # plain tile order asked for: no frame-order candidate at all, even where one would fit
    roomy = rank_estimate(LATENT_4K, 2, "w", "frame", 2)
    assert choose_rank_tiles(LATENT_4K, roomy, 2, vae_precision="fp32", order="tile").order == "tile"
    assert choose_rank_tiles(LATENT_4K, roomy, 2, vae_precision="fp32").order == "frame"


def test_explicit_tiles_only_change_the_order(caplog):
    fits = rank_estimate(LATENT_4K, 4, "w", "frame", 2)
    kept = choose_rank_tiles(LATENT_4K, fits, 2, vae_precision="fp32", num_patches=4)
    assert (kept.num_patches, kept.patch_dim, kept.order) == (4, "w", "frame")
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        fallback = choose_rank_tiles(LATENT_4K, fits - 1, 2, vae_precision="fp32", num_patches=4)
    assert (fallback.num_patches, fallback.patch_dim, fallback.order) == (4, "w", "tile")
    assert fallback.estimated_bytes == estimate(LATENT_4K, 4, "w", "tile", "fp32")
    assert any("decode order frame -> tile" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        tight = choose_rank_tiles(LATENT_4K, GIB, 2, vae_precision="fp32", num_patches=4)
    assert (tight.num_patches, tight.order) == (4, "tile")  # kept: the user's tiles, with a warning
    assert any(r.levelno == logging.WARNING and "may run out of memory" in r.getMessage() for r in caplog.records)


def test_nothing_fits_any_rank_says_how_much_and_what_to_change():
    needed = min(rank_estimate(LATENT_4K, p, d, o, 2) for _, p, d in all_layouts(LATENT_4K) for o in ("frame", "tile"))
    with pytest.raises(ConfigError) as error:
        choose_rank_tiles(LATENT_4K, needed - 1, 2, vae_precision="fp32")
    message = str(error.value)
    assert f"at least {needed / GIB:.1f} GiB on each process" in message and "3840x2144" in message
    for advice in ("bf16 VAE", "--num_patches", "smaller resolution"):
        assert advice in message
    assert choose_rank_tiles(LATENT_4K, needed, 2, vae_precision="fp32").estimated_bytes == needed


def test_resolved_settings_use_the_smaller_of_cap_and_free_memory_shared_by_the_batch():
    latent = torch.zeros(2, 48, 1, *LATENT_2K)
    auto = DecodeSettings(num_patches=0, budget_bytes=40 * GIB)
    expected = choose_rank_tiles(LATENT_2K, 20 * GIB, 2, vae_precision="bf16")
    for free in (None, 50 * GIB):  # the cap alone (CPU), or the cap below the free memory
        resolved = resolve_settings(latent, auto, world_size=2, free_bytes=free, vae_precision="bf16")
        assert (resolved.num_patches, resolved.patch_dim, resolved.order) == \
            (expected.num_patches, expected.patch_dim, expected.order)
        assert resolved.num_patches != 0 and resolved.budget_bytes == 40 * GIB and resolved.overlap == 3
    below = resolve_settings(latent, auto, world_size=2, free_bytes=30 * GIB, vae_precision="bf16")
    assert below.num_patches == choose_rank_tiles(LATENT_2K, 15 * GIB, 2, vae_precision="bf16").num_patches
    # resolving resolved settings changes nothing: the launchers may pass them on
    assert resolve_settings(latent, below, world_size=2, free_bytes=30 * GIB, vae_precision="bf16") == below
    plain = resolve_settings(latent[:1], DecodeSettings(num_patches=0), world_size=2)
    assert (plain.num_patches, plain.patch_dim, plain.order) == (3, "w", "frame")
    plan = plan_for_latent(latent, auto, world_size=2, vae_precision="bf16")  # what a rank builds from 0
    assert plan.tiles == plan_tiles(LATENT_2K, expected.num_patches, expected.patch_dim, 3)
    with pytest.raises(ConfigError, match="decode memory budget -1"):
        resolve_settings(latent, DecodeSettings(num_patches=0, budget_bytes=-1), world_size=2)
    assert needs_budget(DecodeSettings(num_patches=0, order="tile")) and needs_budget(DecodeSettings())
    assert not needs_budget(DecodeSettings(num_patches=3, order="tile"))


def test_single_process_cap_on_cpu_chooses_within_it(vae, latent, caplog):
    options = decode_budget.candidates((8, 32), vae_precision="fp32")
    cap = options[0].estimated_bytes - 1  # the untiled decode does not fit
    assert auto_tiles((8, 32), "cpu", vae_precision="fp32", cap_bytes=cap) == \
        choose_tiles((8, 32), cap, vae_precision="fp32")
    with caplog.at_level(logging.INFO, logger="pixelwizard"):
        chunks = list(tiled_decode_stream(vae, latent, num_patches=0, overlap=3, budget_bytes=cap))
    choice = choose_tiles((8, 32), cap, vae_precision="fp32")
    assert choice.count > 1 and any("allowed by the decode budget" in r.getMessage() for r in caplog.records)
    assert torch.equal(torch.cat(chunks, dim=2), tiled_decode(vae, latent, num_patches=choice.num_patches,
                                                              patch_dim=choice.patch_dim, order=choice.order))
    with pytest.raises(ConfigError, match=r"The decode budget you set, 0.0 GiB \(--decode_budget_gib\)"):
        auto_tiles((8, 32), "cpu", vae_precision="fp32", cap_bytes=0)


def test_cli_defaults_to_automatic_tiles():
    parser = build_parser()
    assert decode_settings(parser.parse_args(["decode", "latent.safetensors"])).num_patches == 0
    assert decode_settings(parser.parse_args(["decode", "--num_patches", "4", "x.safetensors"])).num_patches == 4
    with pytest.raises(ConfigError, match="num_patches"):
        decode_settings(parser.parse_args(["decode", "--num_patches", "-2", "x.safetensors"]))
    assert decode_settings(parser.parse_args(["decode", "x.safetensors"])).budget_bytes is None
    capped = decode_settings(parser.parse_args(["decode", "--decode_budget_gib", "20.5", "x.safetensors"]))
    assert capped.budget_bytes == int(20.5 * GIB)
    with pytest.raises(ConfigError, match="--decode_budget_gib"):
        decode_settings(parser.parse_args(["decode", "--decode_budget_gib", "-1", "x.safetensors"]))
