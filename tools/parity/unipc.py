"""Parity of pixelwizard_core.sampling (schedule, UniPC, CFG) with the official FlowUniPCMultistepScheduler.

    /work/refvenv/bin/python tools/parity/unipc.py --wan-repo /path/to/Wan2.2

Needs diffusers (the official file imports it). The file wan/utils/fm_solvers_unipc.py is loaded on its
own with importlib, so wan/__init__.py (pipelines, models) is never run. Nothing is patched.

For each of (4 steps, shift 5.5), (4, 5.8), (5, 5.8) and (50, 5.0), the official scheduler is built as the
reference builds it (num_train_timesteps 1000, shift 1, then set_timesteps(steps, shift=s)) and both
solvers integrate the same seeded noise [2, 4, 3, 5] through a fake guided velocity field whose value
depends on the sample: v = CFG(f_c, f_u, 5.0) with f(x, t) = 0.3 * W x (channel mix) + (t/1000) * U.
The official run uses the reference loop's own CFG formula, ours classifier_free_guidance. Printed per
configuration: whether the int64 timesteps and the float32 sigmas are identical, and
max|ours - theirs| / max|theirs| over the whole trajectory (every intermediate sample) and on the result.

It also compares the schedules of a sweep (steps 1..64, 100, 250, 1000 x shifts 1, 3, 5, 5.5, 5.8, 8).

Writes tests/fixtures/parity_unipc.safetensors: the field ("field.*"), the noise, the official
timesteps/sigmas/trajectory per configuration ("official.<steps>x<shift>.*") and the sweep ("sweep.*"),
which tests/test_sampling.py checks without the official code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pixelwizard_core.sampling import UniPCSolver, classifier_free_guidance, flow_schedule  # noqa: E402
from tools.parity.official import relative_error  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity_unipc.safetensors"
SHAPE = (2, 4, 3, 5)
GUIDE_SCALE = 5.0
CONFIGS = ((4, 5.5), (4, 5.8), (5, 5.8), (50, 5.0))
SWEEP_STEPS = tuple(range(1, 65)) + (100, 250, 1000)
SWEEP_SHIFTS = (1.0, 3.0, 5.0, 5.5, 5.8, 8.0)


def official_scheduler_class(wan_repo: str | os.PathLike):
    path = Path(wan_repo) / "wan" / "utils" / "fm_solvers_unipc.py"
    if not path.is_file():
        raise SystemExit(f"no {path}: pass --wan-repo pointing at a Wan2.2 checkout")
    spec = importlib.util.spec_from_file_location("official_fm_solvers_unipc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FlowUniPCMultistepScheduler


def official_scheduler(cls, steps: int, shift: float):
    scheduler = cls(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    scheduler.set_timesteps(steps, device="cpu", shift=shift)
    return scheduler


def make_field(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "field.w_cond": torch.randn(4, 4, generator=gen) / 2,
        "field.w_uncond": torch.randn(4, 4, generator=gen) / 2,
        "field.u": torch.randn(SHAPE, generator=gen),
        "noise": torch.randn(SHAPE, generator=gen),
    }


def branch(weight: torch.Tensor, u: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One fake model branch: 0.3 * channel mix of x + (t / 1000) * u."""
    return 0.3 * torch.einsum("oc,bc...->bo...", weight, x) + (t.float() / 1000) * u


def run_official(cls, field, steps: int, shift: float):
    scheduler = official_scheduler(cls, steps, shift)
    x = field["noise"].clone()
    trajectory = [x]
    for t in scheduler.timesteps:
        cond = branch(field["field.w_cond"], field["field.u"], x, t)
        uncond = branch(field["field.w_uncond"], field["field.u"], x, t)
        v = uncond + GUIDE_SCALE * (cond - uncond)  # the reference loop's formula
        x = scheduler.step(v, t, x, return_dict=False)[0]
        trajectory.append(x)
    return scheduler.timesteps.clone(), scheduler.sigmas.clone(), torch.stack(trajectory)


def run_ours(field, steps: int, shift: float):
    schedule = flow_schedule(steps, shift)
    solver = UniPCSolver(schedule)
    x = field["noise"].clone()
    trajectory = [x]
    for i, t in enumerate(schedule.timesteps):
        cond = branch(field["field.w_cond"], field["field.u"], x, t)
        uncond = branch(field["field.w_uncond"], field["field.u"], x, t)
        x = solver.step(i, classifier_free_guidance(cond, uncond, GUIDE_SCALE), x)
        trajectory.append(x)
    return schedule.timesteps, schedule.sigmas, torch.stack(trajectory)


def compare_runs(cls, field) -> dict[str, torch.Tensor]:
    fixture = {}
    for steps, shift in CONFIGS:
        t_off, s_off, traj_off = run_official(cls, field, steps, shift)
        t_our, s_our, traj_our = run_ours(field, steps, shift)
        print(
            f"steps {steps:2d} shift {shift}: timesteps identical {torch.equal(t_off, t_our)}, "
            f"sigmas identical {torch.equal(s_off, s_our)}, "
            f"trajectory rel err {relative_error(traj_our, traj_off):.3e}, "
            f"result rel err {relative_error(traj_our[-1], traj_off[-1]):.3e}"
        )
        key = f"official.{steps}x{shift}"
        fixture.update({f"{key}.timesteps": t_off, f"{key}.sigmas": s_off, f"{key}.trajectory": traj_off})
    return fixture


def compare_sweep(cls) -> dict[str, torch.Tensor]:
    steps_col, shifts_col, timesteps, sigmas = [], [], [], []
    mismatches = 0
    for shift in SWEEP_SHIFTS:
        for steps in SWEEP_STEPS:
            official = official_scheduler(cls, steps, shift)
            ours = flow_schedule(steps, shift)
            same = torch.equal(official.timesteps, ours.timesteps) and torch.equal(official.sigmas, ours.sigmas)
            mismatches += not same
            steps_col.append(steps)
            shifts_col.append(shift)
            timesteps.append(official.timesteps)
            sigmas.append(official.sigmas)
    print(f"schedule sweep: {len(steps_col)} (steps, shift) pairs, {mismatches} differ from the official ones")
    return {
        "sweep.steps": torch.tensor(steps_col, dtype=torch.int64),
        "sweep.shifts": torch.tensor(shifts_col, dtype=torch.float64),
        "sweep.timesteps": torch.cat(timesteps).to(torch.int16),  # all < 1000; keeps the fixture small
        "sweep.sigmas": torch.cat(sigmas),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wan-repo", default=os.environ.get("WAN22_REPO", ""), help="Wan2.2 checkout")
    parser.add_argument("--no-write", action="store_true", help="measure only, leave the fixture alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cls = official_scheduler_class(args.wan_repo)
    field = make_field()
    fixture = {**field, **compare_runs(cls, field), **compare_sweep(cls)}
    if not args.no_write:
        save_file({k: v.contiguous() for k, v in fixture.items()}, str(FIXTURE))
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
