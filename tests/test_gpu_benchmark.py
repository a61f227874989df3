"""bench/gpu_benchmark.py (the entry point of the package bench/gpu) in its ``--small`` CPU mode (the GPU
run itself needs a GPU).

One run of the script as a subprocess (each memory mode in its own process, ~35 s on 2 cores) feeds the
checks: every stage of every mode measured with positive figures, the emulated device memory ordered as
the placement modes say it must be, the decode's causal caches close to their exact count, and the report
written beside the JSON and reproduced by ``--render``. The report formatting, the FLOP count and the
harness's timing helpers are checked without running anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_benchmark.py"
sys.path.insert(0, str(SCRIPT.parent))  # as the script does: its folder holds the package ``gpu``

from gpu.flops import dit_forward_flops  # noqa: E402
from gpu.harness import intervals, steady  # noqa: E402
from gpu.report import render  # noqa: E402

from pixelwizard_core.models.dit import DiTConfig  # noqa: E402

MODES = {"gpu", "offload", "block_swap_1", "block_swap_2"}
SIZES = ("2k", "4k")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu_benchmark") / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout, out


def _ok(record: dict) -> dict:
    assert record.get("status") == "ok", record
    return record


def test_every_mode_and_stage_is_measured(run: tuple[dict, str, Path]) -> None:
    data, _, _ = run
    results = data["results"]
    assert set(results) == MODES
    for key, node in results.items():
        stages = [_ok(node["lr"])] + [_ok(node["hr"][size]) for size in SIZES]
        if key.startswith("block_swap"):
            assert node["mode"]["swap_blocks"] == int(key.rsplit("_", 1)[1])
            assert node["text"]["same_as"] == "offload"
            assert all(node["decode"][size][order]["same_as"] == "offload" for size in SIZES for order in ("frame", "tile"))
        else:
            text = _ok(node["text"])
            assert text["seconds_per_encode"] > 0 and text["peak_bytes"] >= text["weights_bytes"] > 0
            for size in SIZES:
                for order in ("frame", "tile"):
                    decode = _ok(node["decode"][size][order])
                    stages.append(decode)
                    assert decode["caches_bytes"] > 0 and decode["transient_bytes"] > 0
                    assert decode["full_decode_seconds_extrapolated"] > decode["seconds_per_latent_frame"] > 0
        for record in stages:
            assert record["weights_bytes"] > 0 and record["model_bytes_on_device"] > 0
            assert record["activations_bytes"] > 0
            assert record["peak_bytes"] > record["weights_bytes"] + record["inputs_bytes"]
        for record in stages[:3]:  # the DiT stages
            assert record["seconds_per_step"] > 0 and record["tflops_per_second"] > 0
            assert record["full_stage_seconds_extrapolated"] > record["seconds_per_step"]
        assert node["hr"]["2k"]["tokens"] < node["hr"]["4k"]["tokens"]


def test_offload_keeps_less_on_the_device_than_gpu_mode(run: tuple[dict, str, Path]) -> None:
    results = run[0]["results"]
    gpu, offload = results["gpu"]["hr"]["2k"], results["offload"]["hr"]["2k"]
    # gpu mode holds all four models during the HR stage, offload only the HR DiT
    others = gpu["model_bytes_on_device"] - offload["model_bytes_on_device"]
    assert others > 5 * 2**20, (gpu["model_bytes_on_device"], offload["model_bytes_on_device"])
    assert gpu["weights_bytes"] - offload["weights_bytes"] > 0.5 * others
    assert gpu["peak_bytes"] - offload["peak_bytes"] > 0.5 * others, (gpu["peak_bytes"], offload["peak_bytes"])
    # and the text stage, with the smallest model, differs the most
    text_gap = results["gpu"]["text"]["peak_bytes"] - results["offload"]["text"]["peak_bytes"]
    assert text_gap > 0.5 * (results["gpu"]["text"]["model_bytes_on_device"]
                             - results["offload"]["text"]["model_bytes_on_device"])


def test_decode_caches_are_close_to_their_exact_count(run: tuple[dict, str, Path]) -> None:
    for key in ("gpu", "offload"):
        for size in SIZES:
            decode = run[0]["results"][key]["decode"][size]["frame"]
            ratio = decode["caches_bytes"] / decode["cache_expected_bytes"]
            assert 0.5 < ratio < 2.0, (key, size, decode["caches_bytes"], decode["cache_expected_bytes"])
            # every tile's cache lives on in frame order; one tile's in tile order
            tile = run[0]["results"][key]["decode"][size]["tile"]
            assert tile["cache_expected_bytes"] < decode["cache_expected_bytes"]


def test_report_has_the_tables_and_environment(run: tuple[dict, str, Path]) -> None:
    data, stdout, _ = run
    assert "## Memory by stage (MiB)" in stdout and "## Time" in stdout and "## One generate" in stdout
    for key in MODES:
        assert f"| {key} | hr | 2k |" in stdout
    env = data["environment"]
    assert env["torch"] and env["attention_backend"] == "sdpa" and env["cpu_count"] > 0
    assert data["small"] is True and data["isolated_processes"] is True


def test_out_of_memory_is_reported_with_its_size() -> None:
    record = {"status": "oom", "oom_allocated_bytes": 70 * 2**30, "oom_requested": "2.50 GiB", "weights_bytes": 5}
    data = {"results": {"gpu": {"mode": {"name": "gpu"}, "decode": {"4k": {"frame": record}},
                                "hr": {"4k": {"status": "skipped", "reason": "time budget"}}}}}
    text = render(data)
    assert "| gpu | decode | 4k frame |" in text and "OOM at 70.00 GiB (+2.50 GiB)" in text
    assert "skipped: time budget" in text


def test_flop_count_matches_the_architecture_note() -> None:
    # wan22_arch.md §7.1: one forward of the 5B DiT at 2560x1440, 121 frames (111,600 tokens) is 5.6e15 FLOPs,
    # 82% of it self-attention; at 448x256 (3,472 tokens) 3.6e13
    config = DiTConfig()
    assert abs(dit_forward_flops(config, 111_600) / 5.6e15 - 1) < 0.03
    assert abs(dit_forward_flops(config, 3_472) / 3.6e13 - 1) < 0.05
    attention = 30 * 4 * 111_600**2 * 3072
    assert 0.80 < attention / dit_forward_flops(config, 111_600) < 0.84


def test_report_file_and_render_reproduce_stdout(run: tuple[dict, str, Path]) -> None:
    # the tables printed, the X.md beside the JSON and --render of that JSON are one report
    data, stdout, out = run
    assert out.with_suffix(".md").read_text() == stdout
    done = subprocess.run([sys.executable, str(SCRIPT), "--render", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == stdout == render(data) + "\n"


def test_step_times_are_intervals_and_the_steady_one_skips_the_warm_up() -> None:
    assert intervals(10.0, [11.0, 13.5, 14.0]) == [1.0, 2.5, 0.5]
    assert steady([9.0, 1.0, 3.0, 2.0]) == 2.0  # the first (warm-up) step is left out
    assert steady([4.0]) == 4.0  # a single step is its own timing


def test_cuda_paths_are_measured_once_per_run(run: tuple[dict, str, Path]) -> None:
    data, stdout, _ = run
    paths = data["cuda_paths"]
    assert "error" not in paths, paths
    graphs = paths["graphs_per_block"]
    for name in ("auto", "sdpa"):  # the CPU runs SDPA; flash and sage report why not
        assert (graphs[name]["runs"], graphs[name]["graphs"], graphs[name]["breaks"]) == ("sdpa", 1, 0)
    assert graphs["flash"]["status"] == "not available" and "CUDA GPU" in graphs["flash"]["reason"]
    step = paths["hr_step"]
    assert step["sdpa"]["eager_seconds_per_step"] > 0 and step["sdpa"]["compiled"] == "skipped: needs a GPU"
    pinned = paths["pinned_per_block"]  # nothing is page-locked for a CPU device
    assert pinned["method"] == "pageable" and pinned["planned_pinned_bytes"] == pinned["measured_pinned_bytes"] == 0
    assert pinned["stored_bytes"] <= pinned["buffer_bytes"] < pinned["rounded_if_cached_bytes"]
    assert "## CUDA paths" in stdout and "| sdpa | sdpa | 1 | 0 | - |" in stdout


def test_cuda_paths_report_reads_a_gpu_run() -> None:
    mib = 2**20
    paths = {"graphs_per_block": {"flash": {"status": "ok", "runs": "flash", "graphs": 1, "breaks": 0, "reasons": []}},
             "pinned_per_block": {"swapped_blocks": 10, "method": "registered", "stored_bytes": 312 * mib,
                                  "buffer_bytes": 312 * mib, "planned_pinned_bytes": 312 * mib,
                                  "measured_pinned_bytes": 312 * mib, "rounded_if_cached_bytes": 512 * mib,
                                  "left_after_release_bytes": 0},
             "hr_step": {"width": 448, "height": 256, "frames": 121, "tokens": 3472,
                         "flash": {"status": "ok", "eager_seconds_per_step": 0.5, "compiled_seconds_per_step": 0.4,
                                   "compile_and_first_step_seconds": 60.0}}}
    text = render({"cuda_paths": paths})
    assert "| flash | flash | 1 | 0 | - |" in text
    assert "| 312.00 | 312.00 | 312.00 | 312.00 | 512.00 | 0.00 |" in text
    assert "| flash | 0.500 | 0.400 | 60.0 |" in text
