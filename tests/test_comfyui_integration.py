"""The pack inside a real ComfyUI: skipped unless COMFYUI_ROOT points to a ComfyUI checkout.

Starts that ComfyUI (``COMFYUI_PYTHON``, default: this Python, must have ComfyUI's requirements) on
127.0.0.1 with a temporary base directory holding a link to this pack in custom_nodes/ and tiny random-weight
models under the Comfy-Org file names, then checks /object_info, queues API-format prompts through /prompt
(the full graph, an anchor swapped in from a file, an error, and every example workflow converted the way the
frontend does it, shrunk to tiny sizes), waits for them in /history and checks the files they wrote.

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python python -m pytest tests/test_comfyui_integration.py

ComfyUI imports torchvision at start-up (comfy/sd.py) but never uses it on this path. Where the given Python has
no working torchvision (a CPU-only torch with no matching CPU torchvision wheel), the test puts an empty stand-in
module on the server's PYTHONPATH; any real use of it raises.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pixelwizard_core.pipeline.anchors import Anchor
from pixelwizard_core.toy.models import FILES, INSTALL_SUBFOLDER
from pixelwizard_core.toy.models import install as toy_install
from pixelwizard_core.toy.models import weights_present as toy_weights_present

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK = "comfyui-pixelwizard"
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    not (COMFYUI_ROOT and (Path(COMFYUI_ROOT) / "main.py").is_file()),
    reason="set COMFYUI_ROOT to a ComfyUI checkout (and COMFYUI_PYTHON to a Python with its requirements)")

TORCHVISION_STUB = '''"""Stand-in: ComfyUI imports torchvision at start-up; PixelWizard never uses it."""
def __getattr__(name):
    raise AttributeError(f"torchvision is a test stand-in here ({name!r} unavailable)")
'''


class Server:
    def __init__(self, url: str, base: Path, log: Path, process: subprocess.Popen):
        self.url, self.base, self.log, self.process = url, base, log, process

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def run(self, prompt: dict, *, expect_error: bool = False) -> dict:
        """Queue an API-format prompt and wait for its /history entry."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": "pixelwizard-test"})
        assert status == 200 and not answer.get("node_errors"), f"rejected ({status}): {answer}\n{self.log_tail()}"
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                ok = entry["status"].get("status_str") == "success"
                assert ok != expect_error, f"{entry['status']}\n{self.log_tail()}"
                return entry
            assert self.process.poll() is None, f"ComfyUI exited\n{self.log_tail()}"
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s\n{self.log_tail()}")


def _needs_torchvision_stub() -> bool:
    probe = subprocess.run([COMFYUI_PYTHON, "-c", "import torchvision"], capture_output=True, timeout=120)
    return probe.returncode != 0


def comfy_env(scratch: Path) -> dict:
    """The environment of a ComfyUI process: the torchvision stand-in (written under ``scratch``) on its
    PYTHONPATH where the ComfyUI Python has no working torchvision."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if _needs_torchvision_stub():
        stub = scratch / "stubs" / "torchvision"
        for module in (stub / "__init__.py", stub / "transforms" / "__init__.py", stub / "transforms" / "functional.py"):
            module.parent.mkdir(parents=True, exist_ok=True)
            module.write_text(TORCHVISION_STUB)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scratch / "stubs"), env.get("PYTHONPATH")]))
    return env


RESERVE_VRAM_GIB = 0.5  # the test servers' --reserve-vram: our memory plans must leave it alone


def comfy_command(base: Path, port: int) -> list[str]:
    """``main.py --cpu`` on 127.0.0.1:``port`` with ``base`` as its base directory and only this pack."""
    return [COMFYUI_PYTHON, "main.py", "--cpu", "--reserve-vram", str(RESERVE_VRAM_GIB), "--listen", "127.0.0.1",
            "--port", str(port),
            "--disable-auto-launch", "--base-directory", str(base),
            "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK, "--preview-method", "none"]


def _write_models(models: Path, scratch: Path) -> None:
    from spm_support import train_umt5_like_spm
    from tiny_models import state_dicts, write_comfy, write_pixelwizard

    states = state_dicts()
    (scratch / "spm").mkdir()
    comfy = write_comfy(scratch / "staging", states, train_umt5_like_spm(scratch / "spm"))
    for folder, key in (("diffusion_models", "dit"), ("vae", "vae"), ("text_encoders", "t5")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.move(comfy[key], models / folder / comfy[key].name)
    # the workflows name the fp8 text encoder; the loader goes by the keys, so the fp16 file stands in for it
    shutil.copy(models / "text_encoders" / "umt5_xxl_fp16.safetensors",
                models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    files = write_pixelwizard(models / "diffusion_models" / "PixelWizard", states)
    (models / "diffusion_models" / "PixelWizard" / "4k").mkdir()
    shutil.copy(files["hr"], models / "diffusion_models" / "PixelWizard" / "4k" / "model.pt")
    write_pixelwizard(models / "diffusion_models" / "PixelWizardBig", big_states())
    _write_add_ons(models)
    if toy_weights_present():
        toy_install(models)


GGUF_DIT = "wan2.2_ti2v_5B-Q8_0.gguf"
GGUF_HR = "PixelWizard/2k/model-Q8_0.gguf"
LORA = "style_lora.safetensors"


def _write_add_ons(models: Path) -> None:
    """Q8_0 GGUF copies of the base and HR DiTs (our converter) and a ComfyUI-format LoRA in models/loras."""
    from safetensors.torch import save_file
    from tiny_models import DIT

    from pixelwizard_core.loading.gguf_write import convert_to_gguf

    dits = models / "diffusion_models"
    convert_to_gguf(dits / "wan2.2_ti2v_5B_fp16.safetensors", dits / GGUF_DIT, qtype="Q8_0")
    convert_to_gguf(dits / "PixelWizard" / "2k" / "model.pt", dits / GGUF_HR, qtype="Q8_0")
    g = torch.Generator().manual_seed(4)
    (models / "loras").mkdir()
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, DIT.dim, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(DIT.dim, 2, generator=g)},
              str(models / "loras" / LORA))


def big_states() -> dict:
    """LR and HR DiTs of width 1024 (8 heads of 128, 2 blocks: about 160 MB each in float32), so the memory
    they take is plain in the server's resident set."""
    import dataclasses

    from tiny_models import DIT, _weights

    from pixelwizard_core.models.dit import WanDiT
    from pixelwizard_core.models.hr import WanHRDiT

    config = dataclasses.replace(DIT, dim=1024, ffn_dim=4096, num_heads=8)
    return {"dit": _weights(WanDiT(config), 5), "hr": _weights(WanHRDiT(config), 6)}


def _write_clip(path: Path) -> None:
    from pixelwizard_core.io.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    t = torch.linspace(0, 1, 9).view(9, 1, 1, 1)
    frames = (torch.rand(1, 96, 160, 3) * 0.5 + t * 0.5) * 2 - 1
    write_video(path, [frames], fps=24, crf=10)


def _write_image(path: Path) -> None:
    """The image of the image-to-video workflow: two colour halves, 160x96."""
    from pixelwizard_core.io.video import encode_png

    image = torch.zeros(96, 160, 3, dtype=torch.uint8)
    image[:, :80] = torch.tensor([230, 40, 30], dtype=torch.uint8)
    image[:, 80:] = torch.tensor([20, 60, 220], dtype=torch.uint8)
    path.write_bytes(encode_png(image.numpy()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import free_port

    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    try:
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    except OSError:
        shutil.copytree(ROOT, base / "custom_nodes" / PACK, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    _write_models(base / "models", tmp_path_factory.mktemp("scratch"))
    _write_clip(base / "input" / "input_clip.mp4")
    _write_image(base / "input" / "start_image.png")
    for folder in ("output", "user", "temp"):
        (base / folder).mkdir(exist_ok=True)
    env = comfy_env(base)
    port = free_port()
    log = base / "comfyui.log"
    command = comfy_command(base, port)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ComfyUI exited at start-up:\n{srv.log_tail()}"
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"ComfyUI did not answer in {START_TIMEOUT_S} s\n{srv.log_tail()}"
                time.sleep(1)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def tiny_graph(seed: int = 100, prefix: str = "it") -> dict:
    """loader -> text -> LR anchor (+ save) -> HR -> decode to video, at 128x64 -> 256x128, 5 frames."""
    wan = ["1", 0]
    return {
        "1": {"class_type": "PixelWizardWanLoader", "inputs": {
            "diffusion_model": "wan2.2_ti2v_5B_fp16.safetensors", "vae": "wan2.2_vae.safetensors",
            "text_encoder": "umt5_xxl_fp16.safetensors", "precision": "fp32", "vae_precision": "fp32",
            "attention": "auto", "memory_mode": "gpu"}},
        "2": {"class_type": "PixelWizardCheckpointLoader", "inputs": {
            "checkpoint": "PixelWizard/lr/model.pt", "stage": "lr", "precision": "fp32", "attention": "auto",
            "memory_mode": "gpu"}},
        "3": {"class_type": "PixelWizardCheckpointLoader", "inputs": {
            "checkpoint": "PixelWizard/2k/model.pt", "stage": "hr", "precision": "fp32", "attention": "auto",
            "memory_mode": "offload"}},
        "4": {"class_type": "PixelWizardTextEncode", "inputs": {"wan": wan, "prompt": "a red fox in snow",
                                                                  "negative_prompt": ""}},
        "5": {"class_type": "PixelWizardAnchorSampler", "inputs": {
            "wan": wan, "conditioning": ["4", 0], "lr_model": ["2", 0], "width": 128, "height": 64, "frames": 5,
            "steps": 3, "shift": 5.0, "cfg": 5.0, "seed": seed, "solver": "unipc"}},
        "6": {"class_type": "PixelWizardAnchorSave", "inputs": {"anchor": ["5", 0], "filename_prefix": prefix}},
        "7": {"class_type": "PixelWizardHRSampler", "inputs": {
            "hr_model": ["3", 0], "anchor": ["5", 0], "conditioning": ["4", 0], "preset": "custom", "width": 256,
            "height": 128, "steps": 2, "shift": 5.5, "cfg": 5.0, "seed": 10000, "solver": "unipc"}},
        "8": {"class_type": "PixelWizardDecodeToVideo", "inputs": {
            "wan": wan, "latent": ["7", 0], "num_patches": 2, "patch_dim": "w", "overlap": 1, "blend": "cosine",
            "filename_prefix": f"pixelwizard/{prefix}", "fps": 24, "crf": 10}},
    }


def read_output_video(server: Server, relative: str) -> torch.Tensor:
    from pixelwizard_core.io.video import read_video

    path = server.base / "output" / relative
    assert path.is_file(), f"{path} missing"
    return read_video(path)


# ----------------------------------------------------------------------------------------------------- tests

def test_object_info_lists_every_node_as_declared(server):
    import nodes

    info = server.get("/object_info")
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id in info, f"{node_id} missing from /object_info\n{server.log_tail()}"
        entry = info[node_id]
        assert entry["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert entry["category"] == "PixelWizard" and entry["output"] == list(cls.RETURN_TYPES)
        declared = cls.INPUT_TYPES()
        assert entry["input_order"] == {group: list(declared[group]) for group in declared}
    wan = info["PixelWizardWanLoader"]["input"]["required"]
    assert "wan2.2_ti2v_5B_fp16.safetensors" in wan["diffusion_model"][0]
    assert "PixelWizard/2k/model.pt" in info["PixelWizardCheckpointLoader"]["input"]["required"]["checkpoint"][0]


def test_core_node_list_of_the_workflow_test_matches_this_comfyui(server):
    from test_workflows import CORE_NODES

    info = server.get("/object_info")
    for node_type, spec in CORE_NODES.items():
        if spec.get("frontend_only"):
            continue
        entry = info[node_type]
        order = entry["input_order"].get("required", []) + entry["input_order"].get("optional", [])
        assert order == [name for name, kind, _ in spec["inputs"] if kind != "UPLOAD"], node_type
        assert entry["output"] == [t for _, t in spec["outputs"]], node_type
        assert bool(entry["output_node"]) == bool(spec.get("output_node")), node_type


def test_full_graph_through_prompt_and_history(server):
    entry = server.run(tiny_graph())
    outputs = entry["outputs"]
    video = read_output_video(server, outputs["8"]["text"][0])
    assert tuple(video.shape) == (5, 128, 256, 3)
    assert outputs["6"]["text"] == ["output/it_seed100"]
    assert (server.base / "output" / "pixelwizard" / "anchors" / "it_seed100.safetensors").is_file()


def test_a_saved_anchor_is_listed_and_swapped_into_the_hr_stage(server):
    server.run(tiny_graph(seed=7, prefix="swap"))
    choices = server.get("/object_info/PixelWizardAnchorLoad")["PixelWizardAnchorLoad"]["input"]["required"]["anchor"][0]
    assert "output/swap_seed7" in choices  # no model suffix: the frontend would call it a missing model
    graph = {key: value for key, value in tiny_graph(prefix="swapped").items() if key not in ("2", "5", "6")}
    graph["9"] = {"class_type": "PixelWizardAnchorLoad", "inputs": {"anchor": "output/swap_seed7"}}
    graph["7"]["inputs"]["anchor"] = ["9", 0]
    outputs = server.run(graph)["outputs"]
    assert outputs["9"]["text"] == ["a red fox in snow | seed 7 | 128x64, 5 frames"]
    graph["9"]["inputs"]["anchor"] = "output/swap_seed7.safetensors"  # as workflows saved before named it
    graph["8"]["inputs"]["filename_prefix"] = "pixelwizard/swapped_again"
    assert server.run(graph)["outputs"]["9"]["text"] == outputs["9"]["text"]
    assert tuple(read_output_video(server, outputs["8"]["text"][0]).shape) == (5, 128, 256, 3)


def test_gguf_models_are_listed_and_run_with_a_lora_and_a_start_image(server):
    """ComfyUI's combos list .gguf files beside the safetensors; the graph runs on Q8_0 base and HR DiTs with a
    LoRA on the quantized base (a runtime delta) and a start image (ComfyUI's Load Image) as the first frame."""
    wan_inputs = server.get("/object_info/PixelWizardWanLoader")["PixelWizardWanLoader"]["input"]["required"]
    assert GGUF_DIT in wan_inputs["diffusion_model"][0] and "wan2.2_ti2v_5B_fp16.safetensors" in wan_inputs["diffusion_model"][0]
    checkpoints = server.get("/object_info/PixelWizardCheckpointLoader")["PixelWizardCheckpointLoader"]
    assert GGUF_HR in checkpoints["input"]["required"]["checkpoint"][0]
    loras = server.get("/object_info/PixelWizardLoRA")["PixelWizardLoRA"]["input"]["required"]["lora_name"][0]
    assert LORA in loras
    graph = {key: node for key, node in tiny_graph(prefix="gguf").items() if key != "2"}
    graph["1"]["inputs"]["diffusion_model"] = GGUF_DIT
    graph["3"]["inputs"]["checkpoint"] = GGUF_HR
    graph["10"] = {"class_type": "PixelWizardLoRA", "inputs": {"wan": ["1", 0], "lora_name": LORA, "strength": 0.8,
                                                               "hr_strength": 0.0}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "start_image.png"}}
    del graph["5"]["inputs"]["lr_model"]  # the anchor runs the Wan loader's (GGUF) DiT
    graph["5"]["inputs"].update(wan=["10", 0], start_image=["11", 0])
    outputs = server.run(graph)["outputs"]
    assert tuple(read_output_video(server, outputs["8"]["text"][0]).shape) == (5, 128, 256, 3)
    anchor = Anchor.load(server.base / "output" / "pixelwizard" / "anchors" / "gguf_seed100.safetensors")
    assert " + LoRA " in anchor.model and anchor.model.endswith(" @ 0.8"), anchor.model  # the anchor says so
    held = server.get("/pixelwizard/models")["models"]
    (lr,) = [m for m in held if m["role"] == "lr" and m["file"].endswith(GGUF_DIT)]
    (hr,) = [m for m in held if m["role"] == "hr" and m["file"].endswith("model-Q8_0.gguf")]
    assert lr["loras"] == [f"{LORA} @ 0.8"] and hr["loras"] == [], held  # on the quantized base only


def test_comfyuis_reserve_vram_reaches_our_memory_plans(server):
    """--reserve-vram 0.5: the budget of decode tiles and CFG batches (free_device_bytes) leaves it alone."""
    assert server.get("/pixelwizard/models")["reserved_vram_bytes"] == int(RESERVE_VRAM_GIB * 2**30)


def test_bad_input_is_an_execution_error_and_the_server_keeps_running(server):
    graph = tiny_graph(prefix="bad")
    graph["7"]["inputs"]["width"] = 250
    entry = server.run(graph, expect_error=True)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "multiple of 32" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "PixelWizardHRSampler"
    assert server.get("/system_stats")["system"]["comfyui_version"]


TINY_WIDGETS = {  # class -> inputs that make a workflow run in seconds on a CPU with the tiny models
    "PixelWizardAnchorSampler": {"width": 128, "height": 64, "frames": 5, "steps": 2},
    "PixelWizardHRSampler": {"preset": "custom", "width": 256, "height": 128, "steps": 2},
    "PixelWizardAnchorFromVideo": {"width": 128, "height": 64},
    "ImageFromBatch": {"length": 5},
    "PixelWizardDecodeToVideo": {"num_patches": 2, "overlap": 1},
    "PixelWizardMultiGPU": {"ulysses": 1, "dit_fsdp": True},  # the tiny DiT has 1 head: FSDP and split tiles only
}


def shrink(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node["inputs"].update(TINY_WIDGETS.get(node["class_type"], {}))
    return prompt


def run_workflow(server: Server, data: dict) -> dict:
    from test_workflows import to_api_prompt

    prompt = shrink(to_api_prompt(data))
    outputs = server.run(prompt)["outputs"]
    for node_id, node in prompt.items():
        if node["class_type"] in ("PixelWizardDecodeToVideo", "PixelWizardAnchorSave", "SaveVideo"):
            assert node_id in outputs, f"output node {node_id} ({node['class_type']}) produced nothing"
        if node["class_type"] == "PixelWizardDecodeToVideo":
            assert tuple(read_output_video(server, outputs[node_id]["text"][0]).shape) == (5, 128, 256, 3)
    return outputs


@pytest.mark.parametrize("name", ["text_to_2k_video", "text_to_4k_video", "video_to_2k", "image_to_2k_video"])
def test_example_workflow_runs(server, name):
    from test_workflows import load

    run_workflow(server, load(name))


TOY_FILES = {role: f"{INSTALL_SUBFOLDER}/{name}" for role, name in FILES.items()}  # as the combos list them


def toy_widgets(settings: dict, prompt: str) -> dict:
    """class -> inputs that point a text-to-video workflow at the toy models (``toy-install``) and sizes."""
    lr_width, lr_height = (int(v) for v in settings["lr_size"].split("*"))
    hr_width, hr_height = (int(v) for v in settings["resolution"].split("x"))
    files = {"precision": "fp32", "attention": "auto", "memory_mode": "gpu"}
    return {
        "PixelWizardWanLoader": {"diffusion_model": TOY_FILES["lr"], "vae": TOY_FILES["vae"],
                                 "text_encoder": TOY_FILES["text"], "vae_precision": "fp32", **files},
        "PixelWizardTextEncode": {"prompt": prompt, "negative_prompt": ""},
        "PixelWizardAnchorSampler": {"width": lr_width, "height": lr_height, "frames": settings["frame_num"],
                                     "steps": settings["lr_steps"], "shift": settings["lr_shift"],
                                     "cfg": settings["lr_guide_scale"], "seed": 0},
        "PixelWizardHRSampler": {"preset": "custom", "width": hr_width, "height": hr_height,
                                 "steps": settings["hr_steps"], "shift": settings["hr_shift"],
                                 "cfg": settings["hr_guide_scale"]},
        "PixelWizardDecodeToVideo": {"num_patches": settings["num_patches"], "overlap": settings["overlap"]},
    }


@pytest.mark.skipif(not toy_weights_present(), reason="no toy weights shipped")
def test_the_example_workflow_on_the_toy_models_draws_the_prompt(server):
    """text_to_2k_video pointed at the toy files that `toy-install` put in the models folder, at the toy
    sizes: ComfyUI's run gives a video whose measured colour, shape and motion are the prompt's."""
    from test_workflows import load, to_api_prompt

    from pixelwizard_core.toy.measure import measure
    from pixelwizard_core.toy.models import manifest
    from pixelwizard_core.toy.world import parse_prompt

    toy = manifest()
    widgets = toy_widgets(toy["settings"], toy["prompt"])
    prompt = to_api_prompt(load("text_to_2k_video"))
    for node in prompt.values():
        node["inputs"].update(widgets.get(node["class_type"], {}))
        if node["class_type"] == "PixelWizardCheckpointLoader":
            node["inputs"].update(checkpoint=TOY_FILES[node["inputs"]["stage"]], precision="fp32", memory_mode="gpu")
    outputs = server.run(prompt)["outputs"]
    decode = next(k for k, node in prompt.items() if node["class_type"] == "PixelWizardDecodeToVideo")
    video = read_output_video(server, outputs[decode]["text"][0]).float() / 255
    hr_width, hr_height = (int(v) for v in toy["settings"]["resolution"].split("x"))
    assert tuple(video.shape) == (toy["settings"]["frame_num"], hr_height, hr_width, 3)
    measured = measure(video)
    wanted = parse_prompt(toy["prompt"])
    assert (measured.colour, measured.shape, measured.motion) == (wanted["colour"], wanted["shape"], wanted["motion"]), \
        measured


def test_multi_gpu_workflow_runs_on_worker_processes_and_shuts_them_down(server):
    """The pool's stages run in 2 gloo worker processes under the real host; the enabled shutdown node
    (its 'after' input is ComfyUI's Any type, fed the VIDEO) stops them at the end."""
    from test_workflows import ACTIVE, load, nodes_of

    data = load("text_to_2k_video_multi_gpu")
    for node in nodes_of(data, "PixelWizardPoolShutdown"):
        node["mode"] = ACTIVE
    outputs = run_workflow(server, data)
    (shutdown,) = nodes_of(data, "PixelWizardPoolShutdown")
    assert outputs[str(shutdown["id"])]["text"] == ["PixelWizard workers stopped"]
    log = server.log.read_text(errors="replace")
    assert "[pixelwizard worker 1]" in log and "shut down" in log  # the work ran in the workers


def _rss(server: Server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


def _free_and_wait(server: Server, body: dict) -> dict:
    """POST /free, then wait until the pack's models route shows the effect (the prompt worker applies
    /free between prompts, and collects garbage once it has)."""
    status, _ = server.post("/free", body)
    assert status == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        held = server.get("/pixelwizard/models")
        if not held["models"] or not body.get("free_memory"):
            return held
        time.sleep(0.5)
    raise AssertionError(f"/free left {held}\n{server.log_tail()}")


def test_comfyui_lists_our_models_and_free_gives_their_memory_back(server):
    """The text-to-2K graph on width-1024 LR and HR DiTs: ComfyUI's model manager lists every model our
    nodes loaded, and POST /free (unload models + free memory) gives at least 90% of their bytes back to the
    system. The figures are written to the log for BENCHMARKS.md."""
    _free_and_wait(server, {"unload_models": True, "free_memory": True})  # start from nothing of ours
    graph = tiny_graph(prefix="big")
    graph["2"]["inputs"]["checkpoint"] = "PixelWizardBig/lr/model.pt"
    graph["3"]["inputs"]["checkpoint"] = "PixelWizardBig/2k/model.pt"
    graph["7"]["inputs"].update(width=256, height=128)
    server.run(graph)
    held = server.get("/pixelwizard/models")
    ours = sum(model["bytes"] for model in held["models"])
    assert sorted(m["role"] for m in held["models"]) == ["hr", "lr", "text", "vae"]
    assert all(model["listed_by_comfyui"] for model in held["models"]), held
    assert ours > 300 * 2**20
    before = _rss(server)
    assert _free_and_wait(server, {"unload_models": True, "free_memory": True})["models"] == []
    time.sleep(2)
    after = _rss(server)
    print(f"\nPixelWizard models {ours / 2**20:.0f} MiB; server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB "
          f"after /free (freed {(before - after) / 2**20:.0f} MiB = {(before - after) / ours:.0%} of the models)")
    assert before - after >= 0.9 * ours


def test_free_stops_the_worker_pool(server):
    """The multi-GPU workflow without its shutdown node leaves the workers running; the Unload button's
    POST /free stops them (ComfyUI's model manager cannot see other processes)."""
    from test_workflows import load

    run_workflow(server, load("text_to_2k_video_multi_gpu"))
    assert server.get("/pixelwizard/models")["pools"], "the workers should still be running"
    _free_and_wait(server, {"unload_models": True})
    assert server.get("/pixelwizard/models")["pools"] == []
    assert "/free stops the multi-GPU worker processes" in server.log.read_text(errors="replace")


EVICTION_CHECK = """
import sys
import torch
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [{pack!r}, {comfy!r}]  # the pack's `nodes` package before ComfyUI's nodes.py
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
from nodes.comfy_memory import ComfyModelManager
from pixelwizard_core.loading.identity import FileIdentity
from pixelwizard_core.pipeline.store import StoreKey

manager = ComfyModelManager(mm)
key = StoreKey("lr", FileIdentity("diffusion_models/x.safetensors", 1, "0"), "fp32", False)
model = torch.nn.Linear(512, 512)
manager.loaded(key, model)
manager.before_use(key, model, mm.get_torch_device(), resident_bytes=512 * 513 * 4, working_bytes=2**20)
assert manager.listed(key), "load_models_gpu did not list the model"
entry = next(e for e in mm.current_loaded_models if e.model is manager.patchers[key])
assert entry.model_memory() == 512 * 513 * 4 and entry.model.current_loaded_device() == mm.get_torch_device()
unloaded = mm.free_memory(1e30, mm.get_torch_device())  # what a native model that needs the room triggers
assert [e.model for e in unloaded] == [manager.patchers[key]] and not manager.listed(key)
manager.before_use(key, model, mm.get_torch_device(), resident_bytes=512 * 513 * 4, working_bytes=0)
manager.released(key)
assert not mm.current_loaded_models, mm.current_loaded_models
print("eviction ok")
"""


def test_comfyuis_model_manager_evicts_our_model_through_its_patcher(tmp_path):
    """The real comfy.model_management (in a ComfyUI Python): load_models_gpu lists a model of ours with the
    size we give, free_memory (what runs when a native model needs the room, or on Unload) evicts it through
    our patcher, and a released model leaves ComfyUI's list."""
    script = tmp_path / "evict.py"
    script.write_text(EVICTION_CHECK.format(pack=str(ROOT), comfy=str(COMFYUI_ROOT)))
    env = comfy_env(tmp_path)
    result = subprocess.run([COMFYUI_PYTHON, str(script)], cwd=COMFYUI_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "eviction ok" in result.stdout, result.stdout + result.stderr


def test_pick_an_anchor_workflow_both_steps(server):
    from test_workflows import MUTED, load

    data = load("pick_an_anchor")
    outputs = run_workflow(server, data)  # step 1 as loaded: three anchors previewed and saved
    saved = sorted(text for out in outputs.values() for text in out.get("text", []))
    assert saved == [f"output/anchor_seed{s}" for s in (100, 101, 102)]
    previews = [out for out in outputs.values() if "images" in out]
    assert len(previews) == 3 and all(p["images"][0]["filename"].endswith(".mp4") for p in previews)
    step2 = copy.deepcopy(data)  # step 2: unmute group 2; the anchor it loads now exists
    for node in step2["nodes"]:
        if node["mode"] == MUTED:
            node["mode"] = 0
    run_workflow(server, step2)
