"""Schedules, solvers and CFG of pixelwizard_core.sampling.

Reference numbers come from the reference implementation (pixelwizard_reference.md sections 4, 5.2, 5.3);
the parity fixture from the official FlowUniPCMultistepScheduler (tools/parity/unipc.py); accuracy is
measured against the exact solution of the flow ODE for Gaussian data.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.sampling import (
    EulerSolver,
    Schedule,
    ShortcutSolver,
    UniPCSolver,
    classifier_free_guidance,
    flow_schedule,
    make_solver,
    quantize_step_sizes,
    unipc_intervals,
)

LR_TIMESTEPS = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890, 882,
    873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584, 555, 522,
    487, 448, 405, 356, 302, 241, 172, 92,
]


# ----------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize(
    "steps, shift, timesteps, step_sizes, sigmas",
    [
        (4, 5.5, [999, 942, 845, 646], [56, 96, 198, 646],
         ["0.9998180", "0.9426415", "0.8458933", "0.6467541", "0.0000000"]),
        (4, 5.8, [999, 945, 852, 658], [54, 92, 194, 658],
         ["0.9998274", "0.9454464", "0.8526902", "0.6587912", "0.0000000"]),
        (5, 5.8, [999, 958, 896, 794, 591], [40, 62, 102, 202, 590], None),
    ],
    ids=["2K", "4K", "old-4K-5-steps"],
)
def test_hr_schedules_match_reference_tables(steps, shift, timesteps, step_sizes, sigmas):
    schedule = flow_schedule(steps, shift)
    assert schedule.timesteps.dtype == torch.int64 and schedule.step_sizes.dtype == torch.int64
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == (steps + 1,)
    assert schedule.timesteps.tolist() == timesteps
    assert schedule.step_sizes.tolist() == step_sizes
    if sigmas is not None:
        assert [f"{s:.7f}" for s in schedule.sigmas.tolist()] == sigmas
    assert (schedule.steps, schedule.shift) == (steps, shift)


def test_lr_schedule_matches_reference_list():
    schedule = flow_schedule(50, 5.0)
    assert schedule.timesteps.tolist() == LR_TIMESTEPS
    assert schedule.sigmas[-1] == 0 and bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())


def test_sigma_max_is_float32_of_0_999():
    # unshifted, the first sigma is the float32 top of the training grid, not 0.999 itself
    assert flow_schedule(10, 1.0).sigmas[0].item() == 0.9990000128746033


def test_step_sizes_even_and_at_least_two():
    assert quantize_step_sizes(torch.tensor([999, 997, 996, 995, 1])).tolist() == [2, 2, 2, 994, 2]
    for steps in (2, 3, 7, 8, 50, 200):
        dt = flow_schedule(steps, 5.0).step_sizes
        assert bool((dt % 2 == 0).all()) and int(dt.min()) >= 2


@pytest.mark.parametrize(
    "steps, shift",
    [(0, 5.0), (-3, 5.0), (1001, 5.0), (4.0, 5.0), (True, 5.0), (4, 0.0), (4, -1.0), (4, float("nan")),
     (4, float("inf")), (4, "5"), (4, 1e9)],
)
def test_bad_schedule_arguments_raise(steps, shift):
    with pytest.raises(ConfigError):
        flow_schedule(steps, shift)


def test_schedule_validates_its_fields():
    good = flow_schedule(4, 5.5)
    with pytest.raises(ConfigError, match="timesteps"):
        Schedule(good.timesteps.float(), good.sigmas, good.step_sizes, 4, 5.5)
    with pytest.raises(ConfigError, match="sigmas"):
        Schedule(good.timesteps, good.sigmas[:-1], good.step_sizes, 4, 5.5)
    with pytest.raises(ConfigError, match="decrease"):
        Schedule(good.timesteps, good.sigmas.flip(0), good.step_sizes, 4, 5.5)


# ------------------------------------------------------------------------------ UniPC check values

@pytest.mark.parametrize("shift, neg_alpha_phi", [(5.5, [0.057187, 0.102635, 0.235419, 1.0]),
                                                   (5.8, [0.054390, 0.098108, 0.227397, 1.0])])
def test_unipc_reference_check_values(shift, neg_alpha_phi):
    intervals = unipc_intervals(flow_schedule(4, shift))
    assert [i.order for i in intervals] == [1, 2, 2, 1]
    h = [float(i.h) for i in intervals]
    assert [round(x, 4) for x in h[:3]] == [5.8121, 1.0966, 1.0979] and math.isinf(h[3])
    assert [round(float(i.neg_alpha_phi), 6) for i in intervals] == neg_alpha_phi
    # interval i's corrector runs at the start of step i + 1: steps 1, 2, 3
    rhos = [i.corrector_rho for i in intervals]
    assert rhos[0].tolist() == [0.5] and rhos[3] is None
    assert [round(x, 6) for x in rhos[1].tolist()] == [0.025939, 0.563665]
    assert [round(x, 6) for x in rhos[2].tolist()] == [0.081755, 0.507953]


# ------------------------------------------------------------------------ parity with the official code

@pytest.fixture(scope="module")
def parity():
    return load_file(str(FIXTURES / "parity_unipc.safetensors"))


def _branch(weight, u, x, t):
    return 0.3 * torch.einsum("oc,bc...->bo...", weight, x) + (t.float() / 1000) * u


def test_schedule_sweep_matches_official(parity):
    offset_t = offset_s = 0
    steps_list, shifts = parity["sweep.steps"].tolist(), parity["sweep.shifts"].tolist()
    assert len(steps_list) > 300
    for steps, shift in zip(steps_list, shifts):
        ours = flow_schedule(steps, shift)
        official_t = parity["sweep.timesteps"][offset_t:offset_t + steps].to(torch.int64)
        official_s = parity["sweep.sigmas"][offset_s:offset_s + steps + 1]
        assert torch.equal(ours.timesteps, official_t), (steps, shift)
        assert torch.equal(ours.sigmas, official_s), (steps, shift)
        offset_t, offset_s = offset_t + steps, offset_s + steps + 1
    assert offset_t == parity["sweep.timesteps"].numel() and offset_s == parity["sweep.sigmas"].numel()


@pytest.mark.parametrize("steps, shift", [(4, 5.5), (4, 5.8), (5, 5.8), (50, 5.0)])
def test_unipc_trajectory_matches_official(parity, steps, shift):
    key = f"official.{steps}x{shift}"
    schedule = flow_schedule(steps, shift)
    assert torch.equal(schedule.timesteps, parity[f"{key}.timesteps"])
    assert torch.equal(schedule.sigmas, parity[f"{key}.sigmas"])
    solver = make_solver("unipc", schedule)
    x = parity["noise"]
    trajectory = [x]
    for i, t in enumerate(schedule.timesteps):
        cond = _branch(parity["field.w_cond"], parity["field.u"], x, t)
        uncond = _branch(parity["field.w_uncond"], parity["field.u"], x, t)
        x = solver.step(i, classifier_free_guidance(cond, uncond, 5.0), x)
        trajectory.append(x)
    ours, official = torch.stack(trajectory).double(), parity[f"{key}.trajectory"].double()
    assert ours.shape == official.shape
    assert float((ours - official).abs().max() / official.abs().max()) <= 1e-6


# ------------------------------------------------------- accuracy against the exact flow of Gaussian data

class GaussianFlow:
    """Data x0 ~ N(mu, s^2) per element, x_sigma = (1 - sigma) x0 + sigma eps. The exact velocity
    E[eps - x0 | x] is linear in x and the ODE keeps each sample's standard score:
    x(sigma) = (1 - sigma) mu + sqrt(D(sigma)) z with D = (1 - sigma)^2 s^2 + sigma^2."""

    def __init__(self, seed: int = 1, shape=(2, 4, 3, 5)) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=gen, dtype=torch.float64)
        self.s = 0.2 + 1.8 * torch.rand(shape, generator=gen, dtype=torch.float64)
        self.noise = torch.randn(shape, generator=gen, dtype=torch.float64)

    def _var(self, sigma: float) -> torch.Tensor:
        return (1 - sigma) ** 2 * self.s**2 + sigma**2

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x.double()
        return (x - (1 - sigma) * self.mu) * (sigma - (1 - sigma) * self.s**2) / self._var(sigma) - self.mu

    def exact(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        z = (x_start.double() - (1 - sigma_start) * self.mu) / self._var(sigma_start).sqrt()
        return (1 - sigma_end) * self.mu + self._var(sigma_end).sqrt() * z

    def rk4(self, x: torch.Tensor, sigma_start: float, sigma_end: float, n: int) -> torch.Tensor:
        h = (sigma_end - sigma_start) / n
        for i in range(n):
            s = sigma_start + i * h
            k1 = self.velocity(x, s)
            k2 = self.velocity(x + h / 2 * k1, s + h / 2)
            k3 = self.velocity(x + h / 2 * k2, s + h / 2)
            k4 = self.velocity(x + h * k3, s + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


def _rel(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours.double() - exact).abs().max() / exact.abs().max())


def _integrate(flow: GaussianFlow, name: str, schedule: Schedule, n_steps: int, x: torch.Tensor) -> torch.Tensor:
    solver = make_solver(name, schedule)
    x = x.float()
    for i in range(n_steps):
        x = solver.step(i, flow.velocity(x, float(schedule.sigmas[i])).float(), x)
    return x


def final_error(flow: GaussianFlow, name: str, steps: int, shift: float) -> float:
    """Relative error of the result of a full reference schedule (noise -> sigma 0)."""
    schedule = flow_schedule(steps, shift)
    x = _integrate(flow, name, schedule, steps, flow.noise)
    return _rel(x, flow.exact(flow.noise, float(schedule.sigmas[0]), 0.0))


def linear_schedule(steps: int, top: float = 0.95, bottom: float = 0.05) -> Schedule:
    sigmas = torch.cat([torch.linspace(top, bottom, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    timesteps = (sigmas[:-1] * 1000).to(torch.int64)
    return Schedule(timesteps, sigmas.float(), quantize_step_sizes(timesteps), steps, 1.0)


def interior_error(flow: GaussianFlow, name: str, steps: int) -> float:
    """Error at sigma 0.05 after steps - 1 steps of a schedule linear in sigma from 0.95: away from the
    order-1 start and end, where UniPC-2 with its corrector shows its order 3."""
    schedule = linear_schedule(steps)
    start = flow.exact(flow.noise, 1.0, float(schedule.sigmas[0]))
    x = _integrate(flow, name, schedule, steps - 1, start)
    return _rel(x, flow.exact(flow.noise, 1.0, float(schedule.sigmas[steps - 1])))


def test_gaussian_flow_exact_solution_agrees_with_fine_rk4():
    flow = GaussianFlow()
    sigma0 = float(flow_schedule(50, 5.0).sigmas[0])
    reference = flow.rk4(flow.noise, sigma0, 0.0, 2000)
    assert _rel(reference, flow.exact(flow.noise, sigma0, 0.0)) < 1e-10


def test_unipc_far_more_accurate_than_euler_on_reference_schedule():
    flow = GaussianFlow()
    unipc, euler = final_error(flow, "unipc", 50, 1.0), final_error(flow, "euler", 50, 1.0)
    assert unipc < euler / 10          # measured 3.6e-4 vs 2.9e-2
    # the LR stage's own schedule: less margin, the final step to 0 is order 1 by design
    assert final_error(flow, "unipc", 50, 5.0) < final_error(flow, "euler", 50, 5.0) / 4  # 5.3e-3 vs 3.3e-2
    e20, e40 = final_error(flow, "unipc", 20, 1.0), final_error(flow, "unipc", 40, 1.0)
    assert math.log2(e20 / e40) > 1.5  # measured 1.90


def test_unipc_interior_convergence_order_three():
    # every broken variant tried (no corrector, order-1 corrector, wrong/swapped rho, predictor order 1
    # or sign) stays below order 2.3 and below a 70x gain over Euler here
    flow = GaussianFlow()
    e20, e40 = interior_error(flow, "unipc", 20), interior_error(flow, "unipc", 40)
    assert math.log2(e20 / e40) > 2.5                                               # measured 2.69
    assert interior_error(flow, "unipc", 50) < interior_error(flow, "euler", 50) / 90  # measured 120x
    euler_order = math.log2(interior_error(flow, "euler", 20) / interior_error(flow, "euler", 40))
    assert 0.8 < euler_order < 1.2


# ------------------------------------------------------------------------------ solver coincidences

def _random_pair(seed: int, shape=(2, 3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_first_unipc_step_equals_euler():
    schedule = flow_schedule(4, 5.5)
    v, x = _random_pair(0)
    unipc, euler = UniPCSolver(schedule).step(0, v, x), EulerSolver(schedule).step(0, v, x)
    assert torch.allclose(unipc, euler, rtol=0, atol=1e-6 * float(euler.abs().max()))
    assert not torch.allclose(unipc, x, atol=1e-3)


def test_last_step_returns_x0_prediction():
    schedule = flow_schedule(4, 5.8)
    solver = UniPCSolver(schedule)
    v, x = _random_pair(1)
    for i in range(3):
        x = solver.step(i, v * (i + 1), x)
    v_last = _random_pair(2)[0]
    expected = x - schedule.sigmas[3] * v_last
    assert torch.equal(solver.step(3, v_last, x), expected)
    assert torch.equal(EulerSolver(schedule).step(3, v_last, x), expected)


def test_unipc_later_steps_differ_from_euler():
    schedule = flow_schedule(4, 5.5)
    unipc, euler = UniPCSolver(schedule), EulerSolver(schedule)
    v, x = _random_pair(3)
    xu = unipc.step(0, v, x)
    xe = euler.step(0, v, x)
    v2 = _random_pair(4)[0]
    assert not torch.allclose(unipc.step(1, v2, xu), euler.step(1, v2, xe), atol=1e-3)


def test_shortcut_equals_euler_where_dt_matches_the_sigma_gap():
    timesteps = torch.tensor([750, 500, 250])
    schedule = Schedule(timesteps, torch.tensor([0.75, 0.5, 0.25, 0.0]), quantize_step_sizes(timesteps), 3, 1.0)
    assert schedule.step_sizes.tolist() == [250, 250, 250]
    v, x = _random_pair(5)
    for i in range(3):
        assert torch.equal(ShortcutSolver(schedule).step(i, v, x), EulerSolver(schedule).step(i, v, x))


def test_shortcut_moves_by_quantised_dt_on_2k_schedule():
    schedule = flow_schedule(4, 5.5)
    shortcut, euler = ShortcutSolver(schedule), EulerSolver(schedule)
    ones, zeros = torch.ones(3), torch.zeros(3)
    spans = [-float(shortcut.step(i, ones, zeros)[0]) for i in range(4)]
    gaps = [-float(euler.step(i, ones, zeros)[0]) for i in range(4)]
    assert spans == pytest.approx([0.056, 0.096, 0.198, 0.646], abs=1e-7)
    assert gaps == pytest.approx([0.0571765, 0.0967482, 0.1991392, 0.6467541], abs=1e-6)


def test_unipc_reset_reproduces_and_outputs_float32():
    schedule = flow_schedule(5, 5.8)
    solver = UniPCSolver(schedule)
    v, x0 = _random_pair(6)
    runs = []
    for _ in range(2):
        solver.reset()
        x = x0.double()
        for i in range(5):
            x = solver.step(i, (0.5 * x + v).to(torch.bfloat16), x)
            assert x.dtype == torch.float32
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", ["dpm++", "", None, 3])
def test_unknown_solver_name_raises_with_the_names(name):
    with pytest.raises(ConfigError, match="unipc, euler, shortcut"):
        make_solver(name, flow_schedule(4, 5.5))


def test_solver_names_and_schedule_argument():
    schedule = flow_schedule(4, 5.5)
    assert isinstance(make_solver(" UniPC ", schedule), UniPCSolver)
    assert isinstance(make_solver("euler", schedule), EulerSolver)
    assert isinstance(make_solver("shortcut", schedule), ShortcutSolver)
    with pytest.raises(ConfigError, match="Schedule"):
        make_solver("unipc", [999, 942])


def test_bad_step_arguments_raise():
    schedule = flow_schedule(4, 5.5)
    v, x = _random_pair(7)
    for solver in (UniPCSolver(schedule), EulerSolver(schedule), ShortcutSolver(schedule)):
        with pytest.raises(ConfigError, match="index"):
            solver.step(4, v, x)
        with pytest.raises(ConfigError, match="index"):
            solver.step(-1, v, x)
        with pytest.raises(ConfigError, match="shape"):
            solver.step(0, v[:1], x)
        with pytest.raises(ConfigError, match="floating"):
            solver.step(0, v.long(), x)
    unipc = UniPCSolver(schedule)
    with pytest.raises(ConfigError, match="in order"):
        unipc.step(1, v, x)
    unipc.step(0, v, x)
    with pytest.raises(ConfigError, match="in order"):
        unipc.step(0, v, x)


# -------------------------------------------------------------------------------------------- CFG

def test_classifier_free_guidance():
    cond, uncond = _random_pair(8)
    out = classifier_free_guidance(cond.bfloat16(), uncond.bfloat16(), 5.0)
    assert out.dtype == torch.float32
    c, u = cond.bfloat16().double(), uncond.bfloat16().double()
    assert torch.allclose(out.double(), u + 5.0 * (c - u), atol=1e-5)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 1.0), cond, atol=1e-6)
    with pytest.raises(ConfigError, match="scale"):
        classifier_free_guidance(cond, uncond, float("nan"))
    with pytest.raises(ConfigError, match="shape"):
        classifier_free_guidance(cond, uncond[:1], 5.0)
