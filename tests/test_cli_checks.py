"""Every bad argument is refused with one message and exit code 2 before any model is loaded (issue 15, items
2 and 4), and the anchor/checkpoint geometry warnings (item 7)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_cli import FAST, official_args, weights  # noqa: F401 (fixture)

from pixelwizard_core import cli, cli_checks
from pixelwizard_core.cli import main
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.anchors import Anchor, save_hr_latent
from pixelwizard_core.pipeline.presets import HR_PRESETS, StageSettings


@pytest.fixture
def no_loading(monkeypatch):
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role} despite bad input"))


def _with(argv: list[str], change: dict[str, str]) -> list[str]:
    argv = list(argv)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


GENERATE_CASES = [
    ({"--lr_shift": "nan"}, r"--lr_shift nan: give a finite number"),
    ({"--hr_shift": "inf"}, r"--hr_shift inf: give a finite number"),
    ({"--lr_guide_scale": "nan"}, r"--lr_guide_scale nan: give a finite number"),
    ({"--hr_guide_scale": "inf"}, r"--hr_guide_scale inf: give a finite number"),
    ({"--overlap": "-5"}, r"--overlap -5: give 0 or more"),
    ({"--overlap": "40"}, r"--overlap 40 is not smaller than a tile's share"),
    ({"--crf": "99"}, r"--crf 99: libx264 takes 0 \(best\) to 51"),
    ({"--num_patches": "1000"}, r"--num_patches 1000 .*more than the latent's 16 width positions"),
    ({"--num_patches": "-2"}, r"--num_patches -2: give 0"),
    ({"--resolution": "100000x100000"}, r"100000x100000 with 5 frames: this stage would need about [\d.]+ TiB"),
    ({"--frame_num": "1000001"}, r"--lr_size 128x64 with 1000001 frames: this stage would need about"),
    ({"--base_seed": str(2**70)}, r"--base_seed 1180591620717411303424: give a seed from 0 to"),
    ({"--base_seed": "-5"}, r"--base_seed -5: give a seed from 0 to"),
    ({"--base_seed": str(2**63 - 5)}, r"the run adds up to 10000 to it"),
    ({"--hr_steps": "0"}, r"--hr_steps 0 is outside 2..8"),
    ({"--hr_shift": "0"}, r"--hr_shift 0.0: give a positive number"),
    ({"--lr_guide_scale": "0.5"}, r"--lr_guide_scale 0.5: give 1 or more"),
    ({"--frame_num": "6"}, r"--frame_num 6: frame count 6 is not of the form 4k\+1"),
    ({"--resolution": "250x128"}, r"--resolution 250x128: size 250x128 is not a multiple of 32"),
    ({"--video_dir": ""}, r"--video_dir is empty"),
    ({"--save_dir": " "}, r"--save_dir is empty"),
    ({"--dit": ""}, r"--dit is empty"),
    ({"--models": ""}, r"--models is empty"),
    ({"--decode_budget_gib": "nan"}, r"--decode_budget_gib nan: give a finite number"),
    ({"--device": "gpu0"}, r"--device 'gpu0': choose one of auto, cuda"),
]


@pytest.mark.parametrize("change, message", GENERATE_CASES, ids=[next(iter(c)) + "=" + v[:12] for c, _ in
                                                                   GENERATE_CASES for v in c.values()])
def test_generate_refuses_bad_arguments_before_loading(weights, tmp_path, caplog, no_loading, change, message):
    argv = _with(["generate", *official_args(weights), *FAST, "--prompt", "x", "--video_dir", str(tmp_path)], change)
    assert main(argv) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and re.search(message, errors[0]), caplog.text


def test_cuda_without_cuda_is_a_message(weights, tmp_path, caplog, no_loading, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _with(["generate", *official_args(weights), *FAST, "--prompt", "x", "--video_dir", str(tmp_path)],
                 {"--device": "cuda"})
    assert main(argv) == 2
    assert "sees no CUDA/ROCm GPU; use --device auto or cpu" in _errors(caplog)[0]


def test_stage_commands_under_torchrun_are_refused(tmp_path, caplog, no_loading, monkeypatch, anchor_file):
    """Every rank would run the whole command and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["anchor", "--prompt", "x", "--anchor_dir", str(tmp_path)], ["upscale", str(anchor_file)],
                 ["decode", str(anchor_file)]):
        caplog.clear()
        assert main(argv) == 2
        assert f"{argv[0]} runs in one process: under torchrun" in _errors(caplog)[0]


@pytest.fixture
def anchor_file(tmp_path):
    anchor = Anchor(torch.zeros(1, 48, 2, 4, 8), "a boat", "", seed=7, width=128, height=64, frames=5, steps=3,
                    shift=5.0, cfg=5.0)
    return anchor.save(tmp_path / "a.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"--hr_seed": str(2**63)}, r"--hr_seed 9223372036854775808: give a seed from 0 to"),
    ({"--hr_steps": "0"}, r"--hr_steps 0 is outside 2..8"),
    ({"--save_dir": ""}, r"--save_dir is empty"),
    ({"--crf": "-1"}, r"--crf -1"),
])
def test_upscale_refuses_bad_arguments_before_loading(weights, tmp_path, caplog, no_loading, anchor_file, change,
                                                      message):
    argv = ["upscale", "--ckpt_dir", str(weights["official"]), "--hr_ckpt", str(weights["pw"]["hr"]), "--device",
            "cpu", "--resolution", "256x128", str(anchor_file), "--save_dir", str(tmp_path / "l"), "--video_dir",
            str(tmp_path / "v")]
    assert main(_with(argv, change)) == 2
    assert re.search(message, _errors(caplog)[0]), caplog.text


def test_decode_checks_the_tiles_against_each_latent(weights, tmp_path, caplog, no_loading):
    latent = save_hr_latent(tmp_path / "l.safetensors", torch.zeros(1, 48, 2, 8, 16), {"prompt": "x"})
    argv = ["decode", "--ckpt_dir", str(weights["official"]), "--device", "cpu", "--num_patches", "17",
            str(latent), "--video_dir", str(tmp_path)]
    assert main(argv) == 2
    assert "more than the latent's 16 width positions" in _errors(caplog)[0]
    assert main([*argv[:-3], "", "--video_dir", str(tmp_path)]) == 2
    assert "an empty file name was given among the latents" in _errors(caplog)[-1]


def test_an_explicit_zero_is_never_replaced_by_the_preset():
    args = cli.build_parser().parse_args(["generate", "--resolution", "2k", "--hr_steps", "3", "--hr_shift", "7"])
    settings = cli_checks.hr_settings(args, 121)
    assert (settings.steps, settings.shift) == (3, 7.0)
    args = cli.build_parser().parse_args(["generate", "--resolution", "4k"])
    assert (cli_checks.hr_settings(args, 121).steps, cli_checks.hr_settings(args, 121).shift) == (4, 5.8)
    args.hr_steps = 0
    with pytest.raises(ConfigError, match="--hr_steps 0 is outside"):
        cli_checks.hr_settings(args, 121)


def test_presets_and_moderately_larger_sizes_pass_the_memory_cap():
    for preset in HR_PRESETS.values():
        cli_checks.check_memory_cap(StageSettings(preset.width, preset.height, 121, 4, 5.5, 5.0), "--resolution")
    cli_checks.check_memory_cap(StageSettings(5120, 2880, 121, 4, 5.5, 5.0), "--resolution")  # 5K
    with pytest.raises(ConfigError, match="4k \\(3840x2144, 121 frames\\), the largest preset"):
        cli_checks.check_memory_cap(StageSettings(7680, 4320, 121, 4, 5.5, 5.0), "--resolution")


def test_a_full_disk_while_saving_an_anchor_is_a_message(weights, tmp_path, caplog, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    argv = ["anchor", "--ckpt_dir", str(weights["official"]), "--lr_ckpt", str(weights["pw"]["lr"]), "--device", "cpu",
            "--dtype", "fp32", "--lr_size", "128*64", "--frame_num", "5", "--lr_steps", "2", "--prompt", "x",
            "--anchor_dir", str(tmp_path)]
    assert main(argv) == 2
    message = _errors(caplog)[0]
    assert f"could not save the anchor to {tmp_path / '0.safetensors'}: No space left on device" in message
    assert "choose another --anchor_dir" in message
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.jsonl"]  # no temporary file left
    entry = json.loads((tmp_path / "manifest.jsonl").read_text())
    assert (entry["status"], entry["file"], entry["error"]) == ("failed", None, message.removeprefix("error: "))


def test_a_full_disk_while_saving_a_latent_is_a_message(tmp_path, caplog, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    record = cli.RunRecord()
    with pytest.raises(ConfigError, match="could not save the HR latent to .*No space left on device; free some space "
                                          "on that disk or choose another --save_dir"):
        cli._save(record, "HR latent", "--save_dir", tmp_path / "0.safetensors", full)
    assert record.kept == []


# --- warnings: anchor geometry and checkpoint identity (item 7) ----------------------------------------


def test_a_stretched_anchor_is_warned_about(caplog):
    hr = StageSettings(2560, 1440, 121, 4, 5.5, 5.0)
    assert cli_checks.warn_anchor_geometry((448, 256), hr, "x") is False  # the reference's pairing: 1.6%
    assert cli_checks.warn_anchor_geometry((448, 256), StageSettings(3840, 2144, 121, 4, 5.8, 5.0), "x") is False
    assert cli_checks.warn_anchor_geometry((256, 256), hr, "a.safetensors") is True
    assert "a.safetensors: the anchor is 256x256 (aspect 1.000) but the HR size is 2560x1440" in caplog.text
    assert cli_checks.warn_anchor_geometry((448, 256), StageSettings(2560, 1536, 121, 4, 5.5, 5.0), "x") is True


def test_a_checkpoint_named_for_another_preset_is_warned_about(caplog):
    four_k = StageSettings(3840, 2144, 121, 4, 5.8, 5.0)
    assert cli_checks.checkpoint_preset("models/diffusion_models/PixelWizard/2k/model.pt") == "2k"
    assert cli_checks.checkpoint_preset("pixelwizard_4K_ema.safetensors") == "4k"
    assert cli_checks.checkpoint_preset("mine/model.pt") is None
    assert cli_checks.warn_checkpoint_preset("x/PixelWizard/4k/model.pt", four_k) is False
    assert cli_checks.warn_checkpoint_preset("x/PixelWizard/2k/model.pt", four_k) is True
    assert "is named for 2k, but 3840x2144 is served by the 4k checkpoint" in caplog.text


def test_upscale_warns_before_loading(weights, tmp_path, caplog, monkeypatch):
    anchor = Anchor(torch.zeros(1, 48, 2, 4, 4), "a", "", seed=1, width=64, height=64, frames=5, steps=3, shift=5.0,
                    cfg=5.0).save(tmp_path / "square.safetensors")
    monkeypatch.setattr(cli, "make_models", lambda *a, **k: (_ for _ in ()).throw(ConfigError("stop before loading")))
    hr = tmp_path / "4k" / "model.pt"
    hr.parent.mkdir()
    hr.write_bytes(weights["pw"]["hr"].read_bytes())
    argv = ["upscale", "--ckpt_dir", str(weights["official"]), "--hr_ckpt", str(hr), "--device", "cpu",
            "--resolution", "256x128", str(anchor), "--save_dir", str(tmp_path / "l"), "--video_dir", str(tmp_path)]
    assert main(argv) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("square.safetensors: the anchor is 64x64" in w for w in warnings), warnings
    assert any("is named for 4k, but 256x128 is served by the 2k checkpoint" in w for w in warnings), warnings
