"""The ComfyUI nodes called directly (no ComfyUI needed) on tiny random models in a temporary models folder."""

from __future__ import annotations

import os

import pytest
import torch
from spm_support import train_umt5_like_spm
from tiny_models import state_dicts, write_comfy, write_pixelwizard

import nodes
from nodes import host
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.io.video import read_video, write_video
from pixelwizard_core.pipeline.store import SHARED_STORE, ModelStore
from pixelwizard_core.pipeline.presets import WAN_NEGATIVE_PROMPT

N = nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    states = state_dicts()
    spm = tmp_path_factory.mktemp("spm")
    comfy = write_comfy(root / "staging", states, train_umt5_like_spm(spm))
    for folder, key in (("diffusion_models", "dit"), ("vae", "vae"), ("text_encoders", "t5")):
        (root / folder).mkdir()
        comfy[key].rename(root / folder / comfy[key].name)
    write_pixelwizard(root / "diffusion_models" / "PixelWizard", states)
    return root


@pytest.fixture
def comfy_env(models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELWIZARD_MODELS", str(models_root))
    monkeypatch.setenv("PIXELWIZARD_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("PIXELWIZARD_INPUT", str(tmp_path / "input"))
    monkeypatch.setattr(host, "device", lambda: torch.device("cpu"))
    yield tmp_path
    SHARED_STORE.release()


def load_wan():
    return N["PixelWizardWanLoader"]().load("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors",
                                            "umt5_xxl_fp16.safetensors", "fp32", "fp32", "auto", "gpu")[0]


def checkpoint(stage: str):
    name = "PixelWizard/2k/model.pt" if stage == "hr" else "PixelWizard/lr/model.pt"
    return N["PixelWizardCheckpointLoader"]().load(name, stage, "fp32", "auto", "gpu")[0]


def sample_anchor(wan, text, seed=100, lr_model=None):
    return N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 5, 3, 5.0, 5.0, seed, "unipc", lr_model)


def test_every_node_is_declared_for_the_classic_api():
    assert set(N) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in N.items():
        assert node_id.startswith("PixelWizard") and nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("PixelWizard")
        assert cls.CATEGORY == "PixelWizard" and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
                assert all(t.startswith("PW_") for t in [spec[0]] if isinstance(t, str) and t.isupper() and t not in
                           ("INT", "FLOAT", "STRING", "BOOLEAN", "LATENT", "IMAGE", "VIDEO", "CONDITIONING"))


def test_loaders_are_lazy_and_check_the_stage(comfy_env, monkeypatch):
    monkeypatch.setattr(ModelStore, "_load", lambda *a: pytest.fail("a loader node loaded weights"))
    wan = load_wan()
    assert (wan.dit.role, wan.vae.role, wan.text.role) == ("lr", "vae", "text")
    assert checkpoint("hr").role == "hr"
    with pytest.raises(ConfigError, match="is 'hr_dit', but the lr stage needs 'dit'"):
        N["PixelWizardCheckpointLoader"]().load("PixelWizard/2k/model.pt", "lr", "fp32", "auto", "gpu")
    with pytest.raises(FileNotFoundError, match="not in the ComfyUI 'vae' folder"):
        N["PixelWizardWanLoader"]().load("wan2.2_ti2v_5B_fp16.safetensors", "missing.safetensors",
                                         "umt5_xxl_fp16.safetensors", "fp32", "fp32", "auto", "gpu")


def test_full_graph_text_anchor_save_load_hr_decode_to_video(comfy_env):
    wan = load_wan()
    text = N["PixelWizardTextEncode"]().encode(wan, "a red fox in snow", "")[0]
    assert text.negative_prompt == WAN_NEGATIVE_PROMPT and text.positive.shape == (1, 512, 32)
    anchor, latent = sample_anchor(wan, text, lr_model=checkpoint("lr"))
    assert latent["samples"].shape == (1, 48, 2, 4, 8)
    saved = N["PixelWizardAnchorSave"]().save(anchor, "picked")
    choice = saved["ui"]["text"][0]
    # listed without the file suffix (the frontend takes a value ending in .safetensors for a model file)
    assert choice == "output/picked_seed100" and choice in N["PixelWizardAnchorLoad"].INPUT_TYPES()["required"]["anchor"][0]
    loaded = N["PixelWizardAnchorLoad"]().load(choice)["result"][0]
    assert torch.equal(loaded.latent, anchor.latent) and loaded.seed == 100
    load = N["PixelWizardAnchorLoad"]
    assert load.VALIDATE_INPUTS(choice) is True and load.VALIDATE_INPUTS(choice + ".safetensors") is True  # older workflows
    assert "save one first" in load.VALIDATE_INPUTS("output/never_saved")
    assert "save one first" in load.VALIDATE_INPUTS("output/../output/picked_seed100")
    hr = N["PixelWizardHRSampler"]().sample(checkpoint("hr"), loaded, text, "custom", 256, 128, 2, 5.5, 5.0, 10000, "unipc")[0]
    assert hr["samples"].shape == (1, 48, 2, 8, 16)
    result = N["PixelWizardDecodeToVideo"]().decode(wan, hr, 2, "w", 1, "cosine", "pixelwizard/video", 24, 10)
    video_path = comfy_env / "output" / result["ui"]["text"][0]
    assert tuple(read_video(video_path).shape) == (5, 128, 256, 3)
    frames = N["PixelWizardTiledDecode"]().decode(wan, hr, 2, "w", 1, "cosine")[0]
    assert frames.shape == (5, 128, 256, 3) and 0 <= frames.min() and frames.max() <= 1
    # the streamed video holds exactly these frames: encoding them with the same writer gives the same video
    same = write_video(comfy_env / "same.mp4", [frames * 2 - 1], fps=24, crf=10)
    assert torch.equal(read_video(same), read_video(video_path))


def test_anchor_preview_from_latent_and_from_video(comfy_env):
    wan = load_wan()
    text = N["PixelWizardTextEncode"]().encode(wan, "a boat", "")[0]
    anchor, latent = sample_anchor(wan, text)
    preview = N["PixelWizardAnchorPreview"]().preview(wan, anchor)[0]
    assert preview.shape == (5, 64, 128, 3)
    again = N["PixelWizardAnchorFromLatent"]().convert(latent, "from a native sampler")[0]
    torch.testing.assert_close(again.latent, anchor.latent, rtol=1e-5, atol=1e-5)
    clip = torch.rand(7, 96, 160, 3)
    from_video = N["PixelWizardAnchorFromVideo"]().encode(wan, clip, 128, 64, "footage")[0]
    assert (from_video.frames, from_video.latent.shape) == (5, (1, 48, 2, 4, 8))


def test_native_conditioning_is_accepted(comfy_env, monkeypatch):
    wan = load_wan()
    monkeypatch.setattr(ModelStore, "_load", lambda *a: pytest.fail("text encoder loaded despite native conditioning"))
    pos, neg = torch.zeros(1, 600, 4096), torch.ones(1, 512, 4096)
    text = N["PixelWizardTextEncode"]().encode(wan, "", "", [[pos, {"pooled_output": None}]], [[neg, {}]])[0]
    assert text.positive.shape == (1, 512, 4096) and torch.equal(text.negative, neg)
    with pytest.raises(ConfigError, match="umT5-XXL"):
        N["PixelWizardTextEncode"]().encode(wan, "", "", [[torch.zeros(1, 77, 768), {}]], [[neg, {}]])


def test_cancel_stops_the_sampler_within_one_step(comfy_env, monkeypatch):
    wan = load_wan()
    text = N["PixelWizardTextEncode"]().encode(wan, "a boat", "")[0]
    steps_seen = []

    class Interrupted(Exception):
        pass

    def check():
        if len(steps_seen) == 2:
            raise Interrupted
        steps_seen.append(1)

    monkeypatch.setattr(host, "check_interrupt", check)
    calls = []
    original = SHARED_STORE.get

    def counting_get(handle, device, **options):
        model = original(handle, device, **options)
        if handle.role == "lr" and not hasattr(model, "_counted"):
            model.register_forward_hook(lambda *a: calls.append(1))
            model._counted = True
        return model

    monkeypatch.setattr(SHARED_STORE, "get", counting_get)
    with pytest.raises(Interrupted):
        N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 5, 10, 5.0, 5.0, 1, "unipc")
    assert len(calls) == 3  # steps 1 and 2 ran, the check after step 3 stopped it: never all 10 steps


def test_bad_settings_are_refused_with_what_to_change(comfy_env):
    wan = load_wan()
    text = N["PixelWizardTextEncode"]().encode(wan, "a boat", "")[0]
    with pytest.raises(ConfigError, match="4k\\+1"):
        N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 6, 3, 5.0, 5.0, 1, "unipc")
    anchor, _ = sample_anchor(wan, text)
    with pytest.raises(ConfigError, match="LR checkpoint"):
        N["PixelWizardHRSampler"]().sample(checkpoint("lr"), anchor, text, "2k", 0, 0, 4, 5.5, 5.0, 1, "unipc")
    with pytest.raises(ConfigError, match="multiple of 32"):
        N["PixelWizardHRSampler"]().sample(checkpoint("hr"), anchor, text, "custom", 250, 128, 2, 5.5, 5.0, 1, "unipc")


def test_samplers_send_live_previews_of_the_clean_latent(comfy_env, monkeypatch):
    seen = []

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            seen.append((fmt, tuple(x0.shape)))
            return (fmt, "image", 512)

    monkeypatch.setattr(host, "_latent_previewer", lambda: Previewer())
    wan = load_wan()
    text = N["PixelWizardTextEncode"]().encode(wan, "a boat", "")[0]
    anchor, _ = sample_anchor(wan, text)
    assert seen == [("JPEG", (1, 48, 2, 4, 8))] * 3  # one preview per step, of the whole latent
    seen.clear()
    N["PixelWizardHRSampler"]().sample(checkpoint("hr"), anchor, text, "custom", 256, 128, 2, 5.5, 5.0, 1, "unipc")
    assert seen == [("JPEG", (1, 48, 2, 8, 16))] * 2
    # without a previewer (outside ComfyUI, or previews off) nothing is computed for them
    assert host.progress("x", previews=False).preview is None


def test_multi_gpu_node_checks_its_settings_without_starting_workers(monkeypatch):
    from pixelwizard_core.distributed import pool as pool_module

    monkeypatch.setattr(pool_module.WorkerPool, "start", lambda self: pytest.fail("a worker started"))
    node = N["PixelWizardMultiGPU"]()
    spec = node.configure("2", 2, True, False, "gloo", 5)[0]
    assert (spec.devices, spec.ulysses, spec.dit_fsdp, spec.timeout) == (2, 2, True, 300.0)
    assert node.configure("0, 2", 1, False, False, "gloo")[0].devices == (0, 2)
    with pytest.raises(ConfigError, match="number of GPUs"):
        node.configure("two", 1, False, False, "gloo")
    with pytest.raises(ConfigError, match="use ulysses 3"):
        node.configure("3", 2, False, False, "gloo")


def test_full_graph_on_a_two_process_pool_equals_the_local_graph(comfy_env):
    """Multi-GPU node -> text -> anchor -> HR -> decode on 2 gloo workers (FSDP of DiT and T5, tiles split; the
    tiny DiT has 1 head, so no Ulysses: tests/test_pool.py covers it), against the same nodes without a pool;
    then the shutdown node leaves no worker."""
    from pixelwizard_core.distributed.pool import acquire

    wan, hr_model = load_wan(), checkpoint("hr")
    spec = N["PixelWizardMultiGPU"]().configure("2", 1, True, True, "gloo", 2)[0]
    results = {}
    for name, pool in (("local", None), ("pool", spec)):
        text = N["PixelWizardTextEncode"]().encode(wan, "a red fox", "", None, None, pool)[0]
        anchor, _ = N["PixelWizardAnchorSampler"]().sample(wan, text, 128, 64, 5, 3, 5.0, 5.0, 7, "unipc", None, pool)
        hr = N["PixelWizardHRSampler"]().sample(hr_model, anchor, text, "custom", 256, 128, 2, 5.5, 5.0, 9, "unipc",
                                                pool)[0]
        frames = N["PixelWizardTiledDecode"]().decode(wan, hr, 2, "w", 1, "cosine", pool)[0]
        results[name] = (text.positive, anchor.latent, hr["samples"], frames)
    for ours, theirs in zip(results["pool"], results["local"]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max() + 1e-6
    workers = acquire(2, ulysses=1, dit_fsdp=True, t5_fsdp=True, backend="gloo", timeout=120.0)
    pids = workers.pids
    assert len(pids) == 2 and workers.alive  # the nodes shared one running pool
    N["PixelWizardPoolShutdown"]().shutdown(spec, after=results["pool"][3])
    assert not workers.alive and not any(os.path.exists(f"/proc/{pid}") and _running(pid) for pid in pids)


def _running(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_loader_options_reach_the_model_compile_and_block_swap(comfy_env, monkeypatch):
    from pixelwizard_core.models.dit import WanDiT

    compiled = []
    monkeypatch.setattr(WanDiT, "compile_blocks", lambda self, **kw: compiled.append(type(self).__name__))
    loader = N["PixelWizardCheckpointLoader"]()
    hr = loader.load("PixelWizard/2k/model.pt", "hr", "fp32", "auto", "gpu", 0, True)[0]
    assert hr.compile and SHARED_STORE.get(hr, torch.device("cpu")) is not None and compiled == ["WanHRDiT"]
    with pytest.raises(ConfigError, match="torch.compile and block swap"):
        loader.load("PixelWizard/2k/model.pt", "hr", "fp32", "auto", "block_swap", 2, True)
    swapped = loader.load("PixelWizard/2k/model.pt", "hr", "fp32", "auto", "block_swap", 2)[0]
    assert swapped.blocks_to_swap == 2
    with pytest.raises(ConfigError, match="transformer blocks"):
        loader.load("PixelWizard/2k/model.pt", "hr", "fp32", "auto", "block_swap", 7)
