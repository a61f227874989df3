"""A start image as the anchor's first frame (TI2V): parity with the official i2v loop, and the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import DIT, VAE

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.dit import WanDiT
from pixelwizard_core.models.vae import WanVAE
from pixelwizard_core.pipeline.first_frame import FirstFrame, cover_crop, encode_first_frame
from pixelwizard_core.pipeline.presets import StageSettings
from pixelwizard_core.pipeline.stages import lr_anchor
from pixelwizard_core.pipeline.text import TextConditioning

FIXTURE = Path(__file__).parent / "fixtures" / "parity_ti2v.safetensors"


def test_start_latent_timesteps_and_reinjection_equal_the_official_loop():
    """tools/parity/ti2v.py evaluated the official expressions with the official masks_like."""
    data = load_file(FIXTURE)
    first = FirstFrame(data["z"][None])
    keep = first.constraint(torch.device("cpu"))
    assert torch.equal(keep(data["noise"][None])[0], data["start"])
    assert torch.equal(keep(data["stepped"][None])[0], data["reinjected"])
    timesteps = FirstFrame.token_timesteps(data["t"][0], tuple(data["noise"].shape))
    assert torch.equal(timesteps, data["timesteps"])


def test_cover_crop_keeps_the_center_and_the_range():
    image = torch.linspace(0, 1, 300).expand(100, 300).unsqueeze(-1).expand(100, 300, 3).contiguous()
    video = cover_crop(image, 128, 64)  # height binds: 100 -> 64, width 300 -> 192, 32 cut on each side
    assert video.shape == (1, 3, 1, 64, 128)
    row = (video[0, 0, 0, 32] + 1) / 2
    assert abs(float(row[0]) - 32 / 192) < 0.01 and abs(float(row[-1]) - 160 / 192) < 0.01
    assert video.min() >= -1 and video.max() <= 1
    with pytest.raises(ConfigError, match="RGB"):
        cover_crop(torch.zeros(4, 4), 64, 32)


class Recorder(torch.nn.Module):
    """Wraps the DiT to keep the timesteps each call gets."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.seen = dit, []
        self.patch_embedding = dit.patch_embedding

    def forward(self, x, t, context, sp=None):
        self.seen.append(t.clone())
        return self.dit(x, t, context, sp=sp)


def test_anchor_keeps_the_start_frame_and_its_tokens_are_clean():
    torch.manual_seed(0)
    vae, dit = WanVAE(VAE).eval(), Recorder(WanDiT(DIT).eval())
    settings = StageSettings(128, 64, 9, 3, 5.0, 5.0, "unipc")
    image = torch.rand(80, 150, 3)
    with torch.no_grad():
        first = encode_first_frame(vae, image, settings.width, settings.height)
        context = torch.randn(1, 8, DIT.text_dim)
        anchor = lr_anchor(dit, TextConditioning(context, context.clone(), "p", "n"), settings, 7, first_frame=first)
        plain = lr_anchor(dit, TextConditioning(context, context.clone(), "p", "n"), settings, 7)
    assert torch.equal(anchor.latent[:, :, :1], first.latent)  # frame 0 is the image's latent, bit for bit
    assert not torch.equal(anchor.latent[:, :, 1:], plain.latent[:, :, 1:])  # and it conditions the rest
    tokens_per_frame = (64 // 32) * (128 // 32)
    with_image = dit.seen[:3]  # 3 steps, the CFG branches batched (a CPU has room)
    assert all(t.shape == (2, 3 * tokens_per_frame) for t in with_image)
    assert all(torch.all(t[:, :tokens_per_frame] == 0) and torch.all(t[:, tokens_per_frame:] > 0) for t in with_image)
    assert all(t.dim() == 1 for t in dit.seen[3:])  # without an image: one timestep per sample
    with torch.no_grad():  # the start frame decodes as the image's own round trip
        assert torch.equal(vae.decode(anchor.latent[:, :, :1]), vae.decode(first.latent))


def test_a_start_latent_of_another_size_is_refused():
    settings = StageSettings(128, 64, 5, 2, 5.0, 5.0, "unipc")
    with pytest.raises(ConfigError, match="encode the image at the stage's size"):
        lr_anchor(WanDiT(DIT), TextConditioning(torch.zeros(1, 8, DIT.text_dim), torch.zeros(1, 8, DIT.text_dim),
                                                "p", "n"), settings, 1, first_frame=FirstFrame(torch.zeros(1, 48, 1, 2, 2)))


def test_hr_model_with_uniform_per_token_timesteps_equals_per_sample():
    """The HR forward's per-token path (a pinned first frame) is the per-sample path when all tokens agree."""
    from pixelwizard_core.models.hr import WanHRDiT

    torch.manual_seed(0)
    model = WanHRDiT(DIT).eval()
    x = torch.randn(1, 48, 2, 8, 16)
    anchor = torch.randn(1, 48, 2, 4, 8)
    context = torch.randn(1, 8, DIT.text_dim)
    t, dt = torch.tensor([700.0]), torch.tensor([250.0])
    with torch.no_grad():
        per_sample = model(x, t, context, dt=dt, anchor=anchor)
        per_token = model(x, t[:, None].expand(1, 2 * 4 * 8), context, dt=dt, anchor=anchor)
    torch.testing.assert_close(per_token, per_sample, rtol=1e-5, atol=1e-6)


def test_hr_stage_can_pin_the_start_image():
    from pixelwizard_core.models.hr import WanHRDiT
    from pixelwizard_core.pipeline.stages import hr_latent

    torch.manual_seed(0)
    vae, model = WanVAE(VAE).eval(), WanHRDiT(DIT).eval()
    settings = StageSettings(256, 128, 5, 2, 5.5, 5.0, "unipc")
    context = torch.randn(1, 8, DIT.text_dim)
    text = TextConditioning(context, context.clone(), "p", "n")
    with torch.no_grad():
        first = encode_first_frame(vae, torch.rand(70, 150, 3), settings.width, settings.height)
        latent = hr_latent(model, torch.randn(1, 48, 2, 4, 8), text, settings, 3, first_frame=first)
    assert torch.equal(latent[:, :, :1], first.latent)
