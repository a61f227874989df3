"""Pipeline pieces without models: prompt files, output names, presets, seeds, anchor resizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.jobs import output_path, read_prompts
from pixelwizard_core.pipeline.presets import (
    HR_PRESETS,
    LR_DEFAULTS,
    StageSettings,
    check_stage,
    parse_resolution,
    prompt_seeds,
)
from pixelwizard_core.pipeline.stages import check_anchor_fits, resize_anchor


def test_txt_and_jsonl_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert [(j.index, j.prompt) for j in read_prompts(prompt_file=txt)] == [(1, "a cat"), (2, "a dog")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": 7, "text": "x"}\n{"prompt_id": "b", "caption": "y", "negative_prompt": "n"}\n')
    jobs = read_prompts(prompt_file=jsonl)
    assert [(j.prompt_id, j.prompt, j.negative_prompt, j.output_index) for j in jobs] == [("7", "x", "", 0), ("b", "y", "n", 1)]


@pytest.mark.parametrize("content, message", [("", "no prompts"), ('{"id": 1}\n', "no 'text'"), ("{oops\n", "not valid JSON")])
def test_bad_prompt_files_are_refused(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(prompt_file=path)
    with pytest.raises(ConfigError, match="exactly one"):
        read_prompts("a", path)


def test_output_names_never_overwrite_unless_asked(tmp_path):
    first = output_path(tmp_path, "0", ".mp4", overwrite=False)
    first.write_bytes(b"x")
    second = output_path(tmp_path, "0", ".mp4", overwrite=False)
    assert (first.name, second.name) == ("0.mp4", "0_1.mp4")
    assert output_path(tmp_path, "0", ".mp4", overwrite=True) == first


def test_resolutions_presets_and_custom_sizes():
    assert parse_resolution("2k") == (2560, 1440, HR_PRESETS["2k"])
    assert parse_resolution("4K")[:2] == (3840, 2144)
    assert parse_resolution("1280x704") == (1280, 704, None)
    assert parse_resolution("1280*704")[:2] == (1280, 704)
    with pytest.raises(ConfigError, match="try 3840x2144"):
        parse_resolution("3840x2160")
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        parse_resolution("huge")


def test_stage_settings_are_checked_before_any_work():
    assert LR_DEFAULTS.latent_shape == (48, 31, 16, 28) and LR_DEFAULTS.tokens == 3472
    two_k = StageSettings(2560, 1440, 121, 4, 5.5, 5.0)
    assert two_k.latent_shape == (48, 31, 90, 160) and two_k.tokens == 111_600
    check_stage(two_k, hr=True)
    for bad, message in [(dict(frames=120), "4k\\+1"), (dict(steps=9), "outside 2..8"), (dict(width=2550), "multiple of 32"),
                         (dict(shift=0.0), "positive"), (dict(cfg=0.5), "at least 1"),
                         (dict(shift=float("nan")), "positive"), (dict(cfg=float("nan")), "at least 1"),
                         (dict(shift=float("inf")), "positive"), (dict(cfg=float("inf")), "at least 1")]:
        settings = StageSettings(**{**two_k.__dict__, **bad})
        with pytest.raises(ConfigError, match=message):
            check_stage(settings, hr=True)


def test_seeds_follow_the_reference():
    assert prompt_seeds(0, 1) == (100, 10000)
    assert prompt_seeds(0, 3) == (300, 10200)
    assert prompt_seeds(42, 2) == (242, 10142)
    lr_seed, hr_seed = prompt_seeds(5, 4)
    assert hr_seed == lr_seed + 9900  # what `upscale` uses to reproduce `generate` from an anchor file


def test_anchor_resize_is_per_frame_bilinear_to_the_token_grid(generator):
    latent = torch.randn(1, 48, 3, 16, 28, generator=generator)
    resized = resize_anchor(latent, 2560, 1440)
    assert resized.shape == (1, 48, 3, 45, 80)
    for index in range(3):  # bit for bit each frame resized on its own (the einops layout changes nothing)
        frame = F.interpolate(latent[:, :, index], size=(45, 80), mode="bilinear", align_corners=False)
        assert torch.equal(resized[:, :, index], frame)


def test_anchor_must_fit_the_hr_video():
    settings = StageSettings(512, 288, 9, 4, 5.5, 5.0)
    check_anchor_fits(torch.zeros(1, 48, 3, 16, 28), settings)
    with pytest.raises(ConfigError, match="frame count follows the anchor"):
        check_anchor_fits(torch.zeros(1, 48, 31, 16, 28), settings)
    with pytest.raises(ConfigError, match="expected \\[1, 48"):
        check_anchor_fits(torch.zeros(1, 16, 3, 16, 28), settings)


def test_anchor_files_round_trip_bit_exactly_and_refuse_tampering(tmp_path, generator):
    from pixelwizard_core.errors import WeightFormatError
    from pixelwizard_core.pipeline.anchors import Anchor, save_hr_latent

    anchor = Anchor(latent=torch.randn(1, 48, 31, 16, 28, generator=generator), prompt="a fox ☃", negative_prompt="",
                    seed=100, width=448, height=256, frames=121, steps=50, shift=5.0, cfg=5.0, model="lr/model.pt:123")
    path = anchor.save(tmp_path / "a.safetensors")
    loaded = Anchor.load(path)
    assert torch.equal(loaded.latent, anchor.latent) and loaded.metadata() == anchor.metadata()
    with pytest.raises(ConfigError, match="already exists"):
        anchor.save(path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFormatError, match="damaged"):
        Anchor.load(path)
    latent_file = save_hr_latent(tmp_path / "hr.safetensors", anchor.latent, {"seed": 1})
    with pytest.raises(WeightFormatError, match="'pixelwizard.anchor' was expected"):
        Anchor.load(latent_file)
    with pytest.raises(ConfigError, match="needs \\[1, 48, 31, 16, 28\\]"):
        Anchor(**{**anchor.__dict__, "latent": anchor.latent[:, :, :5]})


def test_cfg_branches_are_batched_only_when_the_estimate_fits():
    from pixelwizard_core.pipeline.memory import dit_activation_bytes
    from pixelwizard_core.pipeline.stages import cfg_batch_fits

    need = dit_activation_bytes(111_600, batch=2)  # 2K HR tokens
    assert cfg_batch_fits(111_600, need) is True
    assert cfg_batch_fits(111_600, need - 1) is False
    assert cfg_batch_fits(111_600, None) is None  # no budget (CPU): the stage's default
