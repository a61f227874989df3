"""Multi-process building blocks on CPU/gloo: FSDP sharding and loading, the split tiled decode, degree checks,
the pool's message transport, and ``torchrun ... generate`` against one process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from spm_support import train_umt5_like_spm
from tiny_models import _weights, state_dicts, write_comfy, write_pixelwizard

from pixelwizard_core.distributed.session import ParallelConfig, check_model_degree
from pixelwizard_core.distributed.tiles import blend_tiles, decode_tiles, plan_for_latent, tiles_of_rank
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.hr import WanHRDiT
from pixelwizard_core.pipeline.handles import ModelHandle, load
from pixelwizard_core.pipeline.engine import DecodeSettings
from pixelwizard_core.pipeline.tiled_decode import tiled_decode

# Two heads of 128 (the real head size), so Ulysses can split them over two processes.
DIT = DiTConfig(dim=256, ffn_dim=256, freq_dim=256, num_heads=2, num_layers=2, text_dim=32)
REPO = Path(__file__).resolve().parents[1]


def write_weights(root: Path) -> dict[str, Path]:
    """Tiny two-head LR/HR DiTs (PixelWizard .pt, float32), umT5 and VAE (Comfy-Org files)."""
    states = state_dicts()
    states["dit"], states["hr"] = _weights(WanDiT(DIT), 10), _weights(WanHRDiT(DIT), 11)
    (root / "spm").mkdir(parents=True, exist_ok=True)
    comfy = write_comfy(root / "comfy", states, train_umt5_like_spm(root / "spm"))
    pw = write_pixelwizard(root / "pw", states)
    return {"text": comfy["t5"], "vae": comfy["vae"], "lr": pw["lr"], "hr": pw["hr"]}


def handles(files: dict[str, Path]) -> dict[str, ModelHandle]:
    return {role: ModelHandle.for_file(role, path, precision="fp32") for role, path in files.items()}


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


@contextlib.contextmanager
def one_thread():
    """CPU kernels round differently with other thread counts; the workers run one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_weights(tmp_path_factory.mktemp("weights"))


# --- FSDP ----------------------------------------------------------------------------------------


def _fsdp_inputs():
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 48, 2, 4, 6, generator=g), torch.randn(1, 7, DIT.text_dim, generator=g)
    return x, context, torch.randn(1, 48, 2, 2, 3, generator=g)


def _fsdp_worker(rank: int, port: int, files: dict, result: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from pixelwizard_core.distributed.fsdp import load_sharded, shard_stats
    from pixelwizard_core.pipeline.text import TextEncoder

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        hr = load_sharded(files["hr"], "hr_dit", mesh, dtype=torch.float32)
        t5 = load_sharded(files["text"], "t5", mesh, dtype=torch.float32)
        from pixelwizard_core.loading import load_t5_tokenizer

        x, context, anchor = _fsdp_inputs()
        with torch.no_grad():
            out = hr(x, torch.tensor([900.0]), context, dt=torch.tensor([100.0]), anchor=anchor)
        text = TextEncoder(t5, load_t5_tokenizer(files["text"])).encode(["a red fox", "snow"])
        adapter_sharded = any(hasattr(p, "to_local") for p in hr.spatial_adapter.parameters())
        torch.save({"out": out, "text": text, "hr": shard_stats(hr), "t5": shard_stats(t5),
                    "adapter_sharded": adapter_sharded, "dtype": hr.blocks[0].self_attn.q.weight.dtype},
                   f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp_holds_half_of_each_block_per_rank_and_equals_the_unsharded_model(files, tmp_path):
    """FSDP2 over 2 gloo ranks, loaded shard by shard: every rank holds about half of the block
    parameters, the injector is whole on each, and the outputs equal the unsharded models'."""
    result = str(tmp_path / "fsdp")
    mp.spawn(_fsdp_worker, args=(free_port(), {k: str(v) for k, v in files.items()}, result), nprocs=2)
    ranks = [torch.load(f"{result}.{r}", weights_only=True) for r in range(2)]
    h = handles(files)
    hr, encoder = load(h["hr"], torch.device("cpu")), load(h["text"], torch.device("cpu"))
    x, context, anchor = _fsdp_inputs()
    with one_thread(), torch.no_grad():
        expected = hr(x, torch.tensor([900.0]), context, dt=torch.tensor([100.0]), anchor=anchor)
        expected_text = encoder.encode(["a red fox", "snow"])
    for r in ranks:
        for model in ("hr", "t5"):
            stats = r[model]
            assert abs(stats["block_local"] / stats["block_total"] - 0.5) < 0.01, stats
        assert not r["adapter_sharded"] and r["dtype"] == torch.float32
        assert torch.equal(r["out"], expected)  # all-gathered weights are the weights: no rounding at all
        assert torch.equal(r["text"], expected_text)
    assert sum(r["hr"]["block_local"] for r in ranks) == ranks[0]["hr"]["block_total"]


# --- split decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["cosine", "reference"])
def test_tiles_split_over_ranks_blend_to_the_single_process_decode(files, blend):
    """Ranks decode disjoint tile subsets; blending them gives the one-process tiled decode bit for bit."""
    vae = load(handles(files)["vae"], torch.device("cpu"))
    latent = torch.randn(1, 48, 2, 4, 12, generator=torch.Generator().manual_seed(0))
    settings = DecodeSettings(num_patches=3, overlap=1, blend=blend)
    plan = plan_for_latent(latent, settings)
    pieces = {}
    for rank in range(2):
        subset = tiles_of_rank(len(plan.tiles), rank, 2)
        assert subset == ([0, 2] if rank == 0 else [1])
        pieces.update(decode_tiles(vae, latent, plan, subset))
    expected = tiled_decode(vae, latent, num_patches=3, overlap=1, blend=blend)
    assert torch.equal(blend_tiles(plan, pieces), expected)
    with pytest.raises(ConfigError, match=r"tiles \[1\] of 3 were not decoded"):
        blend_tiles(plan, {i: p for i, p in pieces.items() if i != 1})


# --- options ---------------------------------------------------------------------------------------


def test_invalid_degrees_are_refused_with_the_valid_ones(files):
    with pytest.raises(ConfigError, match="does not divide the model's 2 attention heads; use one of 1, 2 "):
        check_model_degree(files["hr"], "hr", 4)
    check_model_degree(files["hr"], "hr", 2)
    with pytest.raises(ConfigError, match="use ulysses 4"):
        ParallelConfig(ulysses=2).check(4)
    with pytest.raises(ConfigError, match="positive integer"):
        ParallelConfig(ulysses=0).check(1)


def test_pool_messages_carry_tensors_and_settings_but_no_arbitrary_objects(tmp_path):
    import pickle
    from multiprocessing import Pipe

    from pixelwizard_core.distributed.transport import INLINE_BYTES, receive, send
    from pixelwizard_core.pipeline.presets import StageSettings

    a, b = Pipe()
    big = torch.randn(INLINE_BYTES).to(torch.bfloat16)  # 2x the inline limit: goes through a file
    message = {"small": torch.arange(6).view(2, 3), "big": big, "settings": StageSettings(64, 64, 5, 2, 5.0, 5.0),
               "empty": torch.zeros(0, 3), "path": Path("/x")}
    send(a, message, tmp_path)
    got = receive(b)
    assert torch.equal(got["small"], message["small"]) and torch.equal(got["big"], big)
    assert got["settings"] == message["settings"] and got["path"] == Path("/x") and got["empty"].shape == (0, 3)
    assert list(tmp_path.iterdir()) == []  # the receiver removed the file it mapped
    a.send_bytes(pickle.dumps(io.StringIO))  # a reference to code outside the allowed modules
    with pytest.raises(pickle.UnpicklingError, match="may not reference _io.StringIO"):
        receive(b)


# --- torchrun ----------------------------------------------------------------------------------------


def test_torchrun_generate_with_ulysses_and_fsdp_equals_one_process(files, tmp_path):
    """``generate --ulysses_size 2 --dit_fsdp --t5_fsdp`` in 2 processes given torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; torchrun's agent itself is left out to save
    time) runs the pool's code path: the HR latent equals the one-process run's, rank 0 alone writes files."""
    common = ["--text_encoder", str(files["text"]), "--vae_path", str(files["vae"]), "--lr_ckpt", str(files["lr"]),
              "--hr_ckpt", str(files["hr"]), "--device", "cpu", "--dtype", "fp32", "--lr_size", "128*64",
              "--frame_num", "5", "--lr_steps", "3", "--resolution", "256x128", "--hr_steps", "2",
              "--num_patches", "3", "--overlap", "1", "--prompt", "a red fox in snow", "--base_seed", "-1"]
    argv = [sys.executable, "-m", "pixelwizard_core", "generate", *common, "--ulysses_size", "2", "--dit_fsdp",
            "--t5_fsdp", "--video_dir", str(tmp_path / "many"), "--save_dir", str(tmp_path / "many")]
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        ranks.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=240)[0] for process in ranks]
    for process, output in zip(ranks, outputs):
        assert process.returncode == 0, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["0.mp4", "0.safetensors", "manifest.jsonl"]

    from pixelwizard_core.cli import main
    from pixelwizard_core.io.video import read_video
    from pixelwizard_core.pipeline.anchors import load_hr_latent

    many, metadata = load_hr_latent(tmp_path / "many" / "0.safetensors")
    one_args = [a if a != "-1" else str(metadata["seed"] - 10000) for a in common]  # the base seed rank 0 drew
    assert main(["generate", *one_args, "--video_dir", str(tmp_path / "one"), "--save_dir", str(tmp_path / "one")]) == 0
    one, _ = load_hr_latent(tmp_path / "one" / "0.safetensors")
    assert relative_error(many, one) <= 1e-5
    assert tuple(read_video(tmp_path / "many" / "0.mp4").shape) == (5, 128, 256, 3)


STREAM_DECODE = {"num_patches": 3, "overlap": 1}  # 3 tiles: rank 0 decodes tiles 0 and 2, rank 1 tile 1


def _torchrun_decode_worker(rank: int, port: int, vae: str, latent_file: str, out: str, result: str) -> None:
    """One rank of ``torchrun ... generate``'s decode (the driver over TorchrunStages, without the CLI around it):
    a decode that rank 1 interrupts, one whose output rank 0 refuses, one that rank 0 fails to write, then
    order "frame" and "tile", with a spy on the blending that records how many frames each call blends."""
    from pixelwizard_core.distributed import launch
    from pixelwizard_core.distributed.session import JobInterrupted, Session, init_process_group
    from pixelwizard_core.pipeline.models import ModelFiles, Models
    from pixelwizard_core.pipeline.runner import PixelWizard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group("gloo", rank=rank, world_size=2, timeout_s=60)  # a rank left waiting fails in a minute
    try:
        pw = PixelWizard(Models(ModelFiles(vae=Path(vae)), device="cpu"), launch.TorchrunStages(Session()))
        latent, folder, record = torch.load(latent_file), Path(out), {}
        blends, blend = [], launch.blend_tiles

        def spy(plan, pieces):
            video = blend(plan, pieces)
            blends.append(video)
            return video

        launch.blend_tiles = spy
        steps = []
        pw.stages.session.should_stop = lambda: rank == 1 and len(steps) >= 2  # rank 1 stops in latent frame 1
        try:
            pw.decode(latent, folder / "stopped.mp4", DecodeSettings(**STREAM_DECODE),
                      on_step=lambda d, t: steps.append(d))
        except JobInterrupted as error:
            record["stopped"] = str(error)
        record["stop_steps"], record["stop_blends"] = steps, len(blends)
        pw.stages.session.should_stop = lambda: False
        try:
            pw.decode(latent, folder / "refused.avi", DecodeSettings(**STREAM_DECODE))
        except ConfigError as error:
            record["refused"] = str(error)
        clash = folder / "clash_png"
        if rank == 0:  # rank 0 fails to write the second chunk, while rank 1 decodes latent frame 2
            clash.mkdir()
            (clash / "frame_00001.png").write_bytes(b"")
        try:
            pw.decode(latent, folder / "clash.mp4", DecodeSettings(**STREAM_DECODE), png_dir=clash)
        except (ConfigError, JobInterrupted) as error:
            record["clash"] = str(error)
        for order in ("frame", "tile"):
            blends.clear()
            pw.decode(latent, folder / f"{order}.mp4", DecodeSettings(**STREAM_DECODE, order=order),
                      png_dir=folder / f"{order}_png")
            record[order] = {"frames": [v.shape[2] for v in blends], "video": torch.cat(blends, 2) if blends else None}
        torch.save(record, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_torchrun_decode_streams_frame_by_frame_equal_to_the_whole_tile_decode(files, tmp_path):
    """The torchrun decode, order "frame": rank 0 blends one latent frame's pieces at a time (1 then 4 frames,
    never the whole video) and writes the same frames as order "tile" (whole tiles, blended at once) and as the
    one-process tiled decode, bit for bit. A stop on one rank, an output rank 0 refuses up front or fails to
    write midway stops both ranks at the same latent frame, and they stay in step for the next decode."""
    from pixelwizard_core.io.video import read_video

    latent = torch.randn(1, 48, 3, 4, 12, generator=torch.Generator().manual_seed(5))
    torch.save(latent, tmp_path / "latent.pt")
    out, result = tmp_path / "out", str(tmp_path / "decode")
    out.mkdir()
    mp.spawn(_torchrun_decode_worker, nprocs=2,
             args=(free_port(), str(files["vae"]), str(tmp_path / "latent.pt"), str(out), result))
    main, other = (torch.load(f"{result}.{r}", weights_only=True) for r in range(2))
    with one_thread(), torch.no_grad():
        expected = tiled_decode(load(handles(files)["vae"], torch.device("cpu")), latent, **STREAM_DECODE)

    assert main["frame"]["frames"] == [1, 4, 4] and main["tile"]["frames"] == [9]
    assert torch.equal(main["frame"]["video"], expected) and torch.equal(main["tile"]["video"], expected)
    assert other["frame"]["frames"] == [] == other["tile"]["frames"]
    assert torch.equal(read_video(out / "frame.mp4"), read_video(out / "tile.mp4"))
    pngs = {order: sorted((out / f"{order}_png").iterdir()) for order in ("frame", "tile")}
    assert len(pngs["frame"]) == 9 and [p.read_bytes() for p in pngs["frame"]] == [p.read_bytes() for p in pngs["tile"]]
    assert sorted(p.name for p in out.iterdir()) == ["clash_png", "frame.mp4", "frame_png", "tile.mp4", "tile_png"]

    assert other["stopped"] == "decode interrupted after step 2 of 3"
    assert main["stopped"].startswith("decode stopped at latent frame 1 of 3: another rank was interrupted")
    assert main["stop_steps"] == [1, 2, 3, 4] and main["stop_blends"] == 1  # frame 0 written, then dropped
    assert "must end in .mp4" in main["refused"] and other["refused"] == main["refused"]
    assert "frame_00001.png' already exists" in main["clash"]
    assert other["clash"].startswith("decode stopped at latent frame 2 of 3: another rank")
    assert sorted(p.name for p in (out / "clash_png").iterdir()) == ["frame_00000.png", "frame_00001.png"]


def test_ulysses_without_torchrun_says_how_to_launch(files, tmp_path, caplog):
    from pixelwizard_core.cli import main

    argv = ["generate", "--text_encoder", str(files["text"]), "--vae_path", str(files["vae"]), "--lr_ckpt",
            str(files["lr"]), "--hr_ckpt", str(files["hr"]), "--device", "cpu", "--prompt", "x",
            "--video_dir", str(tmp_path), "--ulysses_size", "2"]
    assert main(argv) == 2
    assert "torchrun --nproc_per_node 2" in caplog.text


BUDGET_LATENT = (1, 48, 2, 4, 48)  # 768 pixels wide: 1, 2 or 3 automatic tiles along the width


def budget_cases() -> dict[str, DecodeSettings]:
    """Caps that resolve the automatic tiles of BUDGET_LATENT differently from the default (1 tile, frame) on
    2 ranks: 2 tiles in frame order (one per rank), or 3 tiles in tile order (no frame-order share fits)."""
    from pixelwizard_core.distributed.tiles import rank_decode_bytes

    hw = BUDGET_LATENT[-2:]

    def share(n: int, order: str) -> int:
        return rank_decode_bytes(hw, n, "w", 1, order=order, vae_precision="fp32", world_size=2)

    # 3 tiles in frame order hold 2 on rank 0, but a smaller transient than 2 tiles: still more than tile order
    assert share(3, "tile") < share(3, "frame") < share(2, "frame") < share(1, "frame")
    return {"frame": DecodeSettings(num_patches=0, overlap=1, budget_bytes=share(2, "frame")),
            "tile": DecodeSettings(num_patches=0, overlap=1, budget_bytes=share(3, "frame") - 1)}


def _torchrun_budget_worker(rank: int, port: int, vae: str, latent_file: str, out: str, result: str) -> None:
    """One rank of the torchrun decode with ``budget_bytes`` caps: records the settings each rank planned with
    and rank 0's blended chunks."""
    from pixelwizard_core.distributed import launch
    from pixelwizard_core.distributed.session import Session, init_process_group
    from pixelwizard_core.pipeline.models import ModelFiles, Models
    from pixelwizard_core.pipeline.runner import PixelWizard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group("gloo", rank=rank, world_size=2, timeout_s=60)
    try:
        pw = PixelWizard(Models(ModelFiles(vae=Path(vae)), device="cpu"), launch.TorchrunStages(Session()))
        latent, record = torch.load(latent_file), {}
        planned, blends = [], []
        plan, blend = launch.plan_for_latent, launch.blend_tiles
        launch.plan_for_latent = lambda latent, settings: planned.append(settings) or plan(latent, settings)
        launch.blend_tiles = lambda p, pieces: blends.append(blend(p, pieces)) or blends[-1]
        for name, settings in budget_cases().items():
            planned.clear(), blends.clear()
            pw.decode(latent, Path(out) / f"{name}.mp4", settings)
            record[name] = {"settings": dataclasses.asdict(planned[0]), "frames": [v.shape[2] for v in blends],
                            "video": torch.cat(blends, 2) if blends else None}
        torch.save(record, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_torchrun_decode_budget_resolves_one_plan_on_every_rank(files, tmp_path):
    """``budget_bytes`` (``--decode_budget_gib``) on CPU ranks: every rank plans the same tiles and order,
    chosen for one rank's share (2 tiles in frame order, one per rank; or 3 tiles in tile order), not the
    default's 1 tile; rank 0 writes the one-process tiled decode of that plan, bit for bit."""
    from pixelwizard_core.distributed.tiles import resolve_settings
    from pixelwizard_core.io.video import read_video

    latent = torch.randn(*BUDGET_LATENT, generator=torch.Generator().manual_seed(7))
    torch.save(latent, tmp_path / "latent.pt")
    out, result = tmp_path / "out", str(tmp_path / "budget")
    out.mkdir()
    mp.spawn(_torchrun_budget_worker, nprocs=2,
             args=(free_port(), str(files["vae"]), str(tmp_path / "latent.pt"), str(out), result))
    main, other = (torch.load(f"{result}.{r}", weights_only=True) for r in range(2))
    vae = load(handles(files)["vae"], torch.device("cpu"))
    default = resolve_settings(latent, DecodeSettings(num_patches=0, overlap=1), world_size=2)
    assert (default.num_patches, default.order) == (1, "frame")
    for name, (count, frames) in {"frame": (2, [1, 4]), "tile": (3, [5])}.items():
        settings = DecodeSettings(**main[name]["settings"])
        assert main[name]["settings"] == other[name]["settings"]
        assert settings == resolve_settings(latent, budget_cases()[name], world_size=2)
        assert (settings.num_patches, settings.patch_dim, settings.order) == (count, "w", name)
        with one_thread(), torch.no_grad():
            expected = tiled_decode(vae, latent, num_patches=count, overlap=1, order=name)
        assert main[name]["frames"] == frames and other[name]["frames"] == []
        assert torch.equal(main[name]["video"], expected)
        assert tuple(read_video(out / f"{name}.mp4").shape) == (5, 64, 768, 3)
