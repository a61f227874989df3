"""End-to-end quality on the toy models: the real pipeline (loaders, both stages, tiled decode) generates
what the prompt says, the 4-step HR stage matches many steps, and broken variants are caught.

Slow (a few seconds of CPU per generated clip): listed in conftest.SLOW_MODULES.
"""

from __future__ import annotations

import pytest
import torch

from pixelwizard_core.toy import broken
from pixelwizard_core.toy.evaluate import (
    ANCHOR_TOLERANCE_PX,
    SEAM_TOLERANCE,
    TEST_PROMPTS,
    anchor_distance,
    check,
    generate,
    hr_settings,
    seam_column,
    seam_step,
    toy_pipeline,
)
from pixelwizard_core.toy.models import weights_present

# Until `train-toy` has written weights that pass these checks, the package ships none (the demo then
# uses random weights); the tests run as soon as the files are there.
pytestmark = pytest.mark.skipif(not weights_present(), reason="no toy weights shipped: run `python -m "
                                "pixelwizard_core train-toy` (issue 17: the trained models do not pass yet)")


@pytest.fixture(scope="module")
def pw():
    return toy_pipeline()


@pytest.fixture(scope="module")
def results(pw):
    return {prompt: generate(pw, prompt, seed=0) for prompt in TEST_PROMPTS}


def test_every_prompt_gives_its_colour_shape_and_motion(results):
    for prompt, result in results.items():
        failed = [name for name, ok in check(result).items() if not ok]
        assert not failed, (prompt, failed, result.measured)


def test_the_hr_clip_is_sharper_than_the_anchor_and_steady(results):
    for result in results.values():
        assert result.hr.shape == (5, 192, 384, 3) and result.anchor.shape == (5, 64, 128, 3)
        assert result.measured.sharpness > 2 * result.anchor_measured.sharpness
        assert result.measured.flicker < 0.03


@pytest.mark.parametrize("name", sorted(broken.VARIANTS))
def test_each_broken_variant_fails_the_checks(pw, name):
    prompts = TEST_PROMPTS[:3]
    with broken.VARIANTS[name]():
        outcomes = [check(generate(pw, prompt, seed=0)) for prompt in prompts]
    failing = [o for o in outcomes if not all(o.values())]
    assert len(failing) >= 2, (name, outcomes)


def test_four_shortcut_steps_match_many_steps_and_beat_four_flow_matching_steps(pw, results):
    """From the same anchors: the 4-step HR clip agrees with a 32-step one on the world's measurements;
    4 plain flow-matching steps (dt = 0) are blurrier."""
    for prompt in TEST_PROMPTS[:3]:
        anchor = results[prompt].extra["anchor"]
        four = results[prompt]
        many = generate(pw, prompt, seed=0, anchor=anchor, hr=hr_settings(steps=32))
        with broken.zero_step_size():
            plain = generate(pw, prompt, seed=0, anchor=anchor)
        a, b = four.measured, many.measured
        assert (a.colour, a.shape, a.motion) == (b.colour, b.shape, b.motion)
        centroid_gap = max(((x - u) ** 2 + (y - v) ** 2) ** 0.5 for (x, y), (u, v) in zip(a.centroids, b.centroids))
        assert centroid_gap < 4.0, centroid_gap
        assert a.sharpness == pytest.approx(b.sharpness, rel=0.25)
        assert plain.measured.sharpness < 0.85 * a.sharpness, (plain.measured.sharpness, a.sharpness)


def test_the_checks_can_fail_on_a_wrong_prompt(results):
    """A clip judged against another prompt's words fails: the checks read the clip, not the prompt."""
    red, blue = (results[p] for p in TEST_PROMPTS[:2])
    swapped = type(red)(blue.prompt, red.hr, red.anchor, red.measured, red.anchor_measured)
    assert not all(check(swapped).values())
    assert anchor_distance(red) < ANCHOR_TOLERANCE_PX and seam_step(red.hr, seam_column()) < SEAM_TOLERANCE
    assert torch.equal(swapped.hr, red.hr)


def test_demo_command_writes_a_clip_of_the_prompt(tmp_path):
    from pixelwizard_core.cli import main
    from pixelwizard_core.io.video import read_video
    from pixelwizard_core.toy.measure import measure

    assert main(["generate", "--demo", "--device", "cpu", "--video_dir", str(tmp_path),
                 "--prompt", "a green triangle moving left on a light background"]) == 0
    video = read_video(tmp_path / "0.mp4").float() / 255
    m = measure(video)
    assert (m.colour, m.shape, m.motion) == ("green", "triangle", "left"), m
