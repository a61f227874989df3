"""The toy world: grammar, deterministic renders, and measurements that read a clip back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.toy.measure import classify_shape, measure, object_mask, sharpness
from pixelwizard_core.toy.vocab import vocabulary, write_tokenizer_json
from pixelwizard_core.toy.world import (
    COLOURS,
    MOTIONS,
    SHAPES,
    Scene,
    dataset,
    parse_prompt,
    random_scene,
    render,
    scene_from_prompt,
)


def test_prompt_grammar_round_trips():
    scene = Scene("triangle", "yellow", "split", "down")
    assert scene.prompt == "a yellow triangle moving down on a split background"
    assert parse_prompt(scene.prompt) == {"shape": "triangle", "colour": "yellow", "background": "split",
                                          "motion": "down"}
    assert Scene("circle", "red", "dark", "growing").prompt == "a red circle growing on a dark background"
    assert scene_from_prompt("A blue square moving left on a light background").shape == "square"


def test_unknown_words_are_refused():
    with pytest.raises(ConfigError, match="purple"):
        Scene("circle", "purple", "dark", "left")
    with pytest.raises(ConfigError, match="shape"):
        scene_from_prompt("a red thing moving left on a dark background")


def test_generator_is_deterministic_and_varied():
    first, again, other = dataset(12, 3, 5), dataset(12, 3, 5), dataset(12, 4, 5)
    assert first == again and first != other
    assert torch.equal(render(first[0], 64, 32, 5), render(again[0], 64, 32, 5))
    many = dataset(200, 0, 5)
    for name, table in (("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS)):
        assert {getattr(s, name) for s in many} == set(table)


@pytest.mark.parametrize("size", [(256, 128), (64, 32)])
def test_measurements_read_back_random_scenes(size):
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        scene = random_scene(generator, 5)
        m = measure(render(scene, *size, 5))
        assert (m.colour, m.shape, m.motion) == (scene.colour, scene.shape, scene.motion), scene


def test_motion_track_and_speed():
    scene = Scene("circle", "red", "gray", "right", x=0.3)
    m = measure(render(scene, 256, 128, 5))
    # 0.05 of the height per frame = 6.4 px at 128 px
    assert m.speed == pytest.approx(6.4, abs=0.5)
    xs = [x for x, _ in m.centroids]
    assert all(b > a for a, b in zip(xs, xs[1:]))
    still_y = {round(y) for _, y in m.centroids}
    assert len(still_y) == 1


def test_shape_classes_and_blur_lower_sharpness():
    assert [classify_shape(f) for f in (1.0, 0.79, 0.5)] == ["square", "circle", "triangle"]
    clip = render(Scene("square", "blue", "dark", "up"), 256, 128, 5)
    small = F.interpolate(clip.permute(0, 3, 1, 2), scale_factor=0.25, mode="area")
    blurred = F.interpolate(small, scale_factor=4, mode="bilinear").permute(0, 2, 3, 1)
    assert sharpness(clip) > 0.3
    assert sharpness(blurred) < 0.5 * sharpness(clip)


def test_shape_and_colour_survive_blur_and_a_fringe_of_another_hue():
    """A blurred square with a halo of another colour (what a VAE or codec does) still reads as a blue
    square; the halo is not part of the object, and the shapes stay apart."""
    for shape in ("square", "circle", "triangle"):
        clip = render(Scene(shape, "blue", "gray", "right", x=0.4), 256, 128, 5)
        small = F.interpolate(clip.permute(0, 3, 1, 2), scale_factor=0.25, mode="area")
        blurred = F.interpolate(small, scale_factor=4, mode="bilinear").permute(0, 2, 3, 1)
        halo = render(Scene(shape, "red", "gray", "right", x=0.4, radius=0.22), 256, 128, 5)
        fringed = torch.where(object_mask(blurred)[..., None], blurred, halo)
        m = measure(fringed)
        assert (m.colour, m.shape, m.motion) == ("blue", shape, "right"), (shape, m)


def test_flicker_sees_background_change_only():
    clip = render(Scene("circle", "green", "gray", "left"), 256, 128, 5)
    assert measure(clip).flicker == pytest.approx(0.0, abs=1e-6)
    noisy = clip.clone()
    noisy[2] = (noisy[2] + 0.1).clamp(0, 1)
    assert measure(noisy).flicker > 0.02


def test_no_object_is_reported_not_guessed():
    empty = torch.full((5, 32, 64, 3), 0.5)
    m = measure(empty)
    assert (m.colour, m.shape, m.motion) == ("none", "none", "none")
    assert not any(m.matches({"colour": "red", "shape": "circle", "motion": "left"}).values())


def test_tokenizer_file_reads_as_umt5_and_drops_foreign_words(tmp_path):
    from pixelwizard_core.loading.tokenizer import UMT5Tokenizer
    from pixelwizard_core.pipeline.presets import WAN_NEGATIVE_PROMPT

    tokenizer = UMT5Tokenizer.from_tokenizer_json(write_tokenizer_json(tmp_path / "tokenizer.json"), 16)
    vocab = vocabulary()
    ids, mask = tokenizer(["a red circle moving left on a dark background", WAN_NEGATIVE_PROMPT, ""])
    words = "a red circle moving left on a dark background".split()
    assert ids[0, :len(words) + 1].tolist() == [vocab[w] for w in words] + [1]
    assert ids[1].tolist() == ids[2].tolist() == [1] + [0] * 15  # like the empty prompt: </s> only
    assert mask.sum(1).tolist() == [10, 1, 1]


def test_the_recipe_runs_end_to_end_and_writes_files_the_loaders_read(tmp_path):
    """``train_all`` on a few steps of everything: four files in the published layouts, the 16-row text
    window recorded where the loaders look, the timings and the recipe in toy_training.json, and the
    cache reused by a second run (which trains nothing)."""
    import json

    from pixelwizard_core.loading import load_dit, load_hr_dit, load_t5_tokenizer
    from pixelwizard_core.toy.models import weight_paths, weights_present
    from pixelwizard_core.toy.recipe import ToyRecipe, train_all
    from pixelwizard_core.toy.vocab import TEXT_ROWS

    recipe = ToyRecipe(clips=2, lr_clips=3, vae_mix=((128, 64, 5, 1, 128),), vae_phases=((1, 1e-3, False),),
                       lr_dit_steps=2, lr_batch=2, hr_pretrain_steps=1, hr_shortcut_steps=2, batch=2)
    info = train_all(tmp_path / "w", recipe, cache=tmp_path / "cache")
    paths = weight_paths(tmp_path / "w")
    assert weights_present(tmp_path / "w")
    assert load_t5_tokenizer(paths["text"]).max_length == TEXT_ROWS
    assert load_dit(paths["lr"]).config.text_len == TEXT_ROWS
    assert load_hr_dit(paths["hr"]).config.text_len == TEXT_ROWS
    written = json.loads((tmp_path / "w" / "toy_training.json").read_text())
    assert written["recipe"]["lr_clips"] == 3 and set(written["timings_s"]) == set(info["timings_s"])
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["hr_data.pt", "hr_fm.pt", "hr_sc.pt", "lr_data.pt", "lr_dit.pt", "vae.pt"]
    from safetensors.torch import load_file

    before = load_file(paths["lr"])
    again = train_all(tmp_path / "w", recipe, cache=tmp_path / "cache")
    assert again["timings_s"] == {} and sorted(again["from_cache"]) == [n[:-3] for n in cached]
    assert sorted(info["timings_s"]) == [n[:-3] for n in cached] and info["from_cache"] == []
    after = load_file(paths["lr"])
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_toy_install_puts_each_file_where_the_comfyui_loaders_look(tmp_path):
    from pixelwizard_core.errors import MissingFileError
    from pixelwizard_core.loading.folders import tokenizer_folder
    from pixelwizard_core.toy.models import FILES, TOKENIZER_FILE, install

    source = tmp_path / "weights"
    source.mkdir()
    for name in (*FILES.values(), TOKENIZER_FILE):
        (source / name).write_bytes(name.encode())
    installed = install(tmp_path / "models", source)
    models = tmp_path / "models"
    assert installed["lr"] == models / "diffusion_models" / "pixelwizard_toy" / FILES["lr"]
    assert installed["hr"].parent == installed["lr"].parent
    assert installed["vae"] == models / "vae" / "pixelwizard_toy" / FILES["vae"]
    assert installed["tokenizer"].parent == installed["text"].parent == models / "text_encoders" / "pixelwizard_toy"
    assert tokenizer_folder(installed["text"]) == installed["text"].parent
    assert all(p.read_bytes() == p.name.encode() for p in installed.values())
    assert not [p for p in models.rglob("*") if p.name.startswith(".")]  # no temporary left
    (source / FILES["vae"]).unlink()
    with pytest.raises(MissingFileError, match="train-toy"):
        install(tmp_path / "other", source)
