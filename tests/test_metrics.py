"""Detail metrics: mHD-MSE against a direct computation, layouts, chunking, the command, LPIPS messages."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwizard_core.cli import main
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.io.video import read_video, write_video
from pixelwizard_core.metrics import MetricUnavailable, hd_lpips, hd_mse, lpips_model, video_scores


def direct_mse(video: torch.Tensor, k: int) -> float:
    """The definition, written out: [F, 3, H, W] in [0, 1], bilinear down by 2^k (floor size), up, MSE."""
    h, w = video.shape[-2:]
    down = F.interpolate(video.double(), size=(h // 2**k, w // 2**k), mode="bilinear", align_corners=False)
    up = F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)
    return float((up - video.double()).pow(2).mean())


def test_hd_mse_is_the_mean_of_the_three_round_trip_errors():
    video = torch.rand(3, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    score = hd_mse(video)
    for k in (3, 4, 5):
        assert score.per_scale[k] == pytest.approx(direct_mse(video, k), rel=1e-5)
    assert score.value == pytest.approx(sum(score.per_scale.values()) / 3)
    assert hd_mse(video, reduce="sum").value == pytest.approx(sum(score.per_scale.values()))
    assert score.frames == 3 and score.size == (96, 160)


def test_layouts_and_chunking_give_one_answer():
    frames = torch.randint(0, 256, (19, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    as_float = frames.permute(0, 3, 1, 2).float() / 255
    a = hd_mse(frames)  # uint8 [F, H, W, 3], processed 8 frames at a time
    b = hd_mse(as_float)  # float [F, 3, H, W]
    c = hd_mse(frames.numpy())
    assert a.per_scale == pytest.approx(b.per_scale, rel=1e-6)
    assert a.per_scale == pytest.approx(c.per_scale, rel=1e-6)
    assert a.per_scale[3] == pytest.approx(direct_mse(as_float, 3), rel=1e-5)


def test_detail_ranks_sharp_above_smooth():
    y, x = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2])[None]
    stripes = ((torch.arange(128) // 2) % 2).float().expand(128, 128)
    sharp = torch.stack([stripes] * 3)[None]
    assert hd_mse(smooth).value < 2e-3 < 0.1 < hd_mse(sharp).value  # the ramp loses only at its borders
    assert hd_mse(torch.full((2, 3, 64, 64), 0.5)).value == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="too small"):
        hd_mse(torch.rand(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="reduce"):
        hd_mse(torch.rand(1, 3, 64, 64), reduce="max")
    with pytest.raises(ConfigError, match="frames must be"):
        hd_mse(torch.rand(2, 4, 64, 64))


def test_lpips_aggregation_with_a_stand_in_network():
    calls = []

    def fake_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.min().item(), a.max().item()))
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1] per frame, like lpips

    video = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    score = hd_lpips(video, model=fake_lpips)
    assert min(c[0] for c in calls) < -0.9 and max(c[1] for c in calls) > 0.9  # inputs mapped to [-1, 1]
    from pixelwizard_core.metrics import round_trip

    for k in (3, 4, 5):
        expected = float((2 * (video - round_trip(video, k))).abs().mean())
        assert score.per_scale[k] == pytest.approx(expected, rel=1e-5)


def test_lpips_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    try:
        import lpips  # noqa: F401
        expected = "alexnet-owt-7be5be79.pth"
    except ImportError:
        expected = "pip install lpips"
    with pytest.raises(MetricUnavailable, match=expected):
        lpips_model()


def test_metrics_command_on_an_mp4(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelwizard")
    generator = torch.Generator().manual_seed(3)
    frames = (torch.rand(5, 128, 192, 3, generator=generator) * 255).to(torch.uint8)
    path = write_video(tmp_path / "clip.mp4", [frames.numpy()], crf=0)
    out = tmp_path / "scores.json"
    assert main(["metrics", str(path), str(path), "--json", str(out)]) == 0
    scores = json.loads(out.read_text())[str(path)]["mHD-MSE"]
    decoded = read_video(path)
    assert scores["value"] == pytest.approx(hd_mse(decoded).value, rel=1e-9)
    assert "mHD-MSE" in caplog.text
    assert video_scores(path, reduce="sum")[0].value == pytest.approx(3 * scores["value"], rel=1e-9)
    assert np.isfinite(scores["value"]) and scores["value"] > 0
