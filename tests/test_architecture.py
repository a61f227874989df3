"""The structure holds: no import cycle, one registry per closed list reaching every front end, one store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pixelwizard_core import download as dl
from pixelwizard_core.cli import build_parser
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.attention import ATTENTION_BACKENDS, AttentionBackend, attention
from pixelwizard_core.pipeline.presets import HR_PRESETS, HRPreset, parse_resolution
from pixelwizard_core.sampling import SOLVERS
from pixelwizard_core.sampling.solvers import EulerSolver

ROOT = Path(__file__).resolve().parents[1]


def _strongly_connected(graph) -> list[list[str]]:
    """Import cycles: strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_not_even_through_a_function_level_import():
    grimp = pytest.importorskip("grimp")  # installed with import-linter
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph("pixelwizard_core")  # counts imports inside functions too
    assert _strongly_connected(graph) == []
    graph.add_import(importer="pixelwizard_core.pipeline.memory", imported="pixelwizard_core.doctor")
    assert _strongly_connected(graph), "the cycle finder must find a cycle when there is one"


def _cli_choices(command: str, flag: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None) and command in a.choices)
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return list(action.choices) if action.choices else action.help


def _node_inputs(name: str) -> dict:
    from nodes import NODE_CLASS_MAPPINGS

    types = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


@pytest.fixture
def registered():
    """Register entries for the length of a test, then remove them."""
    added = []

    def add(registry, name, entry):
        registry.register(name, entry)
        added.append((registry, name))

    yield add
    for registry, name in reversed(added):
        registry.unregister(name)


def test_a_new_attention_backend_appears_everywhere_and_runs(registered):
    calls = []

    def doubled_sdpa(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    registered(ATTENTION_BACKENDS, "mine", AttentionBackend(doubled_sdpa, lambda device: None))
    assert "mine" in _cli_choices("generate", "--attention")
    assert "mine" in _node_inputs("PixelWizardWanLoader")["attention"][0]
    assert "mine" in _node_inputs("PixelWizardCheckpointLoader")["attention"][0]
    from pixelwizard_core.doctor import check_attention

    assert any(c.name == "mine (cpu)" and c.ok for c in check_attention())
    q = torch.randn(1, 8, 2, 16)
    assert torch.allclose(attention(q, q, q, backend="mine"), attention(q, q, q, backend="sdpa"))
    assert calls  # the registered function ran
    with pytest.raises(ConfigError, match="mine"):
        attention(q, q, q, backend="theirs")  # the message lists the registered ones


def test_a_new_preset_is_one_entry_plus_its_checkpoint(registered):
    with pytest.raises(ConfigError, match="no PixelWizard HR checkpoint is made for 7680x4320"):
        dl.hr_key(7680, 4320)  # before: never another preset's file, silently
    registered(HR_PRESETS, "8k", HRPreset(7680, 4320, steps=4, shift=6.0, decode_patches=6, checkpoint="8k"))
    registered(dl.MODEL_FILES, "8k", dl.ModelFile("8k", "PixelWizard/8k/model.pt", dl.PIXELWIZARD_REPO, "8k/model.pt",
                                                  "diffusion_models", "hr_dit", None, "PixelWizard 8K HR model"))
    assert dl.hr_key(7680, 4320) == "8k" and dl.hr_key(2560, 1440) == "2k" and dl.hr_key(3000, 2000) == "4k"
    assert dl.role_candidates("hr", 7680, 4320) == ["8k"]
    assert [f.key for f in dl.select(["8k"])] == ["8k"] and "8k" in dl.select(["all"])[-1].key
    assert parse_resolution("8k")[:2] == (7680, 4320)
    assert "8k" in _cli_choices("generate", "--resolution")  # named in the help
    assert "8k" in _node_inputs("PixelWizardHRSampler")["preset"][0]
    from pixelwizard_core.doctor import preset_table

    assert {row["preset"] for row in preset_table()} == {"2k", "4k", "8k"}


def test_a_new_solver_reaches_the_cli_and_the_nodes(registered):
    class Midpoint(EulerSolver):
        name = "midpoint"

    registered(SOLVERS, "midpoint", Midpoint)
    assert "midpoint" in _cli_choices("generate", "--hr_solver")
    assert "midpoint" in _cli_choices("generate", "--sample_solver")
    assert "midpoint" in _node_inputs("PixelWizardHRSampler")["solver"][0]
    assert "shortcut" not in _cli_choices("generate", "--sample_solver")  # it needs a dt-conditioned model


def test_a_worker_asked_for_a_compiled_model_gets_one(tmp_path, monkeypatch):
    """The worker's Session and the nodes use one store keyed by every load option: a handle that asks for
    compile=True after an eager load of the same file gets a compiled model, not the cached eager one."""
    from pixelwizard_core.distributed.session import Session
    from pixelwizard_core.models.dit import WanDiT
    from pixelwizard_core.pipeline.handles import ModelHandle
    from tiny_models import state_dicts

    from safetensors.torch import save_file

    compiled = []
    monkeypatch.setattr(WanDiT, "compile_blocks", lambda self, **kw: compiled.append(id(self)))
    path = tmp_path / "dit.safetensors"
    save_file(state_dicts()["dit"], str(path))
    session = Session(device="cpu")
    eager = session.model(ModelHandle.for_file("lr", path, precision="fp32"))
    again = session.model(ModelHandle.for_file("lr", path, precision="fp32"))
    assert again is eager and compiled == []
    faster = session.model(ModelHandle.for_file("lr", path, precision="fp32", compile=True))
    assert faster is not eager and compiled == [id(faster)]
    assert session.loaded == ["lr", "lr"]


def test_file_identity_tells_same_named_checkpoints_apart(tmp_path):
    from pixelwizard_core.loading.identity import file_identity

    names = {}
    for preset in ("lr", "2k", "4k"):
        file = tmp_path / "diffusion_models" / "PixelWizard" / preset / "model.pt"
        file.parent.mkdir(parents=True)
        file.write_bytes(bytes(1000))  # same size, same content: only the folder differs
        names[preset] = file_identity(file)
    assert len({str(i) for i in names.values()}) == 3
    assert names["2k"].name == "diffusion_models/PixelWizard/2k/model.pt"
    replaced = tmp_path / "diffusion_models" / "PixelWizard" / "2k" / "model.pt"
    replaced.write_bytes(bytes(999) + b"\x01")  # same size, other weights
    assert file_identity(replaced).digest != names["2k"].digest


STAGE_METHODS = ("encode_text", "lr_anchor", "hr_latent", "decode_stream")


def _stage_implementations() -> list[type]:
    from pixelwizard_core.distributed.launch import TorchrunStages
    from pixelwizard_core.distributed.pool_stages import PoolStages
    from pixelwizard_core.pipeline.engine import LocalStages

    return [LocalStages, PoolStages, TorchrunStages]


@pytest.mark.parametrize("implementation", _stage_implementations(), ids=lambda cls: cls.__name__)
def test_every_stage_implementation_has_the_protocols_signatures(implementation):
    import inspect

    from pixelwizard_core.pipeline.engine import Stages

    for name in (*STAGE_METHODS, "share"):
        ours, declared = inspect.signature(getattr(implementation, name)), inspect.signature(getattr(Stages, name))
        assert list(ours.parameters) == list(declared.parameters), f"{implementation.__name__}.{name}"
        for parameter in declared.parameters.values():
            assert ours.parameters[parameter.name].default == parameter.default, f"{implementation.__name__}.{name}"
    assert hasattr(implementation, "is_main")


def test_the_nodes_never_branch_on_where_a_stage_runs():
    """Each node asks ``host.stages(pool)`` once: no ``pool is None`` test and no pool method in a node."""
    import ast

    for path in sorted((ROOT / "nodes").glob("*.py")):
        if path.name == "host.py":  # the one place that picks the implementation
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(side, ast.Name) and side.id == "pool"
                                                     for side in (node.left, *node.comparators)):
                pytest.fail(f"{path.name}:{node.lineno} branches on the pool")
            if isinstance(node, ast.Attribute) and node.attr == "acquire":
                pytest.fail(f"{path.name}:{node.lineno} calls the pool directly")


def test_local_stages_follow_the_step_control_and_record_the_model(tmp_path):
    """The one-process implementation: the caller's on_step sees every step and can stop the stage,
    and the anchor records its model's identity."""
    import contextlib

    from tiny_models import DIT

    from pixelwizard_core.models.dit import WanDiT
    from pixelwizard_core.pipeline.engine import LocalStages, StageControl
    from pixelwizard_core.pipeline.handles import ModelHandle
    from pixelwizard_core.pipeline.presets import StageSettings
    from pixelwizard_core.pipeline.text import TextConditioning

    torch.manual_seed(0)
    dit = WanDiT(DIT).eval()

    @contextlib.contextmanager
    def opener(handle, working_bytes):
        assert working_bytes > 0  # a DiT stage asks for room for its activations
        yield dit

    stages = LocalStages(opener)
    context = torch.randn(1, 8, DIT.text_dim)
    text = TextConditioning(context, context.clone(), "p", "n")
    settings = StageSettings(64, 32, 1, 3, 5.0, 5.0, "unipc")
    steps = []
    with torch.no_grad():
        anchor = stages.lr_anchor(ModelHandle.in_memory("lr"), text, settings, 1,
                                  StageControl(on_step=lambda done, total: steps.append((done, total))))
    assert steps == [(1, 3), (2, 3), (3, 3)] and anchor.model == "memory:lr"

    def stop(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        stages.lr_anchor(ModelHandle.in_memory("lr"), text, settings, 1, StageControl(on_step=stop))
