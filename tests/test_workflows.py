"""The example workflows (workflows/*.json, ComfyUI UI format 0.4) load without missing nodes and run as wired.

Each node type must be a PixelWizard node (its inputs read from INPUT_TYPES) or one of the few core ComfyUI
nodes listed in CORE_NODES (inputs and outputs copied from ComfyUI 2a1f4026, March 2026). The frontend
restores widgets by position, so widget values are checked against the node's input order, kinds, options and
ranges; links must join existing slots of the same type, and node and link ids must agree on both ends.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
EXPECTED = {"text_to_2k_video", "text_to_4k_video", "pick_an_anchor", "video_to_2k", "text_to_2k_video_multi_gpu",
            "image_to_2k_video"}
ANY = "*"  # an input of this type accepts any link (ComfyUI's legacy 'Any' type)
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
ACTIVE, MUTED, BYPASSED = 0, 2, 4

# Core ComfyUI nodes the workflows use (ComfyUI 2a1f4026): ordered inputs as (name, kind, options) where kind is
# a socket type, a widget kind, a list of combo options, "FILE" (a combo listing files) or "UPLOAD" (the upload
# button, saved as "image"); then the outputs as (name, type). "Note" is a frontend-only node.
CORE_NODES: dict[str, dict] = {
    "Note": {"inputs": [("text", "STRING", {})], "outputs": [], "frontend_only": True},
    # comfy_extras/nodes_video.py
    "LoadVideo": {"inputs": [("file", "FILE", {}), ("upload", "UPLOAD", {})], "outputs": [("VIDEO", "VIDEO")]},
    "GetVideoComponents": {"inputs": [("video", "VIDEO", {})],
                           "outputs": [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]},
    "CreateVideo": {"inputs": [("images", "IMAGE", {}), ("fps", "FLOAT", {"min": 1.0, "max": 120.0}),
                               ("audio", "AUDIO", {"optional": True})], "outputs": [("VIDEO", "VIDEO")]},
    "SaveVideo": {"inputs": [("video", "VIDEO", {}), ("filename_prefix", "STRING", {}), ("format", ["auto", "mp4"], {}),
                             ("codec", ["auto", "h264"], {})], "outputs": [], "output_node": True},
    # nodes.py
    "LoadImage": {"inputs": [("image", "FILE", {}), ("upload", "UPLOAD", {})],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    # comfy_extras/nodes_images.py
    "ImageFromBatch": {"inputs": [("image", "IMAGE", {}), ("batch_index", "INT", {"min": 0, "max": 4095}),
                                  ("length", "INT", {"min": 1, "max": 4096})], "outputs": [("IMAGE", "IMAGE")]},
}

# Combos whose options are the files found at run time: checked against the published file names instead.
FILE_COMBOS = {("PixelWizardWanLoader", "diffusion_model"), ("PixelWizardWanLoader", "vae"),
               ("PixelWizardWanLoader", "text_encoder"), ("PixelWizardCheckpointLoader", "checkpoint"),
               ("PixelWizardAnchorLoad", "anchor")}
MODEL_FILES = {"wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
               "umt5_xxl_fp16.safetensors", "PixelWizard/lr/model.pt", "PixelWizard/2k/model.pt", "PixelWizard/4k/model.pt"}


@pytest.fixture(autouse=True)
def _no_models(tmp_path, monkeypatch):
    """File combos list nothing: the checks must not depend on what happens to be in ./models."""
    monkeypatch.setenv("PIXELWIZARD_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("PIXELWIZARD_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("PIXELWIZARD_INPUT", str(tmp_path / "input"))


def pack_nodes() -> dict:
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def node_spec(node_type: str) -> dict | None:
    """{"inputs": [(name, kind, options)], "outputs": [(name, type)], "output_node": bool} or None if unknown."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = pack_nodes().get(node_type)
    if cls is None:
        return None
    inputs = []
    for group in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(group, {}).items():
            options = dict(spec[1]) if len(spec) > 1 else {}
            options["optional"] = group == "optional"
            kind = "FILE" if (node_type, name) in FILE_COMBOS else spec[0]
            inputs.append((name, kind, options))
    return {"inputs": inputs, "outputs": list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_KINDS or kind in ("FILE", "UPLOAD")


def widget_slots(spec: dict) -> list[tuple[str, object, dict]]:
    """The positional widgets_values layout: each widget input, plus the control value after a seed."""
    slots = []
    for name, kind, options in spec["inputs"]:
        if is_widget(kind):
            slots.append((name, kind, options))
            if options.get("control_after_generate"):
                slots.append((f"{name}:control", sorted(SEED_CONTROLS), {}))
    return slots


def sockets(spec: dict) -> list[tuple[str, str, dict]]:
    return [(n, k, o) for n, k, o in spec["inputs"] if not is_widget(k)]


def check_value(where: str, kind, options: dict, value) -> list[str]:
    if kind == "FILE":
        return [] if isinstance(value, str) and value else [f"{where}: file name {value!r} is empty or not a string"]
    if kind == "UPLOAD":
        return [] if value == "image" else [f"{where}: upload widget value {value!r}, expected 'image'"]
    if isinstance(kind, list):
        return [] if value in kind else [f"{where}: {value!r} is not one of {kind}"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    wanted = int if kind == "INT" else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        return [f"{where}: {value!r} is not {kind}"]
    low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
    return [] if low <= value <= high else [f"{where}: {value} outside {low}..{high}"]


def check_workflow(data: dict) -> list[str]:
    """Every problem that would make the frontend show missing nodes, shift widgets, or break a link."""
    problems = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        if key not in data:
            problems.append(f"top-level key {key!r} missing")
    if data.get("version") != 0.4:
        problems.append(f"version {data.get('version')!r}, expected 0.4")
    nodes = {}
    for node in data.get("nodes", []):
        if node["id"] in nodes:
            problems.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
    links = {}
    for link in data.get("links", []):
        if len(link) != 6:
            problems.append(f"link {link} does not have 6 fields")
            continue
        if link[0] in links:
            problems.append(f"link id {link[0]} used twice")
        links[link[0]] = link
    if nodes and data.get("last_node_id", 0) < max(nodes):
        problems.append(f"last_node_id {data.get('last_node_id')} < largest node id {max(nodes)}")
    if links and data.get("last_link_id", 0) < max(links):
        problems.append(f"last_link_id {data.get('last_link_id')} < largest link id {max(links)}")

    specs = {}
    for node_id, node in nodes.items():
        spec = node_spec(node["type"])
        where = f"node {node_id} ({node['type']})"
        if spec is None:
            problems.append(f"{where}: unknown node type (not in the pack nor in CORE_NODES)")
            continue
        specs[node_id] = spec
        slots, values = widget_slots(spec), node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {[s[0] for s in slots]}")
        for (name, kind, options), value in zip(slots, values):
            problems += check_value(f"{where}.{name}", kind, options, value)
        declared = {s[0]: s for s in sockets(spec)}
        widget_names = {s[0] for s in slots}
        for slot, entry in enumerate(node.get("inputs", [])):
            name = entry.get("name")
            if name in declared:
                if entry.get("type") != declared[name][1]:
                    problems.append(f"{where}: input {name} has type {entry.get('type')}, the node says {declared[name][1]}")
            elif not (entry.get("widget") and name in widget_names):
                problems.append(f"{where}: input slot {slot} {name!r} is not an input of the node")
            if entry.get("link") is not None and entry["link"] not in links:
                problems.append(f"{where}: input {name} refers to missing link {entry['link']}")
        connected = {e["name"] for e in node.get("inputs", []) if e.get("link") is not None}
        if node.get("mode", ACTIVE) == ACTIVE:
            for name, _, options in sockets(spec):
                if not options.get("optional") and name not in connected:
                    problems.append(f"{where}: required input {name} is not connected")
        outputs = node.get("outputs", [])
        if [(o.get("name"), o.get("type")) for o in outputs] != list(spec["outputs"]):
            problems.append(f"{where}: outputs {[(o.get('name'), o.get('type')) for o in outputs]} != {spec['outputs']}")
        for slot, out in enumerate(outputs):
            for link_id in out.get("links") or []:
                link = links.get(link_id)
                if link is None or (link[1], link[2]) != (node_id, slot):
                    problems.append(f"{where}: output {slot} lists link {link_id} that does not start there")

    for link_id, (_, src, src_slot, dst, dst_slot, link_type) in links.items():
        where = f"link {link_id}"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: joins missing node {src if src not in nodes else dst}")
            continue
        if src in specs:
            outs = specs[src]["outputs"]
            if src_slot >= len(outs):
                problems.append(f"{where}: node {src} has no output slot {src_slot}")
            elif outs[src_slot][1] != link_type:
                problems.append(f"{where}: carries {link_type} but node {src} output {src_slot} is {outs[src_slot][1]}")
        listed = nodes[src]["outputs"][src_slot].get("links") or [] if src_slot < len(nodes[src]["outputs"]) else []
        if link_id not in listed:
            problems.append(f"{where}: not listed on node {src} output {src_slot}")
        dst_inputs = nodes[dst].get("inputs", [])
        if dst_slot >= len(dst_inputs):
            problems.append(f"{where}: node {dst} has no input slot {dst_slot}")
            continue
        entry = dst_inputs[dst_slot]
        if entry.get("link") != link_id:
            problems.append(f"{where}: node {dst} input {dst_slot} holds link {entry.get('link')}")
        if dst in specs:
            declared = {n: k for n, k, _ in sockets(specs[dst])}
            if declared.get(entry.get("name")) not in (link_type, ANY):
                problems.append(f"{where}: {link_type} into {nodes[dst]['type']}.{entry.get('name')} "
                                f"({declared.get(entry.get('name'))})")
        if nodes[src].get("mode", ACTIVE) != ACTIVE and nodes[dst].get("mode", ACTIVE) == ACTIVE:
            problems.append(f"{where}: active node {dst} depends on muted/bypassed node {src}")

    if not any(specs.get(i, {}).get("output_node") for i, n in nodes.items() if n.get("mode", ACTIVE) == ACTIVE):
        problems.append("no active output node: queueing it would do nothing")
    return problems


def to_api_prompt(data: dict) -> dict:
    """What the frontend's graphToPrompt sends to /prompt: active, backend nodes with widgets by name."""
    links = {link[0]: link for link in data["links"]}
    prompt = {}
    for node in data["nodes"]:
        spec = node_spec(node["type"])
        if node.get("mode", ACTIVE) != ACTIVE or spec.get("frontend_only"):
            continue
        inputs = {}
        for (name, kind, _), value in zip(widget_slots(spec), node["widgets_values"]):
            if not name.endswith(":control") and kind != "UPLOAD":
                inputs[name] = value
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def nodes_of(data: dict, node_type: str) -> list[dict]:
    return [n for n in data["nodes"] if n["type"] == node_type]


def widgets(node: dict) -> dict:
    names = [s[0] for s in widget_slots(node_spec(node["type"]))]
    return dict(zip(names, node["widgets_values"]))


# ----------------------------------------------------------------------------------------------------- tests

def test_the_six_example_workflows_are_there():
    assert {p.stem for p in WORKFLOWS.glob("*.json")} >= EXPECTED


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_workflow_loads_without_missing_nodes_and_is_wired_right(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert check_workflow(data) == []
    used = {n["type"] for n in data["nodes"]}
    assert used & set(pack_nodes()), "a PixelWizard example uses PixelWizard nodes"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_model_files_use_the_published_names(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    for node in data["nodes"]:
        for (name, kind, _), value in zip(widget_slots(node_spec(node["type"])), node["widgets_values"]):
            if kind != "FILE":
                continue
            if node["type"] == "PixelWizardAnchorLoad":
                assert value.startswith(("output/", "input/")) and not value.endswith(".safetensors")  # listed without the suffix
            elif node["type"] == "LoadVideo":
                assert value.endswith((".mp4", ".webm", ".mov"))
            elif node["type"] == "LoadImage":
                assert value.endswith((".png", ".jpg", ".jpeg", ".webp"))
            else:
                assert value in MODEL_FILES, f"{node['type']}.{name} = {value!r}"


@pytest.mark.parametrize("name,preset", [("text_to_2k_video", "2k"), ("text_to_4k_video", "4k"),
                                         ("text_to_2k_video_multi_gpu", "2k"),
                                         ("pick_an_anchor", "2k"), ("video_to_2k", "2k")])
def test_hr_stage_matches_its_preset_checkpoint_and_decode(name, preset):
    from pixelwizard_core.pipeline.presets import HR_PRESETS

    data = load(name)
    (hr,) = nodes_of(data, "PixelWizardHRSampler")
    values, expected = widgets(hr), HR_PRESETS[preset]
    assert (values["preset"], values["width"], values["height"], values["steps"], values["shift"]) == (
        preset, expected.width, expected.height, expected.steps, expected.shift)
    links = {link[0]: link for link in data["links"]}
    by_id = {n["id"]: n for n in data["nodes"]}
    source = {e["name"]: by_id[links[e["link"]][1]] for e in hr["inputs"] if e.get("link") is not None}
    assert widgets(source["hr_model"])["checkpoint"] == f"PixelWizard/{preset}/model.pt"
    assert widgets(source["hr_model"])["stage"] == "hr"
    (decode,) = [by_id[links[i][3]] for i in hr["outputs"][0]["links"]]
    assert decode["type"] == "PixelWizardDecodeToVideo" and widgets(decode)["num_patches"] == expected.decode_patches


def test_pick_an_anchor_explores_several_seeds_and_upscales_a_loaded_one():
    data = load("pick_an_anchor")
    samplers = nodes_of(data, "PixelWizardAnchorSampler")
    seeds = [widgets(n)["seed"] for n in samplers]
    assert len(set(seeds)) == len(seeds) >= 3
    assert len(nodes_of(data, "PixelWizardAnchorPreview")) == len(samplers)
    assert len(nodes_of(data, "PixelWizardAnchorSave")) == len(samplers)
    (loader,) = nodes_of(data, "PixelWizardAnchorLoad")
    (hr,) = nodes_of(data, "PixelWizardHRSampler")
    anchor_link = next(e["link"] for e in hr["inputs"] if e["name"] == "anchor")
    assert next(link for link in data["links"] if link[0] == anchor_link)[1] == loader["id"]
    # step 2 waits (muted) until an anchor has been saved and picked; step 1 queues as loaded
    assert loader["mode"] == hr["mode"] == MUTED and all(n["mode"] == ACTIVE for n in samplers)
    saved = {f"output/anchor_seed{s}" for s in seeds}
    assert widgets(loader)["anchor"] in saved


def test_video_to_2k_builds_the_anchor_from_loaded_frames():
    data = load("video_to_2k")
    api = to_api_prompt(data)
    by_class = {v["class_type"]: (k, v) for k, v in api.items()}
    _, from_video = by_class["PixelWizardAnchorFromVideo"]
    frames_src = api[from_video["inputs"]["frames"][0]]
    assert frames_src["class_type"] == "ImageFromBatch" and (frames_src["inputs"]["length"] - 1) % 4 == 0
    assert api[frames_src["inputs"]["image"][0]]["class_type"] == "GetVideoComponents"
    hr_key, hr = by_class["PixelWizardHRSampler"]
    assert api[hr["inputs"]["anchor"][0]]["class_type"] == "PixelWizardAnchorFromVideo"


def test_image_to_2k_starts_the_anchor_from_the_loaded_image():
    api = to_api_prompt(load("image_to_2k_video"))
    by_class = {v["class_type"]: (k, v) for k, v in api.items()}
    load_key, _ = by_class["LoadImage"]
    _, sampler = by_class["PixelWizardAnchorSampler"]
    assert sampler["inputs"]["start_image"] == [load_key, 0]
    _, hr = by_class["PixelWizardHRSampler"]
    assert api[hr["inputs"]["anchor"][0]]["class_type"] == "PixelWizardAnchorSampler"


def test_multi_gpu_workflow_runs_every_heavy_stage_on_the_pool():
    data = load("text_to_2k_video_multi_gpu")
    api = to_api_prompt(data)
    (pool_key,) = [k for k, v in api.items() if v["class_type"] == "PixelWizardMultiGPU"]
    on_pool = {v["class_type"] for v in api.values() if v["inputs"].get("pool") == [pool_key, 0]}
    assert on_pool == {"PixelWizardTextEncode", "PixelWizardAnchorSampler", "PixelWizardHRSampler",
                       "PixelWizardDecodeToVideo"}
    pool = api[pool_key]["inputs"]
    assert pool["ulysses"] == int(pool["devices"])  # Ulysses over every GPU, the fast setting
    # the shutdown node is there but bypassed: workers stay up with their models between runs
    (shutdown,) = nodes_of(data, "PixelWizardPoolShutdown")
    assert shutdown["mode"] == BYPASSED and str(shutdown["id"]) not in api


def test_api_prompt_names_every_input_once():
    api = to_api_prompt(load("text_to_2k_video"))
    hr = next(v for v in api.values() if v["class_type"] == "PixelWizardHRSampler")
    assert hr["inputs"]["seed"] == 10000 and hr["inputs"]["solver"] == "unipc" and "seed:control" not in hr["inputs"]
    declared = node_spec("PixelWizardHRSampler")["inputs"]
    assert set(hr["inputs"]) == {n for n, _, options in declared if not options.get("optional")}  # pool unconnected
    assert "Note" not in {v["class_type"] for v in api.values()}


def _mutations():
    """Broken copies of a good workflow, each with the problem the checker must report."""
    def drop_widget(d):
        next(n for n in d["nodes"] if n["type"] == "PixelWizardHRSampler")["widgets_values"].pop(7)

    def swap_widgets(d):
        v = next(n for n in d["nodes"] if n["type"] == "PixelWizardDecodeToVideo")["widgets_values"]
        v[0], v[1] = v[1], v[0]

    def bad_combo(d):
        next(n for n in d["nodes"] if n["type"] == "PixelWizardHRSampler")["widgets_values"][0] = "8k"

    def out_of_range(d):
        next(n for n in d["nodes"] if n["type"] == "PixelWizardHRSampler")["widgets_values"][3] = 50

    def wrong_link_type(d):
        d["links"][0][5] = "LATENT"

    def dangling_link(d):
        d["links"].pop()

    def unknown_node(d):
        d["nodes"][1]["type"] = "PixelWizardNoSuchNode"

    def unconnected(d):
        hr = next(n for n in d["nodes"] if n["type"] == "PixelWizardHRSampler")
        link_id = hr["inputs"][1]["link"]
        hr["inputs"][1]["link"] = None
        d["links"] = [link for link in d["links"] if link[0] != link_id]
        for n in d["nodes"]:
            for o in n["outputs"]:
                o["links"] = [i for i in o.get("links") or [] if i != link_id]

    def duplicate_id(d):
        d["nodes"][2]["id"] = d["nodes"][1]["id"]

    return {"missing widget value": (drop_widget, "widget values for"), "shifted widgets": (swap_widgets, "is not"),
            "combo value": (bad_combo, "'8k' is not one of"), "range": (out_of_range, "outside"),
            "link type": (wrong_link_type, "carries LATENT"), "dangling": (dangling_link, "missing link"),
            "unknown node": (unknown_node, "unknown node type"), "unconnected": (unconnected, "required input anchor"),
            "duplicate id": (duplicate_id, "used twice")}


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_the_checker_catches_broken_workflows(mutation):
    mutate, message = _mutations()[mutation]
    data = copy.deepcopy(load("text_to_2k_video"))
    mutate(data)
    problems = check_workflow(data)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_loaders_carry_download_links_for_their_files(path):
    """properties.models lets the frontend offer the download of a missing file: one link per file combo,
    equal to the download command's entry, in the folder that the loader widget lists."""
    from pixelwizard_core import download

    widget_folder = {"diffusion_model": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders",
                     "checkpoint": "diffusion_models"}
    data = json.loads(path.read_text(encoding="utf-8"))
    for node in data["nodes"]:
        if node["type"] not in ("PixelWizardWanLoader", "PixelWizardCheckpointLoader"):
            continue
        files = [(name, v) for (name, kind, _), v in zip(widget_slots(node_spec(node["type"])), node["widgets_values"])
                 if kind == "FILE"]
        links = node["properties"].get("models", [])
        assert [link["name"] for link in links] == [value for _, value in files]
        for link, (widget, value) in zip(links, files):
            assert link == download.file_named(value).comfy_entry()
            assert link["directory"] == widget_folder[widget]


# ------------------------------------------------------------------------------------------- templates, registry
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_saved_boxes_do_not_overlap(path):
    """The saved layout itself (tests/test_comfyui_frontend.py checks what the frontend makes of it): node boxes
    with their title bars apart, each node inside the group it touches and clear of group titles."""
    data = json.loads(path.read_text(encoding="utf-8"))
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in data["nodes"]}

    def overlap(a, b):
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    ids = sorted(boxes)
    assert [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if overlap(boxes[a], boxes[b])] == []
    for group in data["groups"]:
        x, y, w, h = group["bounding"]
        title = (x, y, x + w, y + 24 * 1.4)  # LiteGraph's default group font size 24, title bar 1.4 x that
        for node_id, box in boxes.items():
            assert not overlap(box, title), f"node {node_id} covers the title of group {group['title']!r}"
            inside = box[0] >= x and box[1] >= y and box[2] <= x + w and box[3] <= y + h
            assert inside or not overlap(box, (x, y, x + w, y + h)), f"node {node_id} sticks out of {group['title']!r}"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_each_workflow_has_a_small_jpeg_thumbnail(path):
    """ComfyUI's template browser shows <name>.jpg beside <name>.json as the card's picture."""
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} missing (tests/comfyui_frontend_check.cjs --thumbnails makes it)"
    data = thumbnail.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", f"{thumbnail.name} is not a JPEG"
    assert len(data) < 100 * 1024, f"{thumbnail.name} is {len(data)} bytes"


def test_registry_icon_and_comfyui_range():
    """[tool.comfy] names an icon committed here (by its raw URL on the repository) and a ComfyUI range."""
    import re
    import struct

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = WORKFLOWS.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    comfy, repository = project["tool"]["comfy"], project["project"]["urls"]["Repository"]
    owner_repo = repository.removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+\.png)", comfy["Icon"])
    assert match, comfy["Icon"]
    icon = (root / match.group(1)).read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", icon[16:24])
    assert width <= 800 and height <= 400, (width, height)  # the registry's limit
    assert re.fullmatch(r">=\d+\.\d+\.\d+(,<\d+\.\d+\.\d+)?", comfy["requires-comfyui"])
