"""The example workflows in ComfyUI's real frontend: skipped unless COMFYUI_ROOT points to a ComfyUI checkout and
headless Chromium and playwright-core are found.

Starts that ComfyUI (``COMFYUI_PYTHON``, default: this Python, must have ComfyUI's requirements, including the
``comfyui-frontend-package`` whose frontend is checked) on 127.0.0.1 with a temporary base directory that holds a
link to this pack and empty model files under the published names (the loaders only list them), then runs
tests/comfyui_frontend_check.cjs under node: it loads every workflows/*.json in headless Chromium, once in the
classic canvas and once in "Nodes 2.0" (the ``Comfy.VueNodes.Enabled`` setting, where the frontend has it), lets
the frontend size the nodes, and reads every node's box (title bar and badges included), the group title bars
and every sign of cut text (an ellipsis drawn on the canvas, DOM text larger than its box, a node smaller than
its widgets need). In text_to_2k_video it also picks block_swap on the HR checkpoint loader with the mouse and
checks that the HR sampler's info line follows, with no work while the canvas only redraws and no read of the
deprecated ``input.link``.

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python \\
        PLAYWRIGHT_CORE=/path/to/node_modules/playwright-core CHROMIUM=/usr/bin/chromium \\
        python -m pytest tests/test_comfyui_frontend.py

PLAYWRIGHT_CORE: the playwright-core package directory (``npm i playwright-core``), when node cannot
``require`` it from here or from NODE_PATH. CHROMIUM: a Chromium or Chrome executable, when none of chromium,
chromium-browser, google-chrome is on PATH. Screenshots and report.json are kept in the pytest tmp directory
(the path is printed). The same script writes the thumbnails beside the workflows (see its header).
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "comfyui_frontend_check.cjs"
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
START_TIMEOUT_S = 240
CHECK_TIMEOUT_S = 900
MODES = ("classic", "vue")



def _model_folder(name: str) -> str:
    """The ComfyUI model folder of a file the example workflows name (tests/test_workflows.py MODEL_FILES)."""
    return "vae" if "vae" in name else "text_encoders" if name.startswith("umt5") else "diffusion_models"


def _node() -> str | None:
    return os.environ.get("NODE") or shutil.which("node")


def _chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"] if Path(os.environ["CHROMIUM"]).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _playwright_core(node: str) -> str | None:
    """The playwright-core package directory: $PLAYWRIGHT_CORE, or what node resolves from here / NODE_PATH."""
    if os.environ.get("PLAYWRIGHT_CORE"):
        path = Path(os.environ["PLAYWRIGHT_CORE"])
        return str(path) if (path / "package.json").is_file() else None
    probe = subprocess.run([node, "-e", "console.log(require('path').dirname(require.resolve('playwright-core/package.json')))"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    return probe.stdout.strip() if probe.returncode == 0 else None


def _missing() -> str | None:
    if not (COMFYUI_ROOT and (Path(COMFYUI_ROOT) / "main.py").is_file()):
        return "set COMFYUI_ROOT to a ComfyUI checkout (and COMFYUI_PYTHON to a Python with its requirements)"
    node = _node()
    if node is None:
        return "node (Node.js >= 18) is not on PATH (or set NODE)"
    if _chromium() is None:
        return "no Chromium found: install chromium or set CHROMIUM to a Chromium/Chrome executable"
    if _playwright_core(node) is None:
        return "playwright-core not found: `npm i playwright-core` and set PLAYWRIGHT_CORE to its package directory"
    return None


REASON = _missing()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""), pytest.mark.slow]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """URL of a ComfyUI with this pack and empty model files; stopped at the end of the module."""
    from conftest import free_port
    from test_comfyui_integration import PACK, comfy_command, comfy_env

    base = tmp_path_factory.mktemp("comfy_frontend")
    (base / "custom_nodes").mkdir()
    try:
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    except OSError:
        shutil.copytree(ROOT, base / "custom_nodes" / PACK, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    from test_workflows import MODEL_FILES

    for name in MODEL_FILES:
        path = base / "models" / _model_folder(name) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    for folder in ("output", "user", "temp", "input"):
        (base / folder).mkdir(exist_ok=True)
    env = comfy_env(base)
    port = free_port()
    log = base / "comfyui.log"
    command = comfy_command(base, port)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ComfyUI exited at start-up:\n{log.read_text(errors='replace')[-6000:]}"
            try:
                _get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"ComfyUI did not answer in {START_TIMEOUT_S} s"
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="module")
def report(comfyui, tmp_path_factory) -> dict:
    """The check script's report over every example workflow in both rendering modes."""
    out = tmp_path_factory.mktemp("frontend_check")
    node = _node()
    env = dict(os.environ, PLAYWRIGHT_CORE=_playwright_core(node))
    done = subprocess.run([node, str(CHECK), "--url", comfyui, "--workflows", str(ROOT / "workflows"), "--out", str(out),
                           "--modes", ",".join(MODES), "--chromium", _chromium()],
                          capture_output=True, text=True, env=env, timeout=CHECK_TIMEOUT_S)
    assert done.returncode == 0 and (out / "report.json").is_file(), done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    print(f"\nfrontend {data['frontend_version']}; screenshots and report in {out}\n{done.stdout}")
    return data


WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_the_frontend_loads_the_extension_without_errors(report):
    assert report["frontend_version"], "window.__COMFYUI_FRONTEND_VERSION__ missing: not the ComfyUI frontend?"
    assert not report["console"], report["console"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_looks_finished(report, mode, name):
    """No two nodes overlap (title bars and badges included), no node covers a group's title or sticks out of
    its group, no text is cut, no node is smaller than its widgets."""
    if mode == "vue" and not report["has_vue_nodes"]:
        pytest.skip(f"frontend {report['frontend_version']} has no Nodes 2.0 mode (Comfy.VueNodes.Enabled)")
    result = report["modes"][mode][name]
    assert len(result["nodes"]) == len(json.loads((ROOT / "workflows" / f"{name}.json").read_text())["nodes"])
    assert result["problems"] == []


@pytest.mark.parametrize("mode", MODES)
def test_hr_info_follows_an_upstream_widget_without_per_frame_work(report, mode):
    if mode == "vue" and not report["has_vue_nodes"]:
        pytest.skip(f"frontend {report['frontend_version']} has no Nodes 2.0 mode (Comfy.VueNodes.Enabled)")
    interaction = report["modes"][mode]["text_to_2k_video"]["interaction"]
    assert interaction["problems"] == [], interaction
    assert interaction["idle"]["frames"] > 0
