"""The frontend extension's JavaScript: its own tests under Node's test runner, and its tables and VRAM formula
kept equal to the Python ones (presets.py, pipeline/memory.py) by evaluating the JS module under node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pixelwizard_core.pipeline import memory

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20) is not on PATH: the JS tests need it")


def run_js(expression: str):
    """Evaluate ``expression`` with the logic module imported as ``L``; return its JSON value."""
    module = (JS / "pixelwizard_logic.js").as_uri()
    script = f"const L = await import({json.dumps(module)}); console.log(JSON.stringify({expression}));"
    done = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_node_test_runner_passes_the_js_tests():
    files = sorted(str(p) for p in (JS / "tests").glob("*.test.mjs"))
    assert files, "no js/tests/*.test.mjs"
    done = subprocess.run([NODE, "--test", *files], capture_output=True, text=True, timeout=120, cwd=ROOT)
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.M)
    failed = re.search(r"^# fail (\d+)$", done.stdout, re.M)
    assert done.returncode == 0 and failed and failed.group(1) == "0", done.stdout[-4000:] + done.stderr[-2000:]
    assert passed and int(passed.group(1)) >= 10


def test_presets_match_the_python_presets():
    from pixelwizard_core.pipeline.presets import HR_PRESETS

    table = run_js("L.HR_PRESETS")
    python = {name: {"width": p.width, "height": p.height, "steps": p.steps, "shift": p.shift,
                     "num_patches": p.decode_patches} for name, p in HR_PRESETS.items()}
    assert table == python


def test_token_counts_match_the_python_settings():
    from pixelwizard_core.pipeline.presets import StageSettings

    sizes = [(448, 256, 121), (2560, 1440, 121), (3840, 2144, 121), (1280, 704, 81), (64, 32, 5)]
    got = run_js(f"{json.dumps(sizes)}.map(([w, h, f]) => L.tokenCount(w, h, f))")
    assert got == [StageSettings(w, h, f, 4, 5.0, 5.0).tokens for w, h, f in sizes]


def test_vram_estimate_equals_the_memory_model():
    constants = run_js("L.MEMORY")
    for name in ("DIT_PARAMS", "DIT_BLOCK_LINEAR_PARAMS", "DIT_BLOCKS", "DIT_BLOCK_PARAMS", "HR_DT_PARAMS", "HR_ADAPTER_PARAMS", "T5_PARAMS",
                 "VAE_PARAMS", "DIT_BYTES_PER_TOKEN", "DIT_CHUNK_BYTES", "SAMPLER_BYTES_PER_TOKEN", "T5_ACTIVATION_BYTES",
                 "PRECISION_BYTES"):
        assert constants[name] == getattr(memory, name), f"js/pixelwizard_logic.js MEMORY.{name} != memory.{name}"
    cases = [(2560, 1440, 121, "bf16"), (3840, 2144, 121, "bf16"), (1280, 704, 81, "fp16"), (2560, 1440, 121, "fp32"),
             (3840, 2144, 121, "fp8")]
    for mode, resident in (("offload", []), ("gpu", ["text", "lr", "hr", "vae"])):
        calls = [{"width": w, "height": h, "frames": f, "precision": p, "resident": resident} for w, h, f, p in cases]
        got = run_js(f"{json.dumps(calls)}.map((c) => L.estimateStages(c))")
        for (w, h, f, p), js in zip(cases, got):
            stages = memory.estimate_memory(w, h, f, mode=mode, precision=p).stages
            expected = {"text": stages["text"], "anchor": stages["anchor"], "hr": stages["hr"]}
            assert js == expected, f"{w}x{h} {f} frames {p} {mode}"
    # block swap: the sampling stages of the block_swap memory profile (its text encoder runs on the CPU instead)
    swap = memory.PROFILES["block_swap"].swap_blocks
    calls = [{"width": w, "height": h, "frames": f, "precision": p, "swapBlocks": swap} for w, h, f, p in cases]
    got = run_js(f"{json.dumps(calls)}.map((c) => L.estimateStages(c))")
    for (w, h, f, p), js in zip(cases, got):
        stages = memory.estimate_memory(w, h, f, mode="block_swap", precision=p).stages
        assert (js["anchor"], js["hr"]) == (stages["anchor"], stages["hr"]), f"{w}x{h} {f} frames {p} blockswap"


def test_memory_mode_choices_are_estimated_as_the_loaders_resolve_them():
    """Every memory_mode the loaders offer is understood by the JS estimate; "auto" follows ComfyUI's VRAM state,
    which the browser does not know, so it is estimated as "offload": what it resolves to in ComfyUI's normal VRAM
    mode (and outside ComfyUI)."""
    from nodes import host, loaders

    choices = list(loaders.memory_mode_input()[0])
    assert "auto" in choices
    got = run_js(f"{json.dumps(choices)}.map((c) => L.estimatedMemoryMode(c))")
    assert got == [host.memory_mode(c) for c in choices]
    assert got[choices.index("auto")] == "offload"


def test_js_reads_the_header_of_a_real_anchor_file(tmp_path):
    import torch

    from pixelwizard_core.pipeline.anchors import Anchor

    prompt = "un renard roux | dans la neige, 雪"
    path = Anchor(latent=torch.zeros(1, 48, 2, 4, 8), prompt=prompt, negative_prompt="", seed=2**40 + 3, width=128,
                  height=64, frames=5, steps=3, shift=5.0, cfg=5.0, model="lr.pt:42").save(tmp_path / "a.safetensors")
    module = (JS / "pixelwizard_logic.js").as_uri()
    script = (f"import {{ readFileSync }} from 'node:fs'; const L = await import({json.dumps(module)});"
              f"const bytes = new Uint8Array(readFileSync({json.dumps(str(path))}));"
              "console.log(JSON.stringify(L.anchorFromMetadata(L.safetensorsMetadata(bytes.subarray(0, 65536)))));")
    done = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"prompt": prompt, "seed": 2**40 + 3, "width": 128, "height": 64, "frames": 5,
                                       "steps": 3, "model": "lr.pt:42"}
