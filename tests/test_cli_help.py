"""Help for newcomers (issue 16): every option explained with its default, each stage command listing only the
weight flags it uses, a bare command printing the help, --version, and the README's commands valid."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from pixelwizard_core.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _shown(default: object) -> str:
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


@pytest.mark.parametrize("command", list(_commands()))
def test_every_option_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    text = _flat(parser.format_help())
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{command} {name} has no help"
        default = action.default
        if default is None or default is False or default == "" or not action.option_strings:
            continue
        assert f"(default: {_shown(default)})" in text or "default:" in action.help, f"{command} {name}: {default!r}"


def test_each_stage_command_lists_only_the_weights_it_loads():
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in _commands().items()}
    weights = {"--ckpt_dir", "--dit", "--lr_ckpt", "--hr_ckpt", "--text_encoder", "--vae_path"}
    assert options["generate"] >= weights | {"--vae_dtype", "--t5_cpu", "--block_swap", "--demo"}
    # anchor: the VAE only encodes --image
    assert options["anchor"] & weights == {"--ckpt_dir", "--dit", "--lr_ckpt", "--text_encoder", "--vae_path"}
    assert {"--image", "--lora", "--vae_dtype"} <= options["anchor"] and "--hr_lora" not in options["anchor"]
    assert {"--image", "--pin_image_hr", "--lora", "--hr_lora"} <= options["generate"]
    assert "--hr_lora" in options["upscale"] and not options["decode"] & {"--lora", "--hr_lora", "--image"}
    assert options["upscale"] & weights == {"--ckpt_dir", "--hr_ckpt", "--text_encoder", "--vae_path"}
    assert options["decode"] & weights == {"--ckpt_dir", "--vae_path"}
    assert not options["decode"] & {"--dtype", "--attention", "--block_swap", "--t5_cpu", "--offload_model"}
    for command in ("generate", "anchor", "upscale", "decode"):
        assert {"--models", "--download", "--device"} <= options[command], command


def test_offload_model_says_it_takes_true_or_false():
    text = _commands()["generate"].format_help()
    assert "--offload_model true|false" in text
    assert "(default: true on a CUDA GPU, else false)" in _flat(text)


def test_a_bare_command_prints_the_help_and_version_works(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pixelwizard") and "generate" in out and "download" in out
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(r"pixelwizard \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


# --- the README ----------------------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """The pixelwizard commands of the README's fenced shell blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for start, word in enumerate(words):
                if word == "pixelwizard" or words[start:start + 3] == ["python", "-m", "pixelwizard_core"]:
                    end = next((i for i in range(start, len(words)) if words[i] in ("&&", ";", "|")), len(words))
                    commands.append(words[start + (1 if word == "pixelwizard" else 3):end])
                    break
    return commands


def test_every_readme_command_is_one_the_command_line_accepts():
    commands = readme_commands()
    assert len(commands) >= 10 and ["generate", "--demo"] in commands
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as error:  # --help and --version exit 0
            assert error.code == 0, f"the README's `{shlex.join(argv)}` is refused (exit {error.code})"


def test_the_readme_names_the_console_script_and_a_cpu_only_install():
    assert re.search(r"^pixelwizard = \"pixelwizard_core\.cli:main\"$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert "pixelwizard generate --demo" in README
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "diffusion_models/PixelWizard/2k/model.pt" in README
    assert "diffusion_models/2k/model.pt" not in README
    assert "../shared/DESIGN.md" not in README


@pytest.mark.parametrize("argv", [["download", "--list"], ["generate", "--help"], ["--version"]])
def test_readme_commands_that_need_no_weights_run(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELWIZARD_MODELS", str(tmp_path))
    assert argv in readme_commands() or argv == ["--version"]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 0
    assert capsys.readouterr().out
