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
