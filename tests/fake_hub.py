"""A fake Hugging Face Hub on 127.0.0.1 for the download tests (no internet).

It speaks the hub's file protocol: HEAD and GET on /<repo>/resolve/<revision>/<path>, with the
X-Repo-Commit and ETag (sha256) headers and HTTP range requests, and serves tiny random-weight files in
the published layouts. The hub client is pointed at it through HF_ENDPOINT.
"""

from __future__ import annotations

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes
from spm_support import train_umt5_like_spm
from tiny_models import _t5_hf_names, state_dicts

from pixelwizard_core import download as dl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _pickle_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def make_repo_files(workdir: Path) -> dict[tuple[str, str], bytes]:
    """(repo, path) -> content, for every non-official file of the table, as tiny random models."""
    states = state_dicts()
    t5 = {_t5_hf_names()[k]: v.half() for k, v in states["t5"].items()}
    spiece = train_umt5_like_spm(workdir).read_bytes()
    t5["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    lr = {f"model.{k}": v for k, v in states["dit"].items()}
    content = {
        "dit": save_bytes({f"model.diffusion_model.{k}": v.half() for k, v in states["dit"].items()}),
        "vae": save_bytes({k: v.half() for k, v in states["vae"].items()}),
        "t5_fp16": save_bytes(t5),
        "lr": _pickle_bytes({"generator": lr, "generator_ema": lr}),
        "2k": _pickle_bytes({"generator": {f"model.{k}": v for k, v in states["hr"].items()}}),
    }
    content["t5_fp8"], content["4k"] = content["t5_fp16"], content["2k"]
    return {(dl.FILES_BY_KEY[k].repo, dl.FILES_BY_KEY[k].path): v for k, v in content.items()}


class FakeHub:
    """State shared with the request handler: the files, a request log, and failure switches."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_after: int | None = None  # stop serving after this many body bytes (then go down)
        self.down = False  # drop every connection without an answer
        self.body_bytes = 0

    def lookup(self, url_path: str) -> bytes | None:
        parts = url_path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.files.get(("/".join(parts[:2]), "/".join(parts[4:])))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        def _headers(self, data: bytes, start: int) -> None:
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()

        def _answer(self, with_body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if hub.down:
                self.close_connection = True
                return
            data = hub.lookup(self.path)
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self._headers(data, start)
            if with_body:
                self._body(data[start:])

        def _body(self, body: bytes) -> None:
            if hub.cut_after is not None:
                body = body[:hub.cut_after]
                hub.down = True  # the "network" dies after this response
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()
            hub.body_bytes += len(body)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_GET(self) -> None:
            self._answer(with_body=True)

    return Handler


@pytest.fixture(scope="session")
def repo_files(tmp_path_factory) -> dict[tuple[str, str], bytes]:
    return make_repo_files(tmp_path_factory.mktemp("spm"))


@pytest.fixture
def hub(repo_files, monkeypatch, tmp_path):
    """A running fake hub with HF_ENDPOINT pointing at it and HF_HOME in the test's folder."""
    state = FakeHub(repo_files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield state
    server.shutdown()
    server.server_close()


