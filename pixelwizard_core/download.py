"""Fetch the weight files from the Hugging Face Hub into a models folder, resumably, and check each one.

:data:`MODEL_FILES` is the table of every file PixelWizard knows (name, hub repository and path, URL,
ComfyUI ``models`` sub-folder, loader component); :func:`groups` says which files serve which purpose.

A models folder is laid out as ComfyUI's: ``diffusion_models/``, ``text_encoders/``, ``vae/`` (the
official Wan-AI folder, which holds every component, sits at its top as ``Wan2.2-TI2V-5B/``). A flat
folder with the same file names is found too, so ``--dir`` and ``--models`` folders both work.

Downloads go through ``huggingface_hub`` (its endpoint, token, cache and offline settings: HF_ENDPOINT,
HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, read when a download starts). Each file is written
to ``<name>.<etag>.part`` next to its destination and renamed when complete, so an interrupted run
resumes where it stopped (HTTP range request) and a half-written file never carries the real name. A
file already present is checked, not fetched again; a file already in the Hugging Face cache is linked
(or copied) instead of downloaded. After each file its header is compared with what the loader expects
(keys and shapes, :func:`~pixelwizard_core.loading.inspect_weights`), and with the hub's sha256 when the
hub gives one. When the hub cannot be reached, one message lists every missing file with its URL and
the path to put it at.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import ConfigError, MissingFileError, PixelWizardError
from .loading import inspect_weights
from .pipeline.presets import HR_PRESETS, preset_for_size
from .registry import Registry

log = logging.getLogger("pixelwizard")

HF_URL = "https://huggingface.co"
COMFY_WAN22 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMFY_WAN21 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
OFFICIAL_REPO = "Wan-AI/Wan2.2-TI2V-5B"
PIXELWIZARD_REPO = "wxli318/PixelWizard"
OFFICIAL_FOLDER = "Wan2.2-TI2V-5B"
REVISION = "main"


class HubUnreachableError(MissingFileError):
    """The hub cannot be reached (offline mode, no network, closed port) and files are missing."""


class DownloadError(PixelWizardError):
    """A download stopped or a downloaded file is not what the loader expects."""


@dataclass(frozen=True)
class ModelFile:
    """One file PixelWizard can fetch, and where it goes in a models folder."""

    key: str  # short name used on the command line: "dit", "t5_fp8", "2k", "official:vae", ...
    name: str  # file name inside its sub-folder (official files: Wan2.2-TI2V-5B/<path in repo>)
    repo: str  # hub repository
    path: str  # path inside the repository
    folder: str  # ComfyUI models sub-folder; "" = the top of the models folder
    component: str | None  # loader component the file must hold (None: not a weight file by itself)
    gigabytes: float | None  # approximate size for planning messages (None: unknown until asked)
    description: str
    optional: bool = False  # a 404 on the hub skips it instead of failing
    check_with: str | None = None  # key of the file whose check covers this one (official shards)

    @property
    def url(self) -> str:
        """The file's address on huggingface.co (what a browser or the ComfyUI frontend downloads)."""
        return f"{HF_URL}/{self.repo}/resolve/{REVISION}/{self.path}"

    def url_at(self, endpoint: str) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{REVISION}/{self.path}"

    @property
    def relative(self) -> Path:
        """Where it goes inside a ComfyUI-style models folder."""
        return Path(self.folder, self.name) if self.folder else Path(self.name)

    def comfy_entry(self) -> dict[str, str]:
        """The workflow model link ComfyUI's frontend understands: ``{"name", "url", "directory"}``."""
        return {"name": self.name, "url": self.url, "directory": self.folder}


def _official(key: str, path: str, component: str | None, gigabytes: float | None, description: str,
              optional: bool = False, check_with: str | None = None) -> ModelFile:
    return ModelFile(f"official:{key}", f"{OFFICIAL_FOLDER}/{path}", OFFICIAL_REPO, path, "", component, gigabytes,
                     description, optional, check_with)


_SHARDS = tuple(f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))

_RELEASED_FILES: tuple[ModelFile, ...] = (
    ModelFile("dit", "wan2.2_ti2v_5B_fp16.safetensors", COMFY_WAN22,
              "split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors", "diffusion_models", "dit", 10.0,
              "Wan2.2-TI2V-5B DiT, fp16 (Comfy-Org)"),
    ModelFile("vae", "wan2.2_vae.safetensors", COMFY_WAN22, "split_files/vae/wan2.2_vae.safetensors", "vae", "vae",
              1.4, "Wan2.2 VAE, fp16 (Comfy-Org)"),
    ModelFile("t5_fp16", "umt5_xxl_fp16.safetensors", COMFY_WAN21,
              "split_files/text_encoders/umt5_xxl_fp16.safetensors", "text_encoders", "t5", 11.4,
              "umT5-XXL text encoder with its tokenizer, fp16 (Comfy-Org)"),
    ModelFile("t5_fp8", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", COMFY_WAN21,
              "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders", "t5", 6.7,
              "umT5-XXL text encoder with its tokenizer, fp8 scaled (Comfy-Org; 4.7 GB smaller)"),
    ModelFile("lr", "PixelWizard/lr/model.pt", PIXELWIZARD_REPO, "lr/model.pt", "diffusion_models", "dit", None,
              "PixelWizard LR anchor model (lr/model.pt)"),
    ModelFile("2k", "PixelWizard/2k/model.pt", PIXELWIZARD_REPO, "2k/model.pt", "diffusion_models", "hr_dit", None,
              "PixelWizard 2K HR model (2k/model.pt)"),
    ModelFile("4k", "PixelWizard/4k/model.pt", PIXELWIZARD_REPO, "4k/model.pt", "diffusion_models", "hr_dit", None,
              "PixelWizard 4K HR model (4k/model.pt)"),
    *(_official(f"dit{i + 1}", shard, None, 6.7, f"official DiT shard {i + 1} of 3 (fp32)", check_with="official:dit")
      for i, shard in enumerate(_SHARDS)),
    _official("dit", "diffusion_pytorch_model.safetensors.index.json", "dit", 0.0, "official DiT shard index"),
    _official("config", "config.json", None, 0.0, "official DiT config (not needed by PixelWizard)", optional=True),
    _official("tokenizer", "google/umt5-xxl/tokenizer.json", None, 0.0, "umT5 tokenizer"),
    _official("spiece", "google/umt5-xxl/spiece.model", None, 0.0, "umT5 SentencePiece model", optional=True),
    _official("t5", "models_t5_umt5-xxl-enc-bf16.pth", "t5", 11.4, "official umT5-XXL encoder (bf16)"),
    _official("vae", "Wan2.2_VAE.pth", "vae", 2.8, "official Wan2.2 VAE (fp32)"),
)
# The registry of files, keyed by the short name; an HR preset names its checkpoint's key here
# (``pipeline.presets.HRPreset.checkpoint``), so a new preset is one entry there plus one here.
MODEL_FILES: Registry[ModelFile] = Registry("model file")
for _file in _RELEASED_FILES:
    MODEL_FILES.register(_file.key, _file)
FILES_BY_KEY = MODEL_FILES


def known_files() -> list[ModelFile]:
    """Every registered file, in table order."""
    return MODEL_FILES.values()


def file_named(name: str) -> ModelFile | None:
    """The file whose name (e.g. a workflow's widget value) is ``name``."""
    return next((f for f in MODEL_FILES.values() if f.name == name), None)


def groups() -> dict[str, tuple[str, ...]]:
    """Items of the download command and what they expand to (one per HR preset: its checkpoint)."""
    presets = {name: (preset.checkpoint,) for name, preset in HR_PRESETS.items()}
    return {
        "cli": ("vae", "t5_fp16", "lr", "2k"),  # a command-line 2K run: its LR stage never loads the base DiT
        "comfyui": ("dit", "vae", "t5_fp8", "lr", "2k"),  # what the example workflows name (4K: add "4k")
        "wan": ("dit", "vae", "t5_fp16"),
        "official": tuple(f.key for f in known_files() if f.key.startswith("official:")),
        "lr": ("lr",),
        **presets,
        "all": ("dit", "vae", "t5_fp16", "lr", *(keys[0] for keys in presets.values())),
    }


DEFAULT_ITEMS = ("cli",)
TEXT_ENCODERS = {"fp16": "t5_fp16", "fp8": "t5_fp8"}


def is_comfyui_models(root: str | Path) -> bool:
    """Whether ``root`` is a ComfyUI ``models`` folder (ComfyUI ships ``models/checkpoints/``; it sits beside
    ``custom_nodes/``): then ``download`` fetches what the example workflows name, fp8 umT5 included."""
    root = Path(root).expanduser()
    return (root / "checkpoints").is_dir() or (root.parent / "custom_nodes").is_dir()


def default_items(root: str | Path) -> tuple[str, ...]:
    return ("comfyui",) if is_comfyui_models(root) else DEFAULT_ITEMS


def default_text_encoder(root: str | Path) -> str:
    return "fp8" if is_comfyui_models(root) else "fp16"  # fp16: the reference's precision


def select(items: Iterable[str] = DEFAULT_ITEMS, *, text_encoder: str | None = None) -> list[ModelFile]:
    """The files named by ``items`` (groups, keys or file names), in table order, without repeats.
    ``text_encoder`` ("fp16" or "fp8"), when given, replaces the umT5 file the groups name by that one."""
    if text_encoder is not None and text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"text encoder {text_encoder!r}: choose one of {', '.join(TEXT_ENCODERS)}")
    keys: set[str] = set()
    item_groups = groups()
    for item in items:
        if item in item_groups:
            keys.update(item_groups[item])
        elif item in MODEL_FILES or file_named(item) is not None:
            keys.add(item if item in MODEL_FILES else file_named(item).key)
        else:
            raise ConfigError(
                f"unknown download item {item!r}: use one of {', '.join(item_groups)}, a file key "
                f"({', '.join(k for k in FILES_BY_KEY if not k.startswith('official:'))}) or a file name")
    if text_encoder is not None and keys & set(TEXT_ENCODERS.values()):
        keys -= set(TEXT_ENCODERS.values())
        keys.add(TEXT_ENCODERS[text_encoder])
    return [f for f in known_files() if f.key in keys]


# --- where files live ------------------------------------------------------------------------------


def default_models_dir() -> Path:
    """PIXELWIZARD_MODELS; else ComfyUI's models folder when this package sits in ComfyUI/custom_nodes;
    else ~/.cache/pixelwizard/models (XDG_CACHE_HOME respected)."""
    if os.environ.get("PIXELWIZARD_MODELS"):
        return Path(os.environ["PIXELWIZARD_MODELS"]).expanduser()
    pack = Path(__file__).resolve().parents[1]
    if pack.parent.name == "custom_nodes" and (pack.parent.parent / "models").is_dir():
        return pack.parent.parent / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pixelwizard" / "models"


def destination(file: ModelFile, root: str | Path, *, flat: bool = False) -> Path:
    """Where ``file`` is written: ``root/<sub-folder>/<name>``, or ``root/<name>`` for a flat folder."""
    root = Path(root).expanduser()
    return root / file.name if flat else root / file.relative


def locate(file: ModelFile, root: str | Path) -> Path | None:
    """The file inside ``root`` in either layout (ComfyUI sub-folder or flat), if present."""
    for path in (destination(file, root), destination(file, root, flat=True)):
        if path.is_file():
            return path
    return None


def check_file(file: ModelFile, path: Path) -> str | None:
    """None when the loader would accept ``path`` as ``file``; else what is wrong, for people."""
    component = file.component
    if file.check_with is not None:
        return None  # a shard: checked through its index, which lists every shard's keys
    if component is None:
        return None if path.stat().st_size > 0 else f"{path} is empty"
    info = inspect_weights(path, component=component)
    if info.component != component:
        found = "not a recognised weight file" if info.component is None else f"a {info.component!r} file"
        detail = f" ({info.problem})" if info.problem else ""
        return (f"{path} is {found}{detail}, but {file.key} must be a {component!r} file ({file.description}); "
                f"delete it and download it again from {file.url}")
    if info.problem:
        return f"{path}: {info.problem}; delete it and download it again from {file.url}"
    return None  # (a file of another size than the release is allowed; the loader logs it)


# --- what a run needs ------------------------------------------------------------------------------

RUN_ROLES = ("text", "vae", "lr", "hr")


def hr_key(width: int, height: int) -> str:
    """The key of the HR checkpoint for a size: that of the preset for it (:func:`preset_for_size`)."""
    return preset_for_size(width, height).checkpoint


def role_candidates(role: str, width: int, height: int, text_encoder: str = "fp16") -> list[str]:
    """Files that can fill a role of a run, preferred first; the first is the one to download. The LR stage
    takes the PixelWizard LR model, else the base DiT (as the reference does without ``--lr_ckpt``)."""
    first = TEXT_ENCODERS[text_encoder]
    return {
        "text": [first, *(k for k in ("t5_fp16", "t5_fp8", "official:t5") if k != first)],
        "vae": ["vae", "official:vae"],
        "lr": ["lr", "dit", "official:dit"],
        "hr": [hr_key(width, height)],
    }[role]


def run_files(root: str | Path, width: int, height: int, roles: Sequence[str] = RUN_ROLES,
              text_encoder: str | None = None) -> tuple[dict[str, Path], list[ModelFile]]:
    """For a run at ``width`` x ``height``: the file found for each role in ``root``, and the files to
    download for the roles that have none (umT5: ``text_encoder``, default :func:`default_text_encoder`)."""
    found: dict[str, Path] = {}
    missing: list[ModelFile] = []
    encoder = text_encoder or default_text_encoder(root)
    for role in roles:
        keys = role_candidates(role, width, height, encoder)
        for key in keys:
            path = locate(FILES_BY_KEY[key], root)
            if path is not None:
                found[role] = path
                break
        else:
            missing.append(FILES_BY_KEY[keys[0]])
    return found, missing


# --- the hub ---------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class Hub:
    """The hub settings in force, read from the environment when a download starts."""

    endpoint: str
    offline: bool
    cache_dir: Path

    @classmethod
    def from_env(cls) -> "Hub":
        try:
            from huggingface_hub import constants
        except ImportError as error:
            raise ConfigError("downloading needs the huggingface_hub package: pip install -r requirements.txt "
                              "(or pip install huggingface_hub)") from error

        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)
        if os.environ.get("HF_HUB_CACHE"):
            cache = Path(os.environ["HF_HUB_CACHE"])
        elif os.environ.get("HF_HOME"):
            cache = Path(os.environ["HF_HOME"]) / "hub"
        else:
            cache = Path(constants.HF_HUB_CACHE)
        return cls(endpoint, offline, cache.expanduser())


@dataclass(frozen=True)
class Remote:
    """What the hub says about one file (HEAD request)."""

    file: ModelFile
    destination: Path
    location: str
    etag: str
    size: int | None
    commit: str | None


@dataclass
class FileResult:
    """What happened to one file."""

    file: ModelFile
    path: Path
    status: str  # present, downloaded, linked, skipped, bad, planned
    problem: str | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("present", "downloaded", "linked", "skipped", "planned")


_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException", "ReadTimeout",
                   "Timeout", "ProxyError", "NetworkError", "RemoteProtocolError", "ReadError", "WriteError",
                   "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionRefusedError", "gaierror"}


def _is_network_error(error: BaseException) -> bool:
    """A connection-level failure (any huggingface_hub / requests / httpx version), or a 5xx answer."""
    seen: BaseException | None = error
    while seen is not None:
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(seen).__mro__):
            return True
        if _status_code(seen) is not None and _status_code(seen) >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def unreachable_message(files: Sequence[ModelFile], root: Path, hub: Hub, reason: str, *, flat: bool = False) -> str:
    """One message: why the hub cannot be used, then each file's URL and where to put it."""
    lines = [f"cannot download from the Hugging Face Hub ({reason}). Fetch these files by hand and put them here:"]
    for file in files:
        lines.append(f"  {file.url}\n      -> {destination(file, root, flat=flat)}")
    lines.append("Then run the command again: files already in place are checked, not downloaded again.")
    if hub.endpoint != HF_URL:
        lines.append(f"(The hub endpoint in use is {hub.endpoint}, from HF_ENDPOINT.)")
    return "\n".join(lines)


def _head(file: ModelFile, dest: Path, hub: Hub) -> Remote | None:
    """The hub's metadata for ``file``; None for an optional file the hub does not have."""
    from huggingface_hub import get_hf_file_metadata

    try:
        meta = get_hf_file_metadata(file.url_at(hub.endpoint))
    except Exception as error:  # the hub client raises many types across versions; sorted below
        code = _status_code(error)
        if _is_network_error(error):
            raise
        if code == 404 and file.optional:
            return None
        if code in (401, 403):
            raise DownloadError(
                f"the hub refused {file.url_at(hub.endpoint)} (HTTP {code}): the repository {file.repo} needs a "
                "login or accepting its terms on huggingface.co; run `hf auth login` (or set HF_TOKEN) and try again"
            ) from error
        if code == 404:
            raise DownloadError(f"the hub has no file {file.path} in {file.repo} ({file.url_at(hub.endpoint)}); "
                                "the repository may have moved it. Put the file at "
                                f"{dest} by hand, or report this.") from error
        raise DownloadError(f"asking the hub about {file.url_at(hub.endpoint)} failed: {error}") from error
    if not meta.etag:
        raise DownloadError(f"{hub.endpoint} answered for {file.path} without an ETag: HF_ENDPOINT does not point "
                            "to a Hugging Face Hub (or a proxy strips its headers)")
    return Remote(file, dest, meta.location or file.url_at(hub.endpoint), meta.etag, meta.size, meta.commit_hash)


def _from_cache(file: ModelFile, dest: Path, hub: Hub, revision: str | None) -> bool:
    """Link (or copy) the file from the Hugging Face cache when an earlier hub download left it there."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(file.repo, file.path, cache_dir=str(hub.cache_dir), revision=revision)
    if not isinstance(cached, str):
        return False
    source = Path(cached).resolve()
    temporary = dest.with_name(f".{dest.name}.from-cache")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(source, temporary)
    os.replace(temporary, dest)
    log.info("%s: taken from the Hugging Face cache (%s)", dest.name, source)
    return True


def _part_path(dest: Path, etag: str) -> Path:
    return dest.with_name(f"{dest.name}.{etag[:12]}.part")


def _transfer(remote: Remote, hub: Hub) -> Path:
    """Download into the .part file (resuming it), return it complete."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    dest = remote.destination
    part = _part_path(dest, remote.etag)
    for stale in dest.parent.glob(f"{dest.name}.*.part"):
        if stale != part:  # left by an older version of the file on the hub
            stale.unlink()
    resume = part.stat().st_size if part.exists() else 0
    if remote.size is not None and resume > remote.size:
        part.unlink()
        resume = 0
    headers = build_hf_headers()
    if urlparse(remote.location).netloc != urlparse(hub.endpoint).netloc:
        headers.pop("authorization", None)  # signed CDN address: no token to a third party
    if resume:
        log.info("%s: resuming at %.2f of %s", dest.name, resume / 1e9, _gb(remote.size))
    with open(part, "ab") as handle:
        http_get(remote.location, handle, resume_size=resume, headers=headers, expected_size=remote.size,
                 displayed_filename=dest.name)
    return part


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(remote: Remote, hub: Hub) -> FileResult:
    dest = remote.destination
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _from_cache(remote.file, dest, hub, remote.commit):
        return _checked(FileResult(remote.file, dest, "linked", size=dest.stat().st_size))
    start = time.monotonic()
    log.info("downloading %s (%s) from %s", dest.name, _gb(remote.size), remote.file.url_at(hub.endpoint))
    try:
        part = _transfer(remote, hub)
    except Exception as error:
        if not (_is_network_error(error) or isinstance(error, OSError)):  # OSError: e.g. the disk filled up
            raise
        part = _part_path(dest, remote.etag)
        kept = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"the download of {dest.name} stopped ({type(error).__name__}: {error}); {kept / 1e9:.2f} GB of "
            f"{_gb(remote.size)} are kept in {part}. Run the same command again to resume from there."
        ) from error
    if len(remote.etag) == 64 and all(c in "0123456789abcdef" for c in remote.etag):
        digest = _sha256(part)  # LFS files: the hub's ETag is the content's sha256
        if digest != remote.etag:
            part.unlink()
            raise DownloadError(f"{dest.name} arrived corrupted (sha256 {digest}, the hub says {remote.etag}); "
                                "the partial file was deleted: run the command again")
    os.replace(part, dest)
    seconds = max(time.monotonic() - start, 1e-6)
    size = dest.stat().st_size
    log.info("%s: %s in %.0f s (%.0f MB/s)", dest.name, _gb(size), seconds, size / seconds / 1e6)
    return _checked(FileResult(remote.file, dest, "downloaded", size=size))


def _checked(result: FileResult) -> FileResult:
    result.problem = check_file(result.file, result.path)
    if result.problem:
        result.status = "bad"
    return result


def _gb(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e9:.2f} GB"


# --- the command -----------------------------------------------------------------------------------


def download(
    files: Sequence[ModelFile],
    root: str | Path | None = None,
    *,
    flat: bool = False,
    dry_run: bool = False,
    hub: Hub | None = None,
) -> list[FileResult]:
    """Make every file in ``files`` present and checked under ``root`` (default: :func:`default_models_dir`).

    Present files are checked without touching the network. Raises :class:`HubUnreachableError` (one
    message listing every missing file) when the hub cannot be used, :class:`DownloadError` when a
    transfer stops (its data kept for the next run); a downloaded file that fails its check is
    reported in its result (status "bad") and the others still download.
    """
    root = Path(root).expanduser() if root is not None else default_models_dir()
    hub = hub or Hub.from_env()
    results: dict[str, FileResult] = {}
    missing: list[ModelFile] = []
    for file in files:
        found = locate(file, root)
        if found is not None:
            results[file.key] = _checked(FileResult(file, found, "present", size=found.stat().st_size))
        else:
            missing.append(file)
    if missing:
        for result in _download_missing(missing, root, flat, dry_run, hub):
            results[result.file.key] = result
    return [results[f.key] for f in files if f.key in results]


def _download_missing(missing: list[ModelFile], root: Path, flat: bool, dry_run: bool, hub: Hub) -> list[FileResult]:
    if hub.offline:
        return _offline(missing, root, flat, dry_run, hub)
    remotes, skipped = _plan(missing, root, flat, hub)
    if dry_run:
        return skipped + [FileResult(r.file, r.destination, "planned", size=r.size or 0) for r in remotes]
    _check_space(remotes, root)
    return skipped + [_fetch(remote, hub) for remote in remotes]


def _offline(missing: list[ModelFile], root: Path, flat: bool, dry_run: bool, hub: Hub) -> list[FileResult]:
    """HF_HUB_OFFLINE: only the Hugging Face cache can provide what is missing."""
    results, left = [], []
    for file in missing:
        dest = destination(file, root, flat=flat)
        if not dry_run and _from_cache(file, dest, hub, None):
            results.append(_checked(FileResult(file, dest, "linked", size=dest.stat().st_size)))
        else:
            left.append(file)
    if left:
        raise HubUnreachableError(unreachable_message(left, root, hub, "HF_HUB_OFFLINE is set", flat=flat))
    return results


def _plan(missing: list[ModelFile], root: Path, flat: bool, hub: Hub) -> tuple[list[Remote], list[FileResult]]:
    """Ask the hub about every missing file first, so an unreachable hub is reported before any download."""
    remotes, skipped = [], []
    for file in missing:
        dest = destination(file, root, flat=flat)
        try:
            remote = _head(file, dest, hub)
        except Exception as error:
            if not _is_network_error(error):
                raise
            reason = f"{hub.endpoint} is unreachable: {type(error).__name__}: {error}"
            raise HubUnreachableError(unreachable_message(missing, root, hub, reason, flat=flat)) from None
        if remote is None:
            skipped.append(FileResult(file, dest, "skipped", "not on the hub (optional)"))
        else:
            remotes.append(remote)
    total = sum(r.size or 0 for r in remotes)
    log.info("%d file(s) to download, %.1f GB, into %s", len(remotes), total / 1e9, root)
    return remotes, skipped


def _check_space(remotes: list[Remote], root: Path) -> None:
    """Refuse to start when the disk cannot hold what is left to download."""
    needed = sum(max((r.size or 0) - _existing_part(r), 0) for r in remotes)
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"the download needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free on the "
                            f"disk of {root}; free some space or choose another folder")


def _existing_part(remote: Remote) -> int:
    part = _part_path(remote.destination, remote.etag)
    return part.stat().st_size if part.exists() else 0
