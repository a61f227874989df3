"""Shortcut training on a toy with a known answer: ablation table for BENCHMARKS.md.

Toy (pixelwizard_core/training/toy.py): 2-D mixture of 8 Gaussians, quadrant anchors, exact flow map by
RK4 on the analytic velocity. For each seed: plain flow matching from scratch (dt = 0 only) gives the
starting model ("before"); then, from that same starting model and with the same number of updates,
batch size and data stream, each variant is fine-tuned with the real ShortcutObjective and Trainer.
Every model is scored by 4-step sampling at the 2K schedule (shift 5.5; t = 999, 942, 845, 646;
dt = 56, 96, 198, 646): the mean squared distance of the sample to the exact flow endpoint of the same
noise and anchor (2048 fixed noises), with the Euler update and with UniPC, and the mean squared
distance to the nearest mode centre (the data's own value is 2 * 0.15^2 = 0.045).

    python bench/shortcut_toy.py [--seeds 3] [--pretrain-steps 1500] [--finetune-steps 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelwizard_core.training.objective import ShortcutConfig  # noqa: E402
from pixelwizard_core.training.toy import (  # noqa: E402
    ToyEvaluator,
    ToyRecipe,
    ToyShortcutNet,
    pretrain,
    train_toy,
)

BASE = ShortcutConfig(cfg_dropout=0.1)
# name -> (objective options, dt fed at sampling: from the schedule or 0, conditioning)
VARIANTS = {
    "plain flow matching (sc_rate 0)": (replace(BASE, sc_rate=0.0), True, "sinusoidal"),
    "shortcut, exponential k, calibration (reference)": (BASE, False, "sinusoidal"),
    "shortcut, exponential k, no calibration": (replace(BASE, calibration_power=0.0), False, "sinusoidal"),
    "shortcut, uniform k, calibration": (replace(BASE, index_sampling="uniform"), False, "sinusoidal"),
    "shortcut, uniform k, no calibration": (replace(BASE, index_sampling="uniform", calibration_power=0.0), False,
                                            "sinusoidal"),
    "shortcut, exponential k, calibration, log_snr_span conditioning": (BASE, False, "log_snr_span"),
}


def run_seed(recipe: ToyRecipe, seed: int, evaluator: ToyEvaluator) -> dict[str, dict[str, float]]:
    results = {}
    start = time.perf_counter()
    base = pretrain(recipe, seed)
    before = evaluator(base, zero_dt=True)
    before_unipc = evaluator(base, zero_dt=True, solver="unipc")
    results["before (flow-matching start, dt = 0)"] = {"euler": before.flow_mse, "unipc": before_unipc.flow_mse,
                                                        "off_mode": before.off_mode}
    for name, (config, zero_dt, conditioning) in VARIANTS.items():
        model = ToyShortcutNet(hidden=recipe.hidden, step_size_conditioning=conditioning)
        model.load_state_dict(copy.deepcopy(base.state_dict()))  # same layers for every conditioning
        train_toy(model, replace(config, shift=recipe.shift), steps=recipe.finetune_steps, lr=recipe.finetune_lr,
                  batch_size=recipe.batch_size, seed=seed + 1000)
        euler = evaluator(model, zero_dt=zero_dt)
        unipc = evaluator(model, zero_dt=zero_dt, solver="unipc")
        results[name] = {"euler": euler.flow_mse, "unipc": unipc.flow_mse, "off_mode": euler.off_mode}
        if zero_dt:  # the FM model fed the schedule's dt, which it never saw in training
            fed = evaluator(model, zero_dt=False)
            results[name + ", fed schedule dt"] = {"euler": fed.flow_mse,
                                                   "unipc": evaluator(model, solver="unipc").flow_mse,
                                                   "off_mode": fed.off_mode}
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def table(runs: list[dict[str, dict[str, float]]]) -> str:
    def cell(name: str, key: str) -> str:
        values = [r[name][key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    lines = ["| model | 4-step Euler: MSE to exact flow | 4-step UniPC: MSE to exact flow | off-mode MSE |",
             "|---|---|---|---|"]
    for name in runs[0]:
        lines.append(f"| {name} | {cell(name, 'euler')} | {cell(name, 'unipc')} | {cell(name, 'off_mode')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = ToyRecipe(pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, hidden=args.hidden)
    evaluator = ToyEvaluator(count=args.eval_count)
    runs = [run_seed(recipe, seed, evaluator) for seed in range(args.seeds)]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); recipe {recipe}")
    print(f"seeds: {args.seeds} (mean ± standard deviation over seeds)\n")
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(recipe), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
