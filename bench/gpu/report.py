"""The markdown tables of a run's JSON: memory by stage, time by stage, one generate extrapolated.

Reads the JSON alone, so ``--render X.json`` prints an earlier run's tables and a run cut short still has its
report.
"""

from __future__ import annotations

from collections.abc import Iterator

from .config import GIB, ORDERS

# per stage: the record's time key and what one unit of it is
UNITS = {"text": ("seconds_per_encode", "encode (2 x 512 tokens)"), "lr": ("seconds_per_step", "step"),
         "hr": ("seconds_per_step", "step (cond + uncond)"), "decode": ("seconds_per_latent_frame", "latent frame")}


def _gib(value: object, scale: int = GIB) -> str:
    return "-" if value is None else f"{value / scale:.2f}"


def _unit(data: dict) -> tuple[int, str]:
    """GiB for the real models, MiB for the small ones."""
    return (2**20, "MiB") if data.get("small") else (GIB, "GiB")


def _seconds(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _stage_rows(data: dict) -> Iterator[tuple[str, str, str, dict]]:
    """(mode, stage, size/order, record) for every stage record in the results."""
    for mode_key, node in data.get("results", {}).items():
        for stage in ("text", "lr"):
            if isinstance(node.get(stage), dict):
                yield mode_key, stage, "-", node[stage]
        for label, record in node.get("hr", {}).items():
            yield mode_key, "hr", label, record
        for label, orders in node.get("decode", {}).items():
            for order, record in orders.items():
                yield mode_key, "decode", f"{label} {order}", record


def _status_text(record: dict) -> str:
    if record.get("status") == "oom":
        return f"OOM at {_gib(record.get('oom_allocated_bytes'))} GiB (+{record.get('oom_requested') or '?'})"
    if record.get("status") == "skipped":
        return f"skipped: {record.get('reason', '')}"
    if record.get("status") == "error":
        return f"error: {record.get('message', '')[:120]}"
    return record.get("status", "?")


def _header(data: dict) -> list[str]:
    env = data.get("environment", {})
    kind = "small configs" if data.get("small") else "real model sizes"
    scale, unit = _unit(data)
    lines = [f"# PixelWizard GPU benchmark ({kind}, random weights)", ""]
    device = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines.append(f"Device: {device}" + (f", {_gib(env.get('gpu_total_memory_bytes'))} GiB" if env.get("gpu") else "")
                 + f"; driver {env.get('driver') or '-'}; torch {env.get('torch')}, CUDA {env.get('cuda') or '-'}, "
                   f"cuDNN {env.get('cudnn') or '-'}, flash-attn {env.get('flash_attn') or '-'} / "
                   f"FA3 {env.get('flash_attn_3') or '-'}; attention backend: {env.get('attention_backend')}; "
                   f"memory: {data.get('memory_method')}")
    if data.get("model_bytes"):
        lines.append(f"Model weights as built ({unit}): " + ", ".join(f"{role} {_gib(size, scale)}"
                                                              for role, size in data["model_bytes"].items()))
    if env.get("ceilings"):
        lines.append("Ceilings (measured): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in env["ceilings"].items()))
    return lines


def _memory_table(data: dict) -> list[str]:
    scale, unit = _unit(data)
    header = ("| mode | stage | size | weights | inputs | activations (decode: transient) | caches | peak | "
              "reserved peak | doctor estimate | placement s | status |")
    lines = ["", f"## Memory by stage ({unit})", "", header, "|---" * 12 + "|"]
    for mode_key, stage, where, record in _stage_rows(data):
        if record.get("status") == "same_as":
            lines.append(f"| {mode_key} | {stage} | {where} | | | | | | | | | as {record['same_as']} |")
            continue
        estimate = data.get("estimates", {}).get(mode_key, {}).get(stage if stage in ("text", "lr") else f"{stage} {where}")
        activations = record.get("transient_bytes", record.get("activations_bytes"))
        sizes = [record.get(k) for k in ("weights_bytes", "inputs_bytes")] + [activations] + [
            record.get(k) for k in ("caches_bytes", "peak_bytes", "reserved_peak_bytes")] + [estimate]
        lines.append(f"| {mode_key} | {stage} | {where} | " + " | ".join(_gib(v, scale) for v in sizes) + " | "
                     f"{_seconds(record.get('placement_seconds'))} | {_status_text(record)} |")
    return lines


def _time_table(data: dict) -> list[str]:
    lines = ["", "## Time", "",
             "| mode | stage | size | s per unit | unit | timed | TFLOP/s | whole stage s (extrapolated) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode_key, stage, where, record in _stage_rows(data):
        if record.get("status") != "ok":
            continue
        key, per = UNITS[stage]
        timed = {"text": len(record.get("run_seconds", [])), "lr": len(record.get("step_seconds", [])),
                 "hr": record.get("timed_steps"), "decode": record.get("latent_frames_decoded")}[stage]
        whole = record.get("full_stage_seconds_extrapolated", record.get("full_decode_seconds_extrapolated"))
        flops = record.get("tflops_per_second")
        lines.append(f"| {mode_key} | {stage} | {where} | {_seconds(record.get(key))} | {per} | {timed} | "
                     f"{'-' if flops is None else f'{flops:.3g}'} | {_seconds(whole)} |")
    return lines


def _ok_record(results: dict, node: dict, *path: str) -> dict:
    """The record at ``path`` under ``node`` when it succeeded, following a "same_as" to that mode's."""
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    if node.get("status") == "same_as":
        return _ok_record(results, results.get(node["same_as"], {}), *path)
    return node if node.get("status") == "ok" else {}


def _whole_run_rows(data: dict) -> list[str]:
    """One generate per mode and size, extrapolated from the stages: text + 50 LR steps + 4 HR steps + the whole
    decode (frame order, else tile order) + moving the models in and out (offload, block swap)."""
    results = data.get("results", {})
    scale, unit = _unit(data)
    rows = []
    for mode_key, node in results.items():
        for label in node.get("hr", {}):
            text, lr, hr = (_ok_record(results, node, *path) for path in (("text",), ("lr",), ("hr", label)))
            order = next((o for o in ORDERS if _ok_record(results, node, "decode", label, o)), None)
            if not (text and lr and hr and order):
                continue
            decode = _ok_record(results, node, "decode", label, order)
            moves = sum(r.get("placement_seconds", 0) + r.get("return_seconds", 0) for r in (text, lr, hr, decode))
            total = (text["seconds_per_encode"] + lr["full_stage_seconds_extrapolated"]
                     + hr["full_stage_seconds_extrapolated"] + decode["full_decode_seconds_extrapolated"] + moves)
            peak = max(r["peak_bytes"] for r in (text, lr, hr, decode))
            rows.append(f"| {mode_key} | {label} | {total:.1f} | {text['seconds_per_encode']:.2f} | "
                        f"{lr['full_stage_seconds_extrapolated']:.1f} | {hr['full_stage_seconds_extrapolated']:.1f} | "
                        f"{decode['full_decode_seconds_extrapolated']:.1f} ({order}) | {moves:.1f} | {_gib(peak, scale)} |")
    if not rows:
        return []
    return ["", "## One generate, extrapolated from the stages (121 frames; seconds)", "",
            f"| mode | size | total | text | LR 50 steps | HR 4 steps | decode (order) | model moves | peak {unit} |",
            "|---" * 9 + "|", *rows]


def _graph_rows(graphs: dict) -> list[str]:
    lines = ["Graphs per compiled DiT block (torch._dynamo.explain on block 0; the goal: 1 graph, 0 breaks):", "",
             "| backend | runs | graphs | breaks | break reasons |", "|---|---|---|---|---|"]
    for name, record in graphs.items():
        if record.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | {record.get('status')}: {record.get('reason', '')[:100]} |")
        else:
            lines.append(f"| {name} | {record['runs']} | {record['graphs']} | {record['breaks']} | "
                         f"{'; '.join(record['reasons']) or '-'} |")
    return lines


def _pinned_rows(pinned: dict) -> list[str]:
    keys = ("stored_bytes", "buffer_bytes", "planned_pinned_bytes", "measured_pinned_bytes",
            "rounded_if_cached_bytes", "left_after_release_bytes")
    return ["", f"Page-locked host memory per swapped block ({pinned['swapped_blocks']} blocks swapped, "
                f"{pinned['method']} memory; MiB):", "",
            "| stored | buffer | planned pinned | measured pinned | a power of two would be | change after release |",
            "|---|---|---|---|---|---|", "| " + " | ".join(_gib(pinned.get(k), 2**20) for k in keys) + " |"]


def _step_rows(step: dict) -> list[str]:
    lines = ["", f"One HR step at {step['width']}x{step['height']}, {step['frames']} frames ({step['tokens']} tokens; "
                 "cond + uncond), seconds:", "",
             "| backend | eager | compiled | compile + first step |", "|---|---|---|---|"]
    for name, record in step.items():
        if not isinstance(record, dict):
            continue
        if record.get("status") != "ok":
            lines.append(f"| {name} | {record.get('status')}: {record.get('reason', '')[:100]} | | |")
            continue
        compiled = record.get("compiled_seconds_per_step", record.get("compiled"))
        lines.append(f"| {name} | {_seconds(record['eager_seconds_per_step'])} | "
                     f"{_seconds(compiled) if isinstance(compiled, float) else compiled} | "
                     f"{_seconds(record.get('compile_and_first_step_seconds'))} |")
    return lines


def _cuda_paths(data: dict) -> list[str]:
    """Graphs per compiled block, pinned bytes per swapped block, HR step time per attention backend."""
    section = data.get("cuda_paths")
    if not section:
        return []
    lines = ["", "## CUDA paths", ""]
    if "error" in section:
        lines.append(f"error: {section['error']}")
    if section.get("graphs_per_block"):
        lines += _graph_rows(section["graphs_per_block"])
    if section.get("pinned_per_block"):
        lines += _pinned_rows(section["pinned_per_block"])
    if section.get("hr_step"):
        lines += _step_rows(section["hr_step"])
    return lines


def render(data: dict) -> str:
    """The report of a run's JSON (complete or cut short) as markdown."""
    lines = _header(data) + _memory_table(data) + _time_table(data) + _whole_run_rows(data) + _cuda_paths(data)
    for title, items in (("Skipped", data.get("budget", {}).get("skipped", [])), ("Notes", data.get("notes", []))):
        if items:
            lines += ["", f"{title}:"] + [f"- {item}" for item in items]
    return "\n".join(lines)
