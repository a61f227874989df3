"""Block swap and the one placement policy (pipeline/placement.py, models/block_swap.py).

On the CPU the streaming really runs (copies from the host copies into the device slots, hooks, restore),
so these tests check bit-identical outputs, where the weights are between and during forward calls, that
leaving restores a whole model, the option checks, and the three users of the policy (handles, Models,
Session/launch). One CUDA test (skipped without a GPU) checks the peak memory and the copy/compute streams.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from tiny_models import _weights, write_pixelwizard

from pixelwizard_core.pipeline import memory
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.block_swap import ALIGN, BlockSwap
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.hr import WanHRDiT
from pixelwizard_core.models.layers import FP8, store_linears_in_fp8
from pixelwizard_core.pipeline.memory import MEMORY_MODES
from pixelwizard_core.pipeline.store import SHARED_STORE
from pixelwizard_core.pipeline.handles import DEFAULT_SWAP_BLOCKS, ModelHandle
from pixelwizard_core.pipeline.models import ModelFiles, Models
from pixelwizard_core.pipeline.placement import on_device

CONFIG = DiTConfig.tiny(num_layers=4)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised layers too, so that every weight shows in the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def make(kind: str, fp8: bool = False) -> torch.nn.Module:
    model = randomized(WanHRDiT(CONFIG) if kind == "hr" else WanDiT(CONFIG), seed=1 if kind == "hr" else 0)
    if fp8:
        model.to(torch.bfloat16)
        assert store_linears_in_fp8(model.blocks) > 0
    return model


def inputs(kind: str, seed: int = 5) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CONFIG.in_dim, 2, 4, 6, generator=g)
    t = torch.tensor([640.0])
    context = torch.randn(1, 9, CONFIG.text_dim, generator=g)
    if kind == "lr":
        return (x, t, context), {}
    return (x, t, context), {"dt": torch.tensor([250.0]), "anchor": torch.randn(1, CONFIG.in_dim, 2, 2, 3, generator=g)}


def run(model: torch.nn.Module, kind: str, seed: int = 5) -> torch.Tensor:
    args, kwargs = inputs(kind, seed)
    with torch.no_grad():
        return model(*args, **kwargs)


def pointers(model: torch.nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def hooks_of(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# --- exact outputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lr", "hr"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_swapped_output_equals_the_unswapped_bit_for_bit(kind, fp8):
    model = make(kind, fp8)
    expected = [run(model, kind, seed) for seed in (5, 6)]
    for count in (1, 2, 3, 4):
        with on_device(model, "cpu", home="cpu", swap_blocks=count):
            # the second call reuses slots that the first left holding other blocks
            for seed, want in zip((5, 6), expected):
                assert torch.equal(run(model, kind, seed), want), (kind, fp8, count, seed)
    if fp8:  # the fp8 weights and their scale buffers were streamed as they are
        assert model.blocks[3].ffn[0].weight.dtype == FP8
        assert "weight_scale" in dict(model.blocks[3].ffn[0].named_buffers())


def test_a_wrong_slot_would_change_the_output():
    """The comparison above can fail: a block given another block's weights changes the result."""
    model = make("lr")
    expected = run(model, "lr")
    swap = BlockSwap(model.blocks, 3, "cpu").enable()
    try:
        swap._hosts[1], swap._hosts[2] = swap._hosts[2], swap._hosts[1]  # blocks 2 and 3 trade weights
        assert not torch.equal(run(model, "lr"), expected)
    finally:
        swap._hosts[1], swap._hosts[2] = swap._hosts[2], swap._hosts[1]
        swap.disable("cpu")
    assert torch.equal(run(model, "lr"), expected)


# --- where the weights are -------------------------------------------------------------------------


def test_swapped_blocks_are_only_in_a_slot_while_they_run():
    model = make("lr")
    before = pointers(model)
    seen: dict[int, int] = {}

    def spy(index):
        return lambda module, args: seen.__setitem__(index, module.self_attn.q.weight.data_ptr())

    with on_device(model, "cpu", home="cpu", swap_blocks=3):
        hosts = pointers(model)  # the swapped blocks now sit in their host buffers
        spies = [block.register_forward_pre_hook(spy(i)) for i, block in enumerate(model.blocks)]
        for _ in range(2):
            run(model, "lr")
            # between calls every tensor is back on its host copy
            assert pointers(model) == hosts
        for s in spies:
            s.remove()
    assert all(hosts[k] == v for k, v in before.items() if not k.startswith(("blocks.1.", "blocks.2.", "blocks.3.")))
    host = {i: hosts[f"blocks.{i}.self_attn.q.weight"] for i in range(4)}
    assert seen[0] == host[0] == before["blocks.0.self_attn.q.weight"]  # not swapped: used in place
    assert all(seen[i] != host[i] for i in (1, 2, 3))  # swapped: a copy in a slot while it runs
    assert seen[1] == seen[3] != seen[2]  # two slots, taken in turn
    assert hooks_of(model) == 0 and pointers(model) == hosts  # home "cpu": they wait on their host copies


def test_block_swap_object_reports_residency_and_slot_memory():
    model = make("lr")
    during = []
    with BlockSwap(model.blocks, 2, "cpu") as swap:
        assert list(swap.indices) == [2, 3] and swap.resident() == []
        probes = [model.blocks[i].register_forward_pre_hook(lambda *a: during.append(swap.resident()))
                  for i in (1, 2, 3)]  # registered after ours: they see the block ready to run
        run(model, "lr")
        for probe in probes:
            probe.remove()
        assert swap.resident() == []  # nothing left on the device between calls
        one_block = sum(t.numel() * t.element_size() for t in model.blocks[3].state_dict().values())
        assert swap.host_bytes()["stored"] == one_block
        # one buffer per slot in the blocks' layout: the tensors plus their alignment
        assert swap.slot_bytes() == 2 * swap.host_bytes()["buffer"]
        layout = swap._layouts[0]
        assert one_block <= layout.nbytes <= one_block + len(layout.offsets) * ALIGN
        assert swap.host_bytes()["pinned"] == 0  # a CPU device pins nothing
    assert during == [[], [2], [3]]  # only the block about to run, each put back right after it ran
    assert swap.slot_bytes() == 0 and swap.resident() == [] and hooks_of(model) == 0


def test_leaving_restores_a_whole_model_that_works_as_before():
    model = make("hr", fp8=True)
    expected = run(model, "hr")
    with on_device(model, "cpu", home="cpu", swap_blocks=4):
        run(model, "hr")
    assert hooks_of(model) == 0
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert torch.equal(run(model, "hr"), expected)
    with on_device(model, "cpu", home="cpu"):  # the same model, next in another mode
        assert torch.equal(run(model, "hr"), expected)
    with on_device(model, "cpu", home="cpu", swap_blocks=1):
        assert torch.equal(run(model, "hr"), expected)


def test_an_error_inside_a_block_still_restores_the_model():
    model = make("lr")
    expected = run(model, "lr")
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(model, "cpu", home="cpu", swap_blocks=2):
            hosts = pointers(model)

            def fail(module, args):
                raise RuntimeError("boom")

            hook = model.blocks[3].self_attn.register_forward_pre_hook(fail)
            try:
                run(model, "lr")
            finally:
                hook.remove()
    assert pointers(model) == hosts and hooks_of(model) == 0  # back on the host copies, not in a slot
    assert torch.equal(run(model, "lr"), expected)


def test_home_none_leaves_the_model_as_it_ran():
    model = make("lr")
    with on_device(model, "cpu", home=None, swap_blocks=2):
        run(model, "lr")
    assert hooks_of(model) == 0


# --- refused options -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [-1, 5, 2.5, True, "3"])
def test_a_wrong_swap_count_is_refused_before_anything_moves(count):
    model = make("lr")
    before = pointers(model)
    with pytest.raises(ConfigError, match=r"swap_blocks .*4 transformer blocks.*0 \(no block swap\) to 4"):
        with on_device(model, "cpu", home="cpu", swap_blocks=count):
            pytest.fail("the block must not run")
    assert pointers(model) == before and hooks_of(model) == 0


def test_models_without_blocks_refuse_a_swap_count(generator):
    from conftest import scaled_tiny_vae

    vae = scaled_tiny_vae()
    with pytest.raises(ConfigError, match="WanVAE has no transformer blocks.*LR and HR DiTs only"):
        with on_device(vae, "cpu", home="cpu", swap_blocks=2):
            pass
    with on_device(vae, "cpu", home="cpu", swap_blocks=0) as same:
        assert same is vae


def test_swapping_needs_no_grad_and_one_user_at_a_time():
    model = make("lr")
    args, kwargs = inputs("lr")
    with on_device(model, "cpu", home="cpu", swap_blocks=2):
        with pytest.raises(ConfigError, match="block swap is for inference"):
            model(*args, **kwargs)
        with pytest.raises(ConfigError, match="already being streamed"):
            with on_device(model, "cpu", home="cpu", swap_blocks=1):
                pass
        run(model, "lr")  # still usable after both refusals


# --- the users of the policy -----------------------------------------------------------------------

TINY = DiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3, text_dim=32)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    states = {"dit": _weights(WanDiT(TINY), 20), "hr": _weights(WanHRDiT(TINY), 21)}
    return write_pixelwizard(tmp_path_factory.mktemp("swap_weights"), states)


def tiny_inputs(hr: bool) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 48, 2, 4, 6, generator=g)
    args = (x, torch.tensor([500.0]), torch.randn(1, 7, TINY.text_dim, generator=g))
    extra = {"dt": torch.tensor([125.0]), "anchor": torch.randn(1, 48, 2, 2, 3, generator=g)} if hr else {}
    return args, extra


def test_handles_in_block_swap_mode_run_end_to_end(tiny_files):
    SHARED_STORE.release()
    try:
        for role in ("lr", "hr"):
            args, extra = tiny_inputs(role == "hr")
            plain = ModelHandle.for_file(role, tiny_files[role], precision="fp32")
            swapped = ModelHandle.for_file(role, tiny_files[role], precision="fp32", memory_mode="block_swap",
                                           swap_blocks=2)
            with torch.no_grad(), SHARED_STORE.use(plain, torch.device("cpu"), home=torch.device("cpu")) as model:
                expected = model(*args, **extra)
            with torch.no_grad(), SHARED_STORE.use(swapped, torch.device("cpu"), home=torch.device("cpu")) as model:
                assert hooks_of(model) > 0  # streaming while open
                assert torch.equal(model(*args, **extra), expected)
            assert hooks_of(model) == 0
            # 0 means the default, capped at the model's 3 blocks
            default = dataclasses.replace(swapped, swap_blocks=0)
            assert default.blocks_to_swap == DEFAULT_SWAP_BLOCKS and default.swap_for(model) == 3
            with torch.no_grad(), SHARED_STORE.use(default, torch.device("cpu"), home=torch.device("cpu")) as model:
                assert torch.equal(model(*args, **extra), expected)
            assert swapped.home(torch.device("cpu")) == torch.device("cpu")
            # frozen, hashable, and it survives the trip to a pool worker
            assert pickle.loads(pickle.dumps(swapped)) == swapped and hash(swapped) != hash(plain)
    finally:
        SHARED_STORE.release()


def test_handle_options_are_checked(tiny_files):
    with pytest.raises(ConfigError, match="swap_blocks 4: model.pt has 3 transformer blocks; choose 1..3"):
        ModelHandle.for_file("lr", tiny_files["lr"], memory_mode="block_swap", swap_blocks=4)
    with pytest.raises(ConfigError, match="swap_blocks -1"):
        ModelHandle("lr", str(tiny_files["lr"]), memory_mode="block_swap", swap_blocks=-1)
    with pytest.raises(ConfigError, match="memory mode 'swap'"):
        ModelHandle("lr", str(tiny_files["lr"]), memory_mode="swap")
    assert set(MEMORY_MODES) == {"gpu", "offload", "block_swap"}
    # ignored outside the DiTs and outside block_swap mode (documented): one option set for a whole loader
    assert ModelHandle("vae", "v", memory_mode="block_swap", swap_blocks=5).blocks_to_swap == 0
    assert ModelHandle("lr", "l", memory_mode="offload", swap_blocks=5).blocks_to_swap == 0
    assert ModelHandle("vae", "v", memory_mode="block_swap").home(torch.device("cpu")) == torch.device("cpu")


def test_models_of_the_command_line_swap_the_dits(tiny_files):
    files = ModelFiles(lr=tiny_files["lr"], hr=tiny_files["hr"])
    args, _ = tiny_inputs(hr=False)
    plain = Models(files, device="cpu", dtype=torch.float32)
    with torch.no_grad(), plain.use("lr") as dit:
        expected = dit(*args)
    for load_mode in ("resident", "reload"):
        models = Models(files, device="cpu", dtype=torch.float32, block_swap=2, load_mode=load_mode)
        assert models._home("lr") == torch.device("cpu") and models._swap("vae") == 0
        with torch.no_grad(), models.use("lr") as dit:
            assert hooks_of(dit) > 0
            assert torch.equal(dit(*args), expected)
        assert hooks_of(dit) == 0
        assert models.holds("lr") == (load_mode == "resident")
    with pytest.raises(ConfigError, match="--block_swap: swap_blocks 4: the model has 3 transformer blocks"):
        Models(files, device="cpu", block_swap=4)
    with pytest.raises(ConfigError, match="--block_swap -2"):
        Models(files, device="cpu", block_swap=-2)
    with pytest.raises(ConfigError, match="--compile with --block_swap"):
        Models(files, device="cpu", block_swap=2, compile_blocks=True)


def test_cli_option_reaches_the_models(tiny_files):
    from pixelwizard_core.cli import build_parser, make_models

    args = build_parser().parse_args(["anchor", "--prompt", "p", "--lr_ckpt", str(tiny_files["lr"]),
                                      "--block_swap", "2", "--device", "cpu"])
    assert args.block_swap == 2
    assert make_models(args, "lr").block_swap == 2
    assert build_parser().parse_args(["decode", "x.safetensors"]).block_swap == 0


def test_session_and_torchrun_handles_swap_the_dits(tiny_files):
    from pixelwizard_core.distributed.launch import TorchrunStages, from_env
    from pixelwizard_core.distributed.session import ParallelConfig, Session
    from pixelwizard_core.pipeline.runner import PixelWizard

    files = ModelFiles(lr=tiny_files["lr"], hr=tiny_files["hr"])
    models = Models(files, device="cpu", dtype=torch.float32, block_swap=2, offload=False)
    pw = PixelWizard(models, TorchrunStages(Session(ParallelConfig(), device="cpu")))
    lr, hr = models.handle("lr"), models.handle("hr")
    assert (lr.memory_mode, lr.swap_blocks, hr.memory_mode, hr.swap_blocks) == ("block_swap", 2, "block_swap", 2)
    args, extra = tiny_inputs(hr=True)
    with torch.no_grad():
        expected = Models(files, device="cpu", dtype=torch.float32).use("hr").__enter__()(*args, **extra)
        with pw.stages.session._placed(hr) as model:
            assert hooks_of(model) > 0
            assert torch.equal(model(*args, **extra), expected)
    assert hooks_of(model) == 0
    with pytest.raises(ConfigError, match="--block_swap 2 with --dit_fsdp"):
        from_env(models, dit_fsdp=True)


def test_doctor_has_a_block_swap_mode():
    from pixelwizard_core import doctor

    lowvram = memory.estimate_memory(2560, 1440, mode="lowvram")
    swapped = memory.estimate_memory(2560, 1440, mode="block_swap")
    block = memory.DIT_BLOCK_PARAMS * 2  # bf16
    # ten blocks streamed, two of them in flight on the GPU
    assert lowvram.stages["hr"] - swapped.stages["hr"] == 8 * block
    assert lowvram.stages["anchor"] - swapped.stages["anchor"] == 8 * block
    assert lowvram.stages["decode"] == swapped.stages["decode"]
    assert memory.PROFILES["block_swap"].swap_blocks == DEFAULT_SWAP_BLOCKS
    assert f"--block_swap {DEFAULT_SWAP_BLOCKS}" in memory.PROFILES["block_swap"].flags
    # fp8 blocks are smaller: their Linear weights take one byte
    fp8 = memory.block_swap_savings(10, "fp8")
    assert fp8 == 8 * (memory.DIT_BLOCK_PARAMS * 2 - memory.DIT_BLOCK_LINEAR_PARAMS // 30)
    assert memory.block_swap_savings(2) == 0 and memory.block_swap_savings(0) == 0


# --- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_swap_lowers_peak_memory_and_keeps_outputs():
    config = DiTConfig.tiny(dim=512, ffn_dim=2048, num_heads=8, num_layers=8)
    model = randomized(WanDiT(config), 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_dim, 4, 32, 32, generator=g).cuda()
    t, context = torch.tensor([500.0]).cuda(), torch.randn(1, 9, config.text_dim, generator=g).cuda()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())

    def peak(swap: int) -> tuple[int, list[torch.Tensor]]:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), on_device(model, "cuda", home="cpu", swap_blocks=swap):
            outs = [model(x, t, context) for _ in range(3)]
            if swap:  # between calls the swapped blocks are on their pinned host copies
                for b in model.blocks[-swap:]:
                    assert all(p.device.type == "cpu" and p.is_pinned() for p in b.parameters())
                assert all(p.is_cuda for p in model.blocks[0].parameters())
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), [o.cpu() for o in outs]

    full, expected = peak(0)
    swapped, got = peak(6)
    assert all(torch.equal(a, expected[0]) for a in expected + got)
    assert full - swapped >= 3.5 * block  # 6 blocks off, 2 slots on
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # back home, whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_page_locks_each_swapped_block_once_at_its_size():
    """Measured: page-locked host bytes per swapped block within 1% of its stored bytes (torch's pinned
    allocator would round each up to a power of two), all of it released when the swap ends."""
    from pixelwizard_core.models.block_swap import locked_host_bytes

    config = DiTConfig.tiny(dim=512, ffn_dim=2048, num_heads=8, num_layers=4)
    model = randomized(WanDiT(config), 3).to(torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_dim, 2, 8, 8, generator=g).cuda()
    t, context = torch.tensor([500.0]).cuda(), torch.randn(1, 9, config.text_dim, generator=g).cuda()
    with torch.no_grad():
        expected = model(x, t, context)
    before = locked_host_bytes()
    swap = BlockSwap(model.blocks, 3, "cuda").enable()
    measured = (locked_host_bytes() - before) / 3
    stored = swap.host_bytes()["stored"]
    assert stored <= measured <= 1.01 * stored, (stored, measured)
    assert all(p.is_pinned() for block in model.blocks[1:] for p in block.parameters())
    with torch.no_grad():
        assert torch.equal(model(x, t, context), expected)
    swap.disable("cuda")
    assert locked_host_bytes() <= before
