"""Peak memory of a GGUF-quantized DiT forward against bf16, on CPU.

The model has the real structure of the Wan2.2-TI2V-5B DiT (30 blocks, head size 128, 48 latent channels,
text_dim 4096 with 512 context rows, freq_dim 256, ffn/dim ratio 14336/3072) at a tiny width (dim 768, 6
heads, ffn 3584), random weights. It is written once as a bf16 safetensors file and converted with
``convert --gguf`` (loading/gguf_write.py) to Q8_0 and Q4_0. Each file is then loaded by ``load_dit`` (bf16
compute) in a fresh subprocess with glibc told to mmap every allocation above 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once; after one warm-up forward the
kernel's high-water mark is reset (``/proc/self/clear_refs``) and a second forward is measured: its peak
resident bytes above the resident set just before it is the forward's working memory (activations plus,
for GGUF, the one layer's weight dequantized for its call). Weights are the model's parameter and buffer
bytes (what the model store and ComfyUI's model manager count); the peak of a forward is weights plus
working memory, what a GPU's ``max_memory_allocated`` would show.

    python bench/gguf_memory.py [--tokens 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402

CONFIG = DiTConfig(dim=768, ffn_dim=3584, num_heads=6)  # everything else: the 5B DiT's
CASES = {"bf16": "dit-bf16.safetensors", "Q8_0": "dit-Q8_0.gguf", "Q4_0": "dit-Q4_0.gguf"}
MIB = 2**20


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def _write_files(folder: Path) -> None:
    from safetensors.torch import save_file

    from pixelwizard_core.loading.gguf_write import convert_to_gguf

    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanDiT(CONFIG)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, folder / CASES["bf16"])
    del model
    for qtype in ("Q8_0", "Q4_0"):
        convert_to_gguf(folder / CASES["bf16"], folder / CASES[qtype], qtype=qtype, overwrite=True)


def _child(path: str, tokens: int) -> dict:
    import gc

    from pixelwizard_core.loading import load_dit

    torch.set_num_threads(2)
    model = load_dit(path)  # bf16 compute; GGUF block Linears stay quantized
    gc.collect()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    side = int((tokens // 4) ** 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, 4, 2 * side, 2 * side, generator=g)
    context = torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16)
    t = torch.tensor([900.0])
    with torch.no_grad():
        model(x, t, context)  # warm-up: one-time allocations are not the forward's
        gc.collect()
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        out = model(x, t, context)
        seconds = time.perf_counter() - start
        work = _status("VmHWM") - base
    return {"weights": weights, "work": work, "seconds": seconds, "tokens": 4 * side * side,
            "finite": bool(torch.isfinite(out).all())}


def _run_case(path: Path, tokens: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, __file__, "--child", str(path), "--tokens", str(tokens)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _report(results: dict) -> str:
    base = results["bf16"]
    lines = ["| weights | weight bytes | forward working memory | peak (weights + working) | vs bf16 peak | "
             "forward time vs bf16 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        peak = r["weights"] + r["work"]
        lines.append(f"| {name} | {r['weights'] / MIB:.1f} MiB | {r['work'] / MIB:.1f} MiB | {peak / MIB:.1f} MiB | "
                     f"{peak / (base['weights'] + base['work']):.2f}x | {r['seconds'] / base['seconds']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="video tokens of the forward (4 latent frames)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tokens)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        _write_files(folder)
        results = {name: _run_case(folder / file, args.tokens) for name, file in CASES.items()}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"{results['bf16']['tokens']} tokens; DiT {CONFIG}")
    print(_report(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
