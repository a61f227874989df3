"""Peak host memory while loading a DiT: our loader against the usual load-then-assign idioms.

Writes a synthetic Wan-style DiT (random weights, official key names) as one safetensors file, as the
official 3-shard folder and as a PixelWizard-style ``.pt``; then loads it in a fresh subprocess per
method, sampling the process's anonymous resident memory (RssAnon, file-backed mmap pages excluded)
every 2 ms. Reported as peak extra memory / size of the loaded model, all in one run.

    python bench/load_memory.py [--layers 12] [--dim 1536] [--workdir /tmp/pw_load_bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import peak_extra_rss  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402

METHODS = {
    "ours: safetensors": "ours_st",
    "ours: official 3-shard folder": "ours_folder",
    "ours: PixelWizard .pt": "ours_pt",
    "safetensors.load_file + load_state_dict": "naive_st",
    "torch.load + load_state_dict": "naive_pt",
}


def config(args: argparse.Namespace) -> DiTConfig:
    return DiTConfig(dim=args.dim, ffn_dim=args.dim * 14336 // 3072, num_heads=args.dim // 128, num_layers=args.layers)


def write_files(cfg: DiTConfig, work: Path) -> None:
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    save_file(weights, work / "dit.safetensors")
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}}, work / "model.pt")
    folder, weight_map, keys = work / "folder", {}, list(weights)
    folder.mkdir(exist_ok=True)
    for i in range(3):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        part = {k: weights[k] for k in keys[i::3]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def load(method: str, cfg: DiTConfig, work: Path, dtype: torch.dtype) -> torch.nn.Module:
    from pixelwizard_core.loading import load_dit

    if method.startswith("ours"):
        path = {"ours_st": work / "dit.safetensors", "ours_folder": work / "folder", "ours_pt": work / "model.pt"}[method]
        return load_dit(path, dtype=dtype)
    if method == "naive_st":
        from safetensors.torch import load_file

        state = load_file(work / "dit.safetensors")
    else:
        state = {k.removeprefix("model."): v for k, v in
                 torch.load(work / "model.pt", map_location="cpu", weights_only=True)["generator"].items()}
    model = WanDiT(cfg)
    model.load_state_dict(state)
    del state
    return model.to(dtype)


def measure(method: str, cfg: DiTConfig, work: Path, dtype: torch.dtype) -> dict:
    with peak_extra_rss() as peak:
        model = load(method, cfg, work, dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"ratio": peak["bytes"] / model_bytes, "model_gib": model_bytes / 2**30, "seconds": peak["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = config(args)
    if args.child:
        method, dtype = args.child
        print(json.dumps(measure(method, cfg, args.workdir, getattr(torch, dtype))))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        write_files(cfg, work)
        print(f"synthetic DiT: dim {cfg.dim}, {cfg.num_layers} blocks; peak extra anonymous memory / loaded model size")
        print("| method | to bfloat16 | to float32 |\n|---|---|---|")
        for label, method in METHODS.items():
            cells = []
            for dtype in ("bfloat16", "float32"):
                out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--dim", str(args.dim),
                                      "--workdir", str(work), "--child", method, dtype],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                cells.append(f"{result['ratio']:.2f}x of {result['model_gib']:.2f} GiB")
            print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
