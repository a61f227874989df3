"""The command line end to end on tiny random models in each published layout."""

from __future__ import annotations

import pytest
import torch
from spm_support import train_umt5_like_spm
from tiny_models import state_dicts, write_comfy, write_official, write_pixelwizard

from pixelwizard_core.cli import main
from pixelwizard_core.io.video import read_video
from pixelwizard_core.loading.identity import file_identity
from pixelwizard_core.pipeline.anchors import Anchor, load_hr_latent

# small but complete: 5 frames (2 latent frames), 128x64 anchor, 256x128 HR video, 2 decode tiles
DEVICE = ["--device", "cpu", "--dtype", "fp32"]
LR = ["--lr_size", "128*64", "--frame_num", "5", "--lr_steps", "3"]
HR = ["--resolution", "256x128", "--hr_steps", "2"]
DECODE = ["--num_patches", "2", "--overlap", "1"]
FAST = DEVICE + LR + HR + DECODE


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    states = state_dicts()
    spm_dir = root / "spm"
    spm_dir.mkdir()
    spiece = train_umt5_like_spm(spm_dir)
    return {"official": write_official(root / "Wan2.2-TI2V-5B", states, spiece),
            "comfy": write_comfy(root / "comfy", states, spiece),
            "pw": write_pixelwizard(root / "PixelWizard", states)}


def official_args(weights) -> list[str]:
    return ["--ckpt_dir", str(weights["official"]), "--lr_ckpt", str(weights["pw"]["lr"]),
            "--hr_ckpt", str(weights["pw"]["hr"])]


def comfy_args(weights) -> list[str]:
    c = weights["comfy"]
    return ["--dit", str(c["dit"]), "--text_encoder", str(c["t5"]), "--vae_path", str(c["vae"]),
            "--hr_ckpt", str(weights["pw"]["hr"])]


@pytest.mark.parametrize("layout", ["official", "comfy"])
def test_generate_writes_a_video_of_the_right_size(weights, tmp_path, layout):
    args = official_args(weights) if layout == "official" else comfy_args(weights)
    code = main(["generate", *args, *FAST, "--prompt", "a red fox in snow", "--video_dir", str(tmp_path / "v")])
    assert code == 0
    video = read_video(tmp_path / "v" / "0.mp4")
    assert tuple(video.shape) == (5, 128, 256, 3)
    assert video.float().std() > 0  # not a blank frame
    assert not list((tmp_path / "v").glob(".*partial"))


def test_stages_apart_equal_generate_in_one_go(weights, tmp_path):
    models = [*official_args(weights), *DEVICE]
    folder, pw = ["--ckpt_dir", str(weights["official"])], weights["pw"]
    assert main(["generate", *models, *LR, *HR, *DECODE, "--prompt", "a boat", "--base_seed", "7",
                 "--video_dir", str(tmp_path / "one"), "--save_dir", str(tmp_path / "one_latents")]) == 0
    # each stage command takes the weight flags of the models it loads, and only those
    assert main(["anchor", *folder, "--lr_ckpt", str(pw["lr"]), *DEVICE, *LR, "--prompt", "a boat",
                 "--base_seed", "7", "--anchor_dir", str(tmp_path / "anchors")]) == 0
    anchor = Anchor.load(tmp_path / "anchors" / "0.safetensors")
    assert (anchor.prompt, anchor.seed, anchor.frames, anchor.width) == ("a boat", 107, 5, 128)
    assert main(["upscale", *folder, "--hr_ckpt", str(pw["hr"]), *DEVICE, *HR,
                 str(tmp_path / "anchors" / "0.safetensors"), "--latent_only",
                 "--save_dir", str(tmp_path / "latents")]) == 0
    apart, meta = load_hr_latent(tmp_path / "latents" / "0.safetensors")
    together, one_meta = load_hr_latent(tmp_path / "one_latents" / "0.safetensors")
    assert meta["seed"] == 10007 and torch.equal(apart, together)
    hr_identity = str(file_identity(weights["pw"]["hr"]))
    assert meta["hr_model"] == one_meta["hr_model"] == hr_identity  # the HR model is recorded, by content
    assert meta["anchor_model"] == anchor.model == str(file_identity(weights["pw"]["lr"])) != hr_identity
    assert main(["decode", *folder, "--device", "cpu", *DECODE, str(tmp_path / "latents" / "0.safetensors"),
                 "--video_dir", str(tmp_path / "two"), "--png"]) == 0
    assert torch.equal(read_video(tmp_path / "two" / "0.mp4"), read_video(tmp_path / "one" / "0.mp4"))
    assert len(list((tmp_path / "two" / "0_frames").glob("*.png"))) == 5


def test_outputs_are_not_overwritten_unless_asked(weights, tmp_path):
    args = ["generate", *official_args(weights), *FAST, "--prompt", "x", "--video_dir", str(tmp_path)]
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["0.mp4", "0_1.mp4"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--frame_num": "6"}, "4k\\+1"),
        ({"--resolution": "250x128"}, "multiple of 32"),
        ({"--hr_steps": "9"}, "outside 2..8"),
        ({"--lr_ckpt": "HR"}, "--lr_ckpt/--dit: .* is 'hr_dit', but the lr stage needs 'dit'"),
        ({"--hr_ckpt": "LR"}, "--hr_ckpt: .* is 'dit', but the hr stage needs 'hr_dit'"),
        ({"--vae_path": "/nonexistent/vae.pth"}, "does not exist"),
        ({"--video_dir": "/proc/no_such_place"}, "cannot create output folder"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(weights, tmp_path, caplog, monkeypatch, change, message):
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role} despite bad input"))
    args = {"--video_dir": str(tmp_path), "--prompt": "x"}
    args.update({k: {"HR": str(weights["pw"]["hr"]), "LR": str(weights["pw"]["lr"])}.get(v, v) for k, v in change.items()})
    argv = ["generate", *official_args(weights), *FAST]
    for flag, value in args.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    assert any(__import__("re").search(message, r.getMessage()) for r in caplog.records), caplog.text


def test_empty_prompt_file_is_refused(weights, tmp_path, caplog):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert main(["generate", *official_args(weights), *FAST, "--prompt_file", str(empty)]) == 2
    assert "no prompts" in caplog.text


def test_decode_takes_only_the_vae_from_a_partial_official_folder(weights, tmp_path):
    import shutil

    from pixelwizard_core.pipeline.anchors import save_hr_latent

    folder = tmp_path / "Wan2.2-TI2V-5B"  # only the VAE was downloaded: decode needs nothing else
    folder.mkdir()
    shutil.copy(weights["official"] / "Wan2.2_VAE.pth", folder)
    latent = save_hr_latent(tmp_path / "l.safetensors", torch.randn(1, 48, 2, 4, 8), {"prompt": "a"})
    assert main(["decode", "--ckpt_dir", str(folder), "--device", "cpu", "--num_patches", "1", str(latent),
                 "--video_dir", str(tmp_path / "v")]) == 0
    assert tuple(read_video(tmp_path / "v" / "l.mp4").shape) == (5, 64, 128, 3)
