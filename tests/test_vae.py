"""Wan2.2 VAE: keys, parity with the official code, chunked decode API, the 2**31 element rule, halos."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import scaled_tiny_vae
import torch.nn.functional as F
from conftest import FIXTURES, manifest, meta_shapes
from safetensors import safe_open

import pixelwizard_core.models.vae_split_ops as split_ops
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    VAEConfig,
    WanVAE,
    decoder_halo,
    denormalize_latent,
    normalize_latent,
)
from pixelwizard_core.models.vae_network import patchify, unpatchify

TINY = VAEConfig.tiny()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


tiny_vae = scaled_tiny_vae

@pytest.fixture(scope="module")
def model() -> WanVAE:
    return tiny_vae()


@pytest.fixture
def op_sizes(monkeypatch) -> list[tuple[str, int, int]]:
    """Records (op, input numel, output numel) of every conv2d / conv3d / interpolate call."""
    calls: list[tuple[str, int, int]] = []
    for name in ("conv2d", "conv3d", "interpolate"):
        original = getattr(F, name)

        def recorded(x, *args, _name=name, _original=original, **kwargs):
            y = _original(x, *args, **kwargs)
            calls.append((_name, x.numel(), y.numel()))
            return y

        monkeypatch.setattr(F, name, recorded)
    return calls


# ---------------------------------------------------------------------------------------------- keys


def test_state_dict_matches_manifest():
    with torch.device("meta"):
        model = WanVAE()
    ours = meta_shapes(model)
    theirs = manifest("wan2.2_vae")["keys"]
    assert sorted(set(theirs) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(theirs)) == []  # unexpected
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    assert len(ours) == 196


def test_tiny_config_has_the_same_keys():
    with torch.device("meta"):
        tiny = WanVAE(TINY)
    assert set(tiny.state_dict()) == set(manifest("wan2.2_vae")["keys"])


def test_manifest_config_is_the_default():
    config = manifest("wan2.2_vae")["config"]
    default = VAEConfig()
    assert (default.dim, default.dec_dim, default.z_dim) == (config["dim"], config["dec_dim"], config["z_dim"])
    assert list(default.dim_mult) == config["dim_mult"]
    assert default.num_res_blocks == config["num_res_blocks"]
    assert list(default.temporal_downsample) == config["temperal_downsample"]


# ---------------------------------------------------------------------------------------------- parity


def _parity_fixture() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / "parity_vae.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])


def test_parity_with_official_fixture():
    """Our encode/decode equal the official WanVAE_ outputs stored by tools/parity/vae.py (tiny config)."""
    data, config = _parity_fixture()
    assert config == {"dim": TINY.dim, "dec_dim": TINY.dec_dim, "z_dim": TINY.z_dim,
                      "dim_mult": list(TINY.dim_mult), "num_res_blocks": TINY.num_res_blocks,
                      "temporal_downsample": list(TINY.temporal_downsample)}
    model = WanVAE(TINY).eval()
    weights = {k[len("model."):]: v.float() for k, v in data.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    encoded = model.encode(data["input.video"].float())
    decoded = model.decode(data["input.latent"])
    assert encoded.shape == data["official.encode"].shape
    assert decoded.shape == data["official.decode"].shape
    assert relative_error(encoded, data["official.encode"]) <= 1e-5
    assert relative_error(decoded, data["official.decode"]) <= 1e-5


# ---------------------------------------------------------------------------------------------- latents


def test_latent_statistics():
    assert len(LATENT_MEAN) == len(LATENT_STD) == 48
    assert (LATENT_MEAN[0], LATENT_MEAN[19], LATENT_MEAN[-1]) == (-0.2289, 0.5109, -0.0667)
    assert (LATENT_STD[0], LATENT_STD[39], LATENT_STD[-1]) == (0.4765, 1.6887, 0.7744)


def test_normalisation_uses_the_stored_reciprocal(generator):
    z = torch.randn(2, 48, 3, 4, 5, generator=generator)
    mean = torch.tensor(LATENT_MEAN).view(48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENT_STD).view(48, 1, 1, 1)
    assert torch.equal(denormalize_latent(z), z / inv_std + mean)
    assert torch.equal(normalize_latent(z), (z - mean) * inv_std)
    assert torch.equal(normalize_latent(z[0]), normalize_latent(z)[0])  # unbatched [48, T, H, W]
    torch.testing.assert_close(normalize_latent(denormalize_latent(z)), z, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="48"):
        normalize_latent(torch.zeros(1, 16, 1, 2, 2))


def test_patchify_channel_order_and_inverse(generator):
    video = torch.randn(2, 3, 5, 4, 6, generator=generator)
    x = patchify(video)
    assert x.shape == (2, 12, 5, 2, 3)
    for c, dy, dx in itertools.product(range(3), range(2), range(2)):
        assert torch.equal(x[:, c * 4 + dx * 2 + dy], video[:, c, :, dy::2, dx::2])
    assert torch.equal(unpatchify(x), video)


# ---------------------------------------------------------------------------------------------- API


def test_shapes_and_determinism(model, generator):
    latent = torch.randn(1, 48, 3, 2, 3, generator=generator)
    first, second = model.decode(latent), model.decode(latent)
    assert first.shape == (1, 3, 9, 32, 48) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert first.abs().max() <= 1.0
    video = torch.rand(2, 3, 9, 32, 16, generator=generator) * 2 - 1
    encoded = model.encode(video)
    assert encoded.shape == (2, 48, 3, 2, 1) and encoded.dtype == torch.float32
    assert torch.equal(encoded, model.encode(video))
    assert model.decode(encoded).shape == (2, 3, 9, 32, 16)


def test_batch_items_are_independent(model, generator):
    latent = torch.randn(2, 48, 2, 2, 2, generator=generator)
    both = model.decode(latent)
    torch.testing.assert_close(both[1:], model.decode(latent[1:]), rtol=0, atol=1e-5)


def test_stream_progress_and_abort(model, generator):
    latent = torch.randn(1, 48, 3, 2, 2, generator=generator)
    seen = []
    chunks = list(model.decode_stream(latent, on_frame=lambda done, total: seen.append((done, total))))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    whole = model.decode(latent)
    assert torch.equal(torch.cat(chunks, 2), whole)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt("user cancelled")

    with pytest.raises(KeyboardInterrupt):
        model.decode(latent, on_frame=stop_after_two)
    assert torch.equal(model.decode(latent), whole)  # nothing left over from the aborted call


@pytest.mark.parametrize("shape, message", [
    ((3, 5, 32, 32), "B, 3, F, H, W"),
    ((1, 4, 5, 32, 32), "3 colour channels"),
    ((1, 3, 4, 32, 32), "4n\\+1"),
    ((1, 3, 5, 40, 32), "multiples of 16"),
    ((1, 3, 5, 32, 24), "multiples of 16"),
])
def test_encode_rejects_bad_input(model, shape, message):
    with pytest.raises(ConfigError, match=message):
        model.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape, message", [
    ((48, 3, 2, 2), "latent \\[B, 48"),
    ((1, 16, 3, 2, 2), "48 latent channels"),
    ((1, 48, 0, 2, 2), "empty"),
])
def test_decode_rejects_bad_input_before_any_work(model, shape, message, op_sizes):
    with pytest.raises(ConfigError, match=message):
        model.decode_stream(torch.zeros(shape))  # raises on the call, not on the first frame
    assert op_sizes == []


def test_bfloat16(generator):
    model32, model16 = tiny_vae(), tiny_vae(dtype=torch.bfloat16)
    latent = torch.randn(1, 48, 2, 2, 2, generator=generator)
    decoded = model16.decode(latent)
    assert decoded.dtype == torch.float32
    assert relative_error(decoded, model32.decode(latent)) < 0.1
    video = torch.rand(1, 3, 5, 32, 32, generator=generator) * 2 - 1
    assert relative_error(model16.encode(video), model32.encode(video)) < 0.1


# ---------------------------------------------------------------------------------------------- 2**31 rule


@pytest.mark.parametrize("limit", [3000, 1400])  # 1400: some single rows too large -> column tiles
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_split_ops_equal_unsplit(monkeypatch, op_sizes, generator, dtype, tolerance, limit):
    """With MAX_OP_ELEMENTS lowered to a few thousand, every conv/upsample is split by frame and by
    row/column tiles with halos; outputs equal the unsplit ones. float64 shows the split arithmetic is
    exact (measured: 0.0); in float32 oneDNN picks other kernels for other tile shapes, which reorders
    sums (measured up to 3e-6 relative)."""
    model = tiny_vae(dtype=dtype)
    latent = torch.randn(2, 48, 3, 2, 3, generator=generator, dtype=dtype)
    video = torch.rand(1, 3, 9, 32, 48, generator=generator, dtype=dtype) * 2 - 1
    decoded, encoded = model.decode(latent), model.encode(video)
    unsplit_calls, unsplit_largest = len(op_sizes), max(max(i, o) for _, i, o in op_sizes)
    op_sizes.clear()

    monkeypatch.setattr(split_ops, "MAX_OP_ELEMENTS", limit)
    split_decoded, split_encoded = model.decode(latent), model.encode(video)
    assert unsplit_largest > 5 * limit
    assert len(op_sizes) > 3 * unsplit_calls
    assert {name for name, _, _ in op_sizes} == {"conv2d", "conv3d", "interpolate"}
    assert max(max(i, o) for _, i, o in op_sizes) <= limit
    assert relative_error(split_decoded, decoded) <= tolerance
    assert relative_error(split_encoded, encoded) <= tolerance


def test_real_sizes_respect_the_limit_on_meta(op_sizes):
    """The real network at 2560x1440 and 3840x2144, shapes only (meta device): no op over the limit,
    while the unsplit official schedule would pass 2**31 elements (2.84e9 and 6.34e9)."""
    with torch.device("meta"):
        model = WanVAE().to(torch.bfloat16)
    for height, width in ((90, 160), (134, 240)):
        op_sizes.clear()
        frames = [c.shape[2] for c in model.decode_stream(torch.empty(1, 48, 3, height, width, device="meta"))]
        assert frames == [1, 4, 4]
        assert max(max(i, o) for _, i, o in op_sizes) <= split_ops.MAX_OP_ELEMENTS < 2**31 - 1
    op_sizes.clear()
    assert model.encode(torch.empty(1, 3, 9, 2144, 3840, device="meta")).shape == (1, 48, 3, 134, 240)
    assert max(max(i, o) for _, i, o in op_sizes) <= split_ops.MAX_OP_ELEMENTS


def test_unsplit_real_sizes_would_exceed_int32(monkeypatch, op_sizes):
    monkeypatch.setattr(split_ops, "MAX_OP_ELEMENTS", 2**62)
    with torch.device("meta"):
        model = WanVAE()
    list(model.decode_stream(torch.empty(1, 48, 2, 90, 160, device="meta")))
    assert max(max(i, o) for _, i, o in op_sizes) > 2**31


# ---------------------------------------------------------------------------------------------- halos


def _bypass_attention(monkeypatch, model: WanVAE) -> None:
    monkeypatch.setattr(model.decoder.middle[1], "forward", lambda x: x)


def test_decoder_halo_is_the_conv_receptive_field(monkeypatch, generator):
    """NaN probe: latent columns right of a cut are NaN; the decoded columns that turn NaN left of the
    cut are exactly those the convolutions can reach. The middle attention is bypassed here (it would
    spread NaN to the whole frame)."""
    assert decoder_halo(TINY) == decoder_halo(VAEConfig()) == 276
    model = tiny_vae(dtype=torch.float64)
    _bypass_attention(monkeypatch, model)
    latent = torch.randn(1, 48, 2, 1, 40, generator=generator, dtype=torch.float64)
    latent[..., 20:] = float("nan")
    nan_columns = model.decode(latent).isnan().any(dim=(0, 1, 2, 3))
    assert nan_columns[20 * 16:].all()
    assert 20 * 16 - int(nan_columns.nonzero().min()) == decoder_halo(TINY)


def test_split_decode_matches_whole_beyond_the_halo(monkeypatch, generator):
    """Decode the left half of a latent and the whole latent, compare the left half's pixel columns.

    Findings (tiny config, 2 latent frames, width 48 -> 24 latent columns):
    * Convolutions only (attention bypassed): the columns differing by more than 1e-5 are the last
      ~190 px before the cut (188-197 measured over seeds/widths); exact-arithmetic reach is
      decoder_halo = 276 px = 17.25 latent columns; the difference decays with distance. Everything
      further than 276 px from the cut is equal.
    * With the middle attention (single head over all H*W latent positions of a frame) every column
      differs (0.1-0.4 at the far edge with these random weights): a tiled decode can never be exact.
    The structure of the real config is the same (same stages and blocks), so its conv reach is also 276 px;
    the official PixelWizard decode overlaps pieces by only 3 latent columns (48 px) per side.
    """
    model = tiny_vae()
    latent = torch.randn(1, 48, 2, 1, 48, generator=generator)
    width = 24 * 16
    whole = model.decode(latent)[..., :width]
    attended = (model.decode(latent[..., :24]) - whole).abs().amax(dim=(0, 1, 2, 3))
    assert attended[: width // 4].min() > 1e-3  # far from the cut, still different

    _bypass_attention(monkeypatch, model)
    whole = model.decode(latent)[..., :width]
    local = (model.decode(latent[..., :24]) - whole).abs().amax(dim=(0, 1, 2, 3))
    differing = local > 1e-5
    affected = width - int(differing.nonzero().min())
    assert 100 < affected <= decoder_halo(TINY)
    assert not differing[: width - decoder_halo(TINY)].any()
    assert differing[-1]


def test_streamed_frames_are_freed_once_the_consumer_drops_them():
    """The decode stream keeps no reference to frames it yielded (with every tile's stream suspended in
    frame order, a kept piece per tile would cost 0.2 GiB at 2K), and runs without autograd."""
    import weakref

    from conftest import scaled_tiny_vae

    vae = scaled_tiny_vae()
    stream = vae.decode_stream(torch.randn(1, 48, 3, 4, 4))
    first = next(stream)
    assert not first.requires_grad
    kept = weakref.ref(first)
    del first
    assert kept() is None
    assert next(stream).shape[2] == 4 and torch.is_grad_enabled()  # grad mode untouched between frames
