"""Sampling: schedules (timesteps, sigmas, dt), the UniPC / Euler / shortcut solvers, CFG."""

from .guidance import classifier_free_guidance
from .schedules import Schedule, flow_schedule, quantize_step_sizes, shift_sigmas
from .solvers import (
    SOLVERS,
    EulerSolver,
    ShortcutSolver,
    Solver,
    UniPCInterval,
    UniPCSolver,
    make_solver,
    solver_choices,
    unipc_intervals,
)

__all__ = [
    "SOLVERS",
    "EulerSolver",
    "Schedule",
    "ShortcutSolver",
    "Solver",
    "UniPCInterval",
    "UniPCSolver",
    "classifier_free_guidance",
    "flow_schedule",
    "make_solver",
    "solver_choices",
    "quantize_step_sizes",
    "shift_sigmas",
    "unipc_intervals",
]
