"""LoRAs: every key format on a tiny DiT, the merge formula, bit-exact restore, chains, fp8 runtime deltas,
strength changes without reloading the base, the node, and the refusals."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pixelwizard_core.errors import ConfigError, WeightFormatError
from pixelwizard_core.loading.lora import alias_table, base_parameter_names, lora_ref, plan_lora
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.layers import store_linears_in_fp8
from pixelwizard_core.models.lora import has_delta
from pixelwizard_core.pipeline.handles import ModelHandle
from pixelwizard_core.pipeline.lora import applied_loras, remove_loras, sync_loras
from pixelwizard_core.pipeline.store import ModelStore

CPU = torch.device("cpu")
DIM, FFN, RANK = 64, 128, 4


def tiny_dit(dtype: torch.dtype = torch.float32) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(DiTConfig.tiny()).to(dtype).eval()


def factors(out_dim: int, in_dim: int, seed: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_dim, generator=g) * 0.1, torch.randn(out_dim, rank, generator=g) * 0.1


def write(path, tensors: dict) -> str:
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return str(path)


def reference(model: WanDiT, param: str, down, up, strength: float, alpha: float | None) -> torch.Tensor:
    """W + strength * alpha/rank * up @ down, by hand (alpha defaults to the rank), rounded once."""
    weight = dict(model.named_parameters())[param]
    scale = strength * ((alpha if alpha is not None else down.shape[0]) / down.shape[0])
    return (weight.detach().float() + scale * (up.float() @ down.float()).reshape(weight.shape)).to(weight.dtype)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert value.dtype == saved[name].dtype
        assert torch.equal(value.view(torch.uint8), saved[name].view(torch.uint8)), name


# (format, key of blocks.0.self_attn.q's down / up / alpha, our parameter); alpha None: the format has none
FORMATS = {
    "comfy": ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
              "diffusion_model.blocks.0.self_attn.q.alpha", "blocks.0.self_attn.q.weight"),
    "comfy_model_prefix": ("model.diffusion_model.blocks.1.ffn.2.lora_down.weight",
                           "model.diffusion_model.blocks.1.ffn.2.lora_up.weight", "model.diffusion_model.blocks.1.ffn.2.alpha",
                           "blocks.1.ffn.2.weight"),
    "kohya": ("lora_unet_blocks_0_cross_attn_k.lora_down.weight", "lora_unet_blocks_0_cross_attn_k.lora_up.weight",
              "lora_unet_blocks_0_cross_attn_k.alpha", "blocks.0.cross_attn.k.weight"),
    "fun": ("lora_unet__blocks_1_self_attn_o.lora_down.weight", "lora_unet__blocks_1_self_attn_o.lora_up.weight",
            "lora_unet__blocks_1_self_attn_o.alpha", "blocks.1.self_attn.o.weight"),
    "lycoris": ("lycoris_blocks_0_ffn_0.lora_down.weight", "lycoris_blocks_0_ffn_0.lora_up.weight",
                "lycoris_blocks_0_ffn_0.alpha", "blocks.0.ffn.0.weight"),
    "peft": ("base_model.model.blocks.0.self_attn.v.lora_A.weight", "base_model.model.blocks.0.self_attn.v.lora_B.weight",
             None, "blocks.0.self_attn.v.weight"),
    "peft_default_bare": ("blocks.1.cross_attn.q.lora_A.default.weight", "blocks.1.cross_attn.q.lora_B.default.weight",
                          None, "blocks.1.cross_attn.q.weight"),
    "diffusers_attn1": ("transformer.blocks.0.attn1.to_k.lora_A.weight", "transformer.blocks.0.attn1.to_k.lora_B.weight",
                        None, "blocks.0.self_attn.k.weight"),
    "diffusers_attn2_out": ("transformer.blocks.1.attn2.to_out.0.lora_A.weight",
                            "transformer.blocks.1.attn2.to_out.0.lora_B.weight", None, "blocks.1.cross_attn.o.weight"),
    "diffusers_ffn": ("transformer.blocks.0.ffn.net.0.proj.lora_down.weight", "transformer.blocks.0.ffn.net.0.proj.lora_up.weight",
                      "transformer.blocks.0.ffn.net.0.proj.alpha", "blocks.0.ffn.0.weight"),
    "diffusers_embedder": ("transformer.condition_embedder.time_embedder.linear_1.lora_A.weight",
                           "transformer.condition_embedder.time_embedder.linear_1.lora_B.weight", None,
                           "time_embedding.0.weight"),
    "diffusers_kohya": ("lora_transformer_blocks_0_attn2_to_v.lora_down.weight",
                        "lora_transformer_blocks_0_attn2_to_v.lora_up.weight", "lora_transformer_blocks_0_attn2_to_v.alpha",
                        "blocks.0.cross_attn.v.weight"),
    "diffusers_proj_out": ("transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight", None, "head.head.weight"),
    "mochi_no_weight": ("diffusion_model.text_embedding.2.lora_A", "diffusion_model.text_embedding.2.lora_B", None,
                        "text_embedding.2.weight"),
    "lora_dot_up": ("diffusion_model.time_projection.1.lora.down.weight", "diffusion_model.time_projection.1.lora.up.weight",
                    None, "time_projection.1.weight"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_key_format_merges_the_reference_formula(tmp_path, fmt, dtype):
    down_key, up_key, alpha_key, param = FORMATS[fmt]
    model = tiny_dit(dtype)
    weight = dict(model.named_parameters())[param]
    down, up = factors(weight.shape[0], weight.shape[1], seed=1)
    tensors = {down_key: down.to(torch.bfloat16), up_key: up.to(torch.bfloat16)}  # files store bf16 / fp16
    alpha = 2.0 if alpha_key else None
    if alpha_key:
        tensors[alpha_key] = torch.tensor(alpha)
    lora = lora_ref(write(tmp_path / f"{fmt}.safetensors", tensors), 0.7)
    expected = reference(model, param, tensors[down_key], tensors[up_key], 0.7, alpha)
    before = snapshot(model)
    sync_loras(model, (lora,), CPU)
    after = model.state_dict()
    assert torch.equal(after[param], expected)
    assert not torch.equal(after[param], before[param])
    assert all(torch.equal(after[k], before[k]) for k in before if k != param)  # nothing else touched
    remove_loras(model)
    assert_bit_equal(model, before)


def test_conv_patch_embedding_and_full_deltas(tmp_path):
    model = tiny_dit()
    params = dict(model.named_parameters())
    conv = params["patch_embedding.weight"]  # [64, 8, 1, 2, 2]
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(RANK, 8, 1, 2, 2, generator=g), torch.randn(DIM, RANK, 1, 1, 1, generator=g)
    diff, diff_b = torch.randn(DIM, DIM, generator=g), torch.randn(DIM, generator=g)
    modulation = torch.randn(1, 6, DIM, generator=g)
    path = write(tmp_path / "full.safetensors", {
        "diffusion_model.patch_embedding.lora_down.weight": down, "diffusion_model.patch_embedding.lora_up.weight": up,
        "diffusion_model.blocks.0.cross_attn.o.diff": diff, "diffusion_model.blocks.0.cross_attn.o.diff_b": diff_b,
        "diffusion_model.blocks.1.diff_m": modulation, "diffusion_model.head.modulation.diff": modulation[:, :2],
    })
    before = snapshot(model)
    sync_loras(model, (lora_ref(path, 0.5),), CPU)
    state = model.state_dict()
    conv_update = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(conv.shape)
    assert torch.equal(state["patch_embedding.weight"], before["patch_embedding.weight"] + conv_update)
    assert torch.equal(state["blocks.0.cross_attn.o.weight"], before["blocks.0.cross_attn.o.weight"] + 0.5 * diff)
    assert torch.equal(state["blocks.0.cross_attn.o.bias"], before["blocks.0.cross_attn.o.bias"] + 0.5 * diff_b)
    assert torch.equal(state["blocks.1.modulation"], before["blocks.1.modulation"] + 0.5 * modulation)
    assert torch.equal(state["head.modulation"], before["head.modulation"] + 0.5 * modulation[:, :2])
    remove_loras(model)
    assert_bit_equal(model, before)


def forward(model: WanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 1, 4, 4, generator=g)
    context = torch.randn(1, 16, 24, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), context)


def two_loras(tmp_path, model: WanDiT) -> tuple[str, str]:
    """Two files that both adapt blocks.0.self_attn.q (one comfy, one diffusers) plus one module each."""
    q = dict(model.named_parameters())["blocks.0.self_attn.q.weight"]
    d1, u1 = factors(q.shape[0], q.shape[1], seed=11)
    d2, u2 = factors(q.shape[0], q.shape[1], seed=12, rank=8)
    f1, f2 = factors(FFN, DIM, seed=13)
    first = write(tmp_path / "a.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": d1, "diffusion_model.blocks.0.self_attn.q.lora_up.weight": u1,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": f1, "diffusion_model.blocks.1.ffn.0.lora_up.weight": f2})
    second = write(tmp_path / "b.safetensors", {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": d2, "transformer.blocks.0.attn1.to_q.lora_B.weight": u2})
    return first, second


def test_a_chain_of_two_loras_adds_both_updates_and_restores(tmp_path):
    model = tiny_dit()
    first, second = two_loras(tmp_path, model)
    from safetensors.torch import load_file
    a, b = load_file(first), load_file(second)
    before, base_out = snapshot(model), forward(model)
    sync_loras(model, (lora_ref(first, 0.8), lora_ref(second, -0.5)), CPU)
    q = before["blocks.0.self_attn.q.weight"]
    expected = q + 0.8 * (8.0 / RANK) * (a["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
                                         @ a["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]) \
        - 0.5 * (b["transformer.blocks.0.attn1.to_q.lora_B.weight"] @ b["transformer.blocks.0.attn1.to_q.lora_A.weight"])
    torch.testing.assert_close(model.state_dict()["blocks.0.self_attn.q.weight"], expected, rtol=0, atol=1e-6)
    ffn = before["blocks.1.ffn.0.weight"] + 0.8 * (a["diffusion_model.blocks.1.ffn.0.lora_up.weight"]
                                                   @ a["diffusion_model.blocks.1.ffn.0.lora_down.weight"])
    assert torch.equal(model.state_dict()["blocks.1.ffn.0.weight"], ffn)
    assert not torch.equal(forward(model), base_out)
    remove_loras(model)
    assert_bit_equal(model, before)
    assert torch.equal(forward(model), base_out)


def test_strength_zero_is_the_base_bit_for_bit(tmp_path):
    model = tiny_dit(torch.bfloat16)
    first, _ = two_loras(tmp_path, model)
    before, base_out = snapshot(model), forward(model)
    sync_loras(model, (lora_ref(first, 0.0),), CPU)
    assert applied_loras(model) == ()
    assert_bit_equal(model, before)
    assert torch.equal(forward(model), base_out)


def test_fp8_weights_get_a_runtime_delta_and_come_back_exactly(tmp_path):
    model = tiny_dit(torch.bfloat16)
    store_linears_in_fp8(model.blocks)
    first, second = two_loras(tmp_path, model)
    before, base_out = snapshot(model), forward(model)
    layer = model.blocks[0].self_attn.q
    x = torch.randn(3, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = layer(x)
    sync_loras(model, (lora_ref(first, 0.8), lora_ref(second, -0.5)), CPU)
    assert has_delta(layer) and has_delta(model.blocks[1].ffn[0])
    assert_bit_equal(model.blocks, {k[len("blocks."):]: v for k, v in before.items() if k.startswith("blocks.")})
    from safetensors.torch import load_file
    a, b = load_file(first), load_file(second)
    update = 0.8 * 2.0 * (a["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
                          @ a["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]) \
        - 0.5 * (b["transformer.blocks.0.attn1.to_q.lora_B.weight"] @ b["transformer.blocks.0.attn1.to_q.lora_A.weight"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), plain.float() + x.float() @ update.T, atol=0.02, rtol=0.02)
    assert not torch.equal(forward(model), base_out)
    remove_loras(model)
    assert not has_delta(layer) and type(layer).__name__ == "Linear" and "lora_deltas" not in model._modules
    assert_bit_equal(model, before)
    assert torch.equal(forward(model), base_out)


def test_bias_delta_on_an_fp8_linear_is_merged(tmp_path):
    model = tiny_dit(torch.bfloat16)
    store_linears_in_fp8(model.blocks)
    path = write(tmp_path / "b.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(DIM)})
    sync_loras(model, (lora_ref(path, 1.0),), CPU)
    assert not has_delta(model.blocks[0].self_attn.q)  # the bias is bf16: merged
    remove_loras(model)


class CountingLoader:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, handle, device):
        self.calls += 1
        return tiny_dit()


def test_store_merges_per_use_and_never_reloads_the_base(tmp_path):
    model_file = tmp_path / "dit.safetensors"
    model_file.write_bytes(b"stand-in: the counting loader builds the model")
    base = ModelHandle("lr", str(model_file), precision="fp32")
    first, second = two_loras(tmp_path, tiny_dit())
    store, loader = ModelStore(), CountingLoader()

    def run(handle):
        with store.use(handle, CPU, home=CPU, loader=loader) as model:
            return forward(model), applied_loras(model)

    plain, none = run(base)
    weak, applied = run(base.with_lora(lora_ref(first, 0.3)))
    strong, _ = run(base.with_lora(lora_ref(first, 1.0)))
    again, _ = run(base.with_lora(lora_ref(first, 0.3)))
    chained, chain = run(base.with_lora(lora_ref(first, 1.0)).with_lora(lora_ref(second, 1.0)))
    back, after = run(base)
    assert loader.calls == 1  # one base load for six uses with four LoRA sets
    assert none == () and [r.strength for r in applied] == [0.3] and len(chain) == 2 and after == ()
    assert torch.equal(weak, again) and torch.equal(back, plain)
    assert not torch.equal(weak, strong) and not torch.equal(strong, chained) and not torch.equal(weak, plain)


def test_a_set_used_again_is_not_merged_again(tmp_path, monkeypatch):
    model = tiny_dit()
    first, _ = two_loras(tmp_path, model)
    lora = lora_ref(first, 1.0)
    sync_loras(model, (lora,), CPU)
    import pixelwizard_core.pipeline.lora as applying
    monkeypatch.setattr(applying, "_apply", lambda *a: pytest.fail("the same LoRA set was merged again"))
    sync_loras(model, (lora,), CPU)
    sync_loras(model, (tuple(lora),), CPU)  # as a worker receives it: plain tuples


def test_handles_carry_loras_but_the_store_key_does_not(tmp_path):
    first, _ = two_loras(tmp_path, tiny_dit())
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes(b"x")
    base = ModelHandle("lr", str(model_file))
    with_lora = base.with_lora(lora_ref(first, 0.5))
    from pixelwizard_core.pipeline.store import StoreKey
    assert with_lora != base and StoreKey.of(with_lora) == StoreKey.of(base)
    sent = pickle.loads(pickle.dumps(with_lora))
    assert sent == with_lora and hash(sent) == hash(with_lora)
    assert all(type(lora) is tuple for lora in sent.loras)  # the pool's unpickler admits plain tuples only
    with pytest.raises(ConfigError, match="DiTs"):
        ModelHandle("vae", str(model_file), loras=(lora_ref(first),))


# --- refusals ---------------------------------------------------------------------------------------

def lora_pair(prefix: str, out_dim: int = DIM, in_dim: int = DIM) -> dict:
    down, up = factors(out_dim, in_dim, seed=2)
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}


def test_unknown_keys_are_named_with_the_expected_format(tmp_path):
    tensors = {**lora_pair("diffusion_model.blocks.0.self_attn.q"), **lora_pair("diffusion_model.blocks.0.self_attn.zz"),
               "diffusion_model.blocks.0.self_attn.q.extra": torch.zeros(1)}
    with pytest.raises(WeightFormatError) as error:
        lora_ref(write(tmp_path / "x.safetensors", tensors))
    message = str(error.value)
    assert "3 of its 5 keys" in message and "blocks.0.self_attn.zz.lora_down.weight" in message
    assert "Expected a LoRA for the Wan2.2-TI2V-5B DiT" in message and "not a Wan2.2-5B LoRA" not in message


def test_a_file_for_another_model_is_not_a_wan_lora(tmp_path):
    sd = {**lora_pair("lora_unet_down_blocks_0_attentions_0_proj_in"), **lora_pair("lora_te_text_model_encoder_layers_0_mlp_fc1")}
    with pytest.raises(WeightFormatError, match="is not a Wan2.2-5B LoRA"):
        lora_ref(write(tmp_path / "sdxl.safetensors", sd))


def test_a_14b_lora_is_refused_by_its_blocks_or_its_width(tmp_path):
    deep = {**lora_pair("diffusion_model.blocks.0.self_attn.q"), **lora_pair("diffusion_model.blocks.39.self_attn.q")}
    with pytest.raises(WeightFormatError, match="block 39.*40"):
        lora_ref(write(tmp_path / "deep.safetensors", deep))
    model = tiny_dit()
    before = snapshot(model)
    wide = lora_ref(write(tmp_path / "wide.safetensors", {**lora_pair("diffusion_model.blocks.0.self_attn.k"),
                                                          **lora_pair("diffusion_model.blocks.1.self_attn.q", 80, 80)}))
    with pytest.raises(WeightFormatError, match=r"blocks.1.self_attn.q.weight is \[64, 64\].*rank-4 update of shape \[80, 80\]"):
        sync_loras(model, (wide,), CPU)
    assert applied_loras(model) == ()
    assert_bit_equal(model, before)


def test_other_adapters_incomplete_pairs_and_other_containers_are_refused(tmp_path):
    loha = {"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(2, 2), "lora_unet_blocks_0_self_attn_q.alpha": torch.ones(())}
    with pytest.raises(WeightFormatError, match="LoHa"):
        lora_ref(write(tmp_path / "loha.safetensors", loha))
    half = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, DIM)}
    with pytest.raises(WeightFormatError, match="no matching up"):
        lora_ref(write(tmp_path / "half.safetensors", half))
    pickled = tmp_path / "lora.pt"
    torch.save(lora_pair("diffusion_model.blocks.0.self_attn.q"), pickled)
    with pytest.raises(WeightFormatError, match="not a safetensors file"):
        lora_ref(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora_ref(tmp_path / "missing.safetensors")


def test_fsdp_sharded_models_refuse_loras(tmp_path):
    model = tiny_dit()
    first, _ = two_loras(tmp_path, model)
    with pytest.raises(ConfigError, match="FSDP"):
        sync_loras(model, (lora_ref(first),), CPU, sharded=True)


def test_every_spelling_names_one_module_of_the_real_dit():
    names = base_parameter_names()
    table = alias_table(names)
    assert len({t.name for t in table.values()}) == len({n for n in names if not n.endswith(".bias")})
    assert table["blocks.29.attn1.to_out.0"].name == "blocks.29.self_attn.o"
    assert table["blocks_3_attn2_to_out_0"].name == "blocks.3.cross_attn.o"
    plan = plan_lora(["lora_unet_blocks_2_self_attn_q.lora_down.weight", "lora_unet_blocks_2_self_attn_q.lora_up.weight"],
                     names, "x")
    assert list(plan) == ["blocks.2.self_attn.q.weight"]


# --- the node ---------------------------------------------------------------------------------------

def test_node_chains_loras_onto_wan_and_stage_handles(tmp_path, monkeypatch):
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
    from nodes.types import WanModels

    (tmp_path / "loras").mkdir()
    first, second = two_loras(tmp_path / "loras", tiny_dit())
    monkeypatch.setenv("PIXELWIZARD_MODELS", str(tmp_path))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    node = NODE_CLASS_MAPPINGS["PixelWizardLoRA"]()
    assert NODE_DISPLAY_NAME_MAPPINGS["PixelWizardLoRA"] == "PixelWizard LoRA"
    assert host.model_files("loras") == ["a.safetensors", "b.safetensors"]
    wan = WanModels(dit=ModelHandle("lr", str(weights)), vae=ModelHandle("vae", str(weights)),
                    text=ModelHandle("text", str(weights)))
    hr = ModelHandle("hr", str(weights))
    wan1, hr1 = node.apply("a.safetensors", 0.8, 0.0, wan=wan, model=hr)
    wan2, hr2 = node.apply("b.safetensors", 1.0, 0.4, wan=wan1, model=hr1)
    assert [(lora.name, lora.strength) for lora in wan2.dit.loras] == [("a.safetensors", 0.8), ("b.safetensors", 1.0)]
    assert hr1 == hr and [lora[1] for lora in hr2.loras] == [0.4]  # HR only with its own, non-zero strength
    assert wan2.vae == wan.vae and wan2.text == wan.text
    with pytest.raises(ConfigError, match="connect"):
        node.apply("a.safetensors", 1.0, 0.0)
    write(tmp_path / "loras" / "sd.safetensors", lora_pair("lora_te_text_model_encoder_layers_0_mlp_fc1"))
    with pytest.raises(WeightFormatError, match="not a Wan2.2-5B LoRA"):
        node.apply("sd.safetensors", 1.0, 0.0, wan=wan)


def test_handle_replace_keeps_the_lease(tmp_path):
    first, _ = two_loras(tmp_path, tiny_dit())
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes(b"x")
    leased = dataclasses.replace(ModelHandle("lr", str(model_file)), owner=object())
    assert leased.with_lora(lora_ref(first)).owner is leased.owner


def test_a_handle_with_loras_passes_the_worker_pools_transport(tmp_path):
    from multiprocessing import Pipe

    from pixelwizard_core.distributed.transport import receive, send

    first, _ = two_loras(tmp_path, tiny_dit())
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes(b"x")
    handle = ModelHandle("hr", str(model_file)).with_lora(lora_ref(first, 0.25))
    ours, theirs = Pipe()
    send(ours, {"handle": handle}, tmp_path)
    assert receive(theirs)["handle"] == handle


def test_command_line_lora_arguments_and_the_models_of_a_run(tmp_path):
    from pixelwizard_core.loading.lora import parse_lora_arg
    from pixelwizard_core.pipeline.models import ModelFiles, Models

    (tmp_path / "loras").mkdir()
    first, _ = two_loras(tmp_path / "loras", tiny_dit())
    assert parse_lora_arg(f"{first}:0.5").strength == 0.5
    assert parse_lora_arg(first) == lora_ref(first, 1.0)
    assert parse_lora_arg("a.safetensors:-1", [tmp_path / "loras"]).path == first
    with pytest.raises(ConfigError, match="finite"):
        parse_lora_arg(f"{first}:nan")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_lora_arg("missing.safetensors:0.5", [tmp_path / "loras"])
    model = tiny_dit()
    before = snapshot(model)
    models = Models(ModelFiles(), prebuilt={"lr": model}, loras={"lr": (parse_lora_arg(f"{first}:0.5"),)})
    assert models.handle("lr").loras == (lora_ref(first, 0.5),) and " + LoRA " in models.handle("lr").identity
    with models.use("lr") as used:
        assert [lora.strength for lora in applied_loras(used)] == [0.5]
    models.loras = {}
    with models.use("lr") as used:
        assert applied_loras(used) == ()
    assert_bit_equal(model, before)


@pytest.mark.slow  # dynamo's first compile takes seconds
def test_compiled_fp8_layers_see_the_runtime_delta_come_and_go():
    from pixelwizard_core.models.layers import Linear
    from pixelwizard_core.models.lora import LowRankDelta, attach_delta, detach_delta

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = Linear(DIM, DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) * 2

    torch.manual_seed(0)
    block = Block().to(torch.bfloat16)
    store_linears_in_fp8(block)
    down, up = factors(DIM, DIM, seed=4)
    x = torch.randn(3, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        base_out = block(x)
        attach_delta(block.q, LowRankDelta(down, up, None, torch.bfloat16))
        eager_with = block(x)
        detach_delta(block.q)
        block.compile(backend="eager")  # dynamo's guards without a C++ toolchain
        assert torch.equal(block(x), base_out)
        attach_delta(block.q, LowRankDelta(down, up, None, torch.bfloat16))
        assert torch.equal(block(x), eager_with)  # a forward hook added after compiling would be skipped here
        detach_delta(block.q)
        assert torch.equal(block(x), base_out)


def test_loras_under_block_swap_give_the_unswapped_output(tmp_path):
    def fp8_dit(handle, device):
        model = tiny_dit(torch.bfloat16)
        store_linears_in_fp8(model.blocks)
        return model

    model_file = tmp_path / "dit.safetensors"
    model_file.write_bytes(b"x")
    first, second = two_loras(tmp_path, tiny_dit())
    loras = (lora_ref(first, 1.0), lora_ref(second, 0.5))
    outputs = []
    for swap in (0, 1):
        handle = ModelHandle("lr", str(model_file), memory_mode="block_swap" if swap else "gpu", swap_blocks=swap,
                             loras=loras)
        with store_use(handle, fp8_dit) as model:
            outputs.append(forward(model))
            assert len(model.lora_deltas) == 2  # blocks.0.self_attn.q (both LoRAs in one) and blocks.1.ffn.0
            assert all("lora" not in name for name, _ in model.blocks.named_buffers())  # block layouts unchanged
    assert torch.equal(outputs[0], outputs[1])


def store_use(handle, loader):
    return ModelStore().use(handle, CPU, home=CPU, loader=loader)
