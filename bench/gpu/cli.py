"""The command line shared by every stage: options, device and defaults, and the run from start to report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pixelwizard_core.models.attention import attention_choices

from .config import ORDERS, Setup, mode_list, real_setup, small_setup
from .cuda_paths import run_cuda_paths
from .environment import environment
from .estimates import estimates
from .harness import Bench
from .meters import HOST_MALLOC_ENV
from .models import model_bytes
from .plan import run_isolated, run_plan
from .progress import log
from .report import render

DESCRIPTION = "One-command GPU benchmark and memory profile of PixelWizard at the real model sizes (random weights)."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for every figure (also X.md with the tables); "
                        "default $OUT/bench_gpu.json when $OUT is set")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="tiny configs and sizes (for the CPU and CI)")
    parser.add_argument("--modes", nargs="+", default=["gpu", "offload", "block_swap"],
                        choices=["gpu", "offload", "block_swap"], help="the first is the timing mode")
    parser.add_argument("--swap-blocks", type=int, nargs="+", default=None,
                        help="DiT blocks streamed in block_swap mode, one mode per value (default 10 20; small: 1 2)")
    parser.add_argument("--sizes", nargs="+", default=None, help="HR sizes by label (default: 2k 4k)")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    parser.add_argument("--hr-steps", type=int, nargs="+", default=[2, 0],
                        help="timed HR steps after the warm-up step in the first mode, one per size (last repeats)")
    parser.add_argument("--lr-steps", type=int, default=5, help="timed LR steps after 1 warm-up step")
    parser.add_argument("--text-runs", type=int, default=2, help="timed text encodes after 1 warm-up")
    parser.add_argument("--decode-frames", type=int, default=None,
                        help="latent frames decoded per tile (default 3; small: 2, enough for the steady-state cache)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the run may take (CUDA default 450, CPU none; 0 = none)")
    parser.add_argument("--attention", default="auto", choices=attention_choices())
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every DiT block (block.compile()); the first step at each size then "
                             "includes compilation: use --hr-steps >= 1 everywhere")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --small on the CPU, where a loaded "
                             "2-core machine made 2 threads 50x slower)")
    parser.add_argument("--isolate", default="auto", choices=["auto", "on", "off"],
                        help="run each mode in its own process (auto: on the CPU only, where the process's memory "
                             "stands for the device's)")
    parser.add_argument("--timing-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "bench_gpu.json")
    return args


def _reexec_for_host_memory(device: torch.device) -> None:
    """On the CPU, restart the process with ``HOST_MALLOC_ENV`` (glibc reads it only at process start)."""
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **HOST_MALLOC_ENV))


def _device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the options whose default depends on the device or on --small, and set torch's threads."""
    if args.budget_s is None:
        args.budget_s = 450.0 if device.type == "cuda" else 0.0
    if args.decode_frames is None:
        args.decode_frames = 2 if args.small else 3
    if args.threads is None and args.small and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def _setup(args: argparse.Namespace) -> Setup:
    setup = small_setup() if args.small else real_setup()
    if args.swap_blocks:
        setup = replace(setup, swap_blocks=tuple(args.swap_blocks))
    if args.sizes:
        known = {s.label: s for s in setup.sizes}
        if set(args.sizes) - set(known):
            raise SystemExit(f"--sizes: unknown {sorted(set(args.sizes) - set(known))}; choose from {sorted(known)}")
        setup = replace(setup, sizes=tuple(known[label] for label in args.sizes))
    return setup


def _describe(bench: Bench, argv: list[str] | None) -> None:
    """What the run is: command, device, configs, environment and model sizes, into ``bench.data``."""
    args, setup = bench.args, bench.setup
    bench.data.update(small=setup.small, command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                      device=str(bench.device), memory_method=bench.meter.method,
                      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      config={"dit": asdict(setup.dit), "t5": asdict(setup.t5), "vae": asdict(setup.vae),
                              "lr": asdict(setup.lr), "sizes": [asdict(s) for s in setup.sizes],
                              "decode_frames": args.decode_frames, "orders": args.orders,
                              "hr_steps": args.hr_steps, "lr_steps": args.lr_steps, "compile": args.compile,
                              "threads": torch.get_num_threads(),
                              "dtype": "bf16 (DiT, T5), float32 (HR injector, VAE)"})
    bench.data["environment"] = environment(bench.device, args.attention)
    bench.data["model_bytes"] = model_bytes(setup)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    device = _device(args.device)
    if argv is None:
        _reexec_for_host_memory(device)
    _defaults(args, device)
    setup = _setup(args)
    bench = Bench(args, setup, device)
    _describe(bench, argv)
    log(f"device {device} ({bench.data['environment'].get('gpu', 'CPU')}), "
        f"{'small' if setup.small else 'real'} configs, budget {args.budget_s or 'none'} s")
    modes = mode_list(args.modes, setup)
    bench.data["estimates"] = {m.key: estimates(setup, m, "fp32") for m in modes}
    if not setup.small:
        bench.data["estimate_notes"] = ("the memory model's formula (pipeline/memory.py) with this mode's placement (gpu: every model resident), "
                                        "float32 VAE in both decode orders")
    timing = args.timing_mode or modes[0].key
    isolate = args.isolate == "on" or (args.isolate == "auto" and device.type != "cuda")
    bench.data["isolated_processes"] = isolate
    (run_isolated if isolate else run_plan)(bench, modes, timing)
    if not args.timing_mode:  # once per run: not in the CPU's per-mode processes
        run_cuda_paths(bench)
    bench.finish()
    return 0
