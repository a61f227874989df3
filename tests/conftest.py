"""Shared test helpers: manifests of the real weight files, small deterministic inputs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
MANIFESTS = TESTS / "manifests"
FIXTURES = TESTS / "fixtures"

torch.set_num_threads(2)

# The fast tier, `python -m pytest -q -m "not slow"`, leaves out what starts processes or runs for seconds:
# these modules as a whole, and the tests named below (measured with --durations on 2 cores).
# Spawning processes (pools, torchrun ranks) and training runs: CI runs them, the inner loop does not
SLOW_MODULES = {"test_pool.py", "test_pool_portable.py", "test_distributed.py", "test_gpu_benchmark.py",
                "test_comfyui_integration.py", "test_toy_pipeline.py"}
SLOW_TESTS = {
    "test_the_recipe_runs_end_to_end_and_writes_files_the_loaders_read",
    "test_sequence_parallel_hr_forward_equals_single_process",
    "test_full_graph_on_a_two_process_pool_equals_the_local_graph",
    "test_compiled_blocks_give_the_same_velocity",
    "test_stages_apart_equal_generate_in_one_go",
    "test_shortcut_training_makes_4_step_sampling_match_the_exact_flow",
    "test_train_command_with_fsdp_on_two_processes",
    # the command line in a terminal and under stop signals (real processes, 10-25 s each on 2 cores)
    "test_bars_start_after_the_load_with_their_totals_and_logs_keep_their_own_rows",
    "test_the_demo_in_a_terminal",
    "test_ctrl_c_and_a_closed_terminal_during_the_decode_end_the_same_way",
    "test_sigterm_to_two_torchrun_ranks_during_the_decode",
    # whole runs and decodes the fast tier already covers in a smaller form (4-20 s each on a loaded machine)
    "test_stream_equals_whole_tile_decode",
    "test_outputs_are_not_overwritten_unless_asked",
    "test_start_image_is_the_anchor_and_pinned_hr_first_frame",
    "test_generate_download_fetches_what_is_missing_then_generates",
    "test_reference_mode_equals_the_reference_algorithm",
    "test_a_backend_looked_up_inside_the_block_breaks_the_graph",
    "test_sigterm_during_the_decode_leaves_no_partial_file_and_no_ffmpeg",
    "test_auto_decode_equals_the_explicit_decode_with_the_chosen_tiles",
    "test_single_process_cap_on_cpu_chooses_within_it",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def manifest(name: str) -> dict:
    """The parsed manifest ``tests/manifests/<name>.json``."""
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def meta_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def scaled_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny Wan2.2 VAE with weights scaled like a trained network's (activations of order 1, few clamped
    pixels), so tests of its numerics see realistic values rather than saturated noise."""
    from pixelwizard_core.models.vae import VAEConfig, WanVAE

    model = WanVAE(VAEConfig.tiny()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5 * (0.3 if name.startswith("decoder.head") else 1.0))
    return model.to(dtype)
