"""The command line end to end on tiny random models in each published layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from spm_support import train_umt5_like_spm
from tiny_models import DIT, state_dicts, write_comfy, write_official, write_pixelwizard

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
        ({"--image": "/nonexistent/start.png"}, "image file .* does not exist"),
        ({"--lora": "/nonexistent/style.safetensors:0.5"}, "--lora /nonexistent/style.safetensors:0.5: LoRA file .* "
                                                           "does not exist"),
        ({"--hr_lora": "BADLORA"}, "--hr_lora .*: .*not a Wan2.2-5B LoRA"),
        ({"--video_dir": "/proc/no_such_place"}, "cannot create output folder"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(weights, tmp_path, caplog, monkeypatch, change, message):
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role} despite bad input"))
    args = {"--video_dir": str(tmp_path), "--prompt": "x"}
    bad_lora = tmp_path / "other.safetensors"  # a LoRA of another model: no key names a Wan module
    save_file({"unet.down.0.lora_down.weight": torch.zeros(2, 8), "unet.down.0.lora_up.weight": torch.zeros(8, 2)},
              str(bad_lora))
    aliases = {"HR": str(weights["pw"]["hr"]), "LR": str(weights["pw"]["lr"]), "BADLORA": str(bad_lora)}
    args.update({k: aliases.get(v, v) for k, v in change.items()})
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


# --- add-ons: LoRAs and the start image --------------------------------------------------------------


def _lora_for_the_tiny_dit(folder) -> str:
    """A ComfyUI-format LoRA on blocks.0.self_attn.q of the tiny DiT, in ``folder``."""
    out_dim = in_dim = DIT.dim
    g = torch.Generator().manual_seed(3)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, in_dim, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(out_dim, 2, generator=g)},
              str(folder / "style.safetensors"))
    return "style.safetensors"


@pytest.mark.slow  # five tiny stage runs
def test_lora_flags_from_the_models_folder_change_the_run_and_strength_zero_does_not(weights, tmp_path):
    name = _lora_for_the_tiny_dit(tmp_path / "models" / "loras")
    folder = ["--ckpt_dir", str(weights["official"]), "--models", str(tmp_path / "models"), *DEVICE]
    anchors = {}
    for label, extra in {"none": [], "zero": ["--lora", f"{name}:0"], "half": ["--lora", f"{name}:0.5"]}.items():
        assert main(["anchor", *folder, "--lr_ckpt", str(weights["pw"]["lr"]), *LR, "--prompt", "a fox", *extra,
                     "--anchor_dir", str(tmp_path / label)]) == 0
        anchors[label] = Anchor.load(tmp_path / label / "0.safetensors").latent
    assert torch.equal(anchors["zero"], anchors["none"])  # strength 0: the base model, bit for bit
    assert not torch.allclose(anchors["half"], anchors["none"])  # the LR DiT changed, so did its anchor
    latents = {}
    for label, extra in {"plain": [], "hr": ["--hr_lora", f"{name}:0.5"]}.items():
        assert main(["upscale", *folder, "--hr_ckpt", str(weights["pw"]["hr"]), *HR, *extra, "--latent_only",
                     str(tmp_path / "none" / "0.safetensors"), "--save_dir", str(tmp_path / label)]) == 0
        latents[label] = load_hr_latent(tmp_path / label / "0.safetensors")[0]
    assert not torch.allclose(latents["hr"], latents["plain"])  # the HR model's own LoRA


def _two_colour_png(path, width: int = 96, height: int = 48) -> np.ndarray:
    from pixelwizard_core.io.video import encode_png

    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (230, 40, 30)
    image[:, width // 2:] = (20, 60, 220)
    path.write_bytes(encode_png(image))
    return image


def test_start_image_is_the_anchor_and_pinned_hr_first_frame(weights, tmp_path):
    from pixelwizard_core.io.video import read_image
    from pixelwizard_core.pipeline.first_frame import encode_first_frame
    from pixelwizard_core.pipeline.models import ModelFiles, Models

    _two_colour_png(tmp_path / "start.png")
    models = ["--ckpt_dir", str(weights["official"]), "--lr_ckpt", str(weights["pw"]["lr"]), *DEVICE]
    assert main(["anchor", *models, *LR, "--prompt", "a fox", "--image", str(tmp_path / "start.png"),
                 "--anchor_dir", str(tmp_path / "a")]) == 0
    assert main(["generate", *official_args(weights), *FAST, "--prompt", "a fox", "--image", str(tmp_path / "start.png"),
                 "--pin_image_hr", "--save_dir", str(tmp_path / "l"), "--video_dir", str(tmp_path / "v")]) == 0
    vae_models = Models(ModelFiles(vae=weights["official"] / "Wan2.2_VAE.pth"), vae_dtype=torch.float32)
    image = read_image(tmp_path / "start.png")
    with vae_models.use("vae") as vae:
        at_anchor = encode_first_frame(vae, image, 128, 64).latent
        at_hr = encode_first_frame(vae, image, 256, 128).latent
    anchor = Anchor.load(tmp_path / "a" / "0.safetensors")
    torch.testing.assert_close(anchor.latent[:, :, :1], at_anchor, rtol=0, atol=1e-5)
    hr_latent = load_hr_latent(tmp_path / "l" / "0.safetensors")[0]
    torch.testing.assert_close(hr_latent[:, :, :1], at_hr, rtol=0, atol=1e-5)
    assert not torch.allclose(hr_latent[:, :, 1:], torch.zeros_like(hr_latent[:, :, 1:]))  # the rest is sampled


def test_image_flag_refusals_come_before_any_load(weights, tmp_path, caplog, monkeypatch):
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role}"))
    argv = ["generate", *official_args(weights), *FAST, "--prompt", "x", "--video_dir", str(tmp_path)]
    assert main([*argv, "--pin_image_hr"]) == 2
    assert "--pin_image_hr pins the start image: give it with --image" in caplog.text
    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    assert main([*argv, "--image", str(tmp_path / "not_an_image.png")]) == 2
    assert "could not read not_an_image.png as an image" in caplog.text
    assert main(["generate", "--demo", "--lora", "x.safetensors", "--video_dir", str(tmp_path)]) == 2
    assert "--lora with --demo" in caplog.text
