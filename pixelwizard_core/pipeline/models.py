"""Which weight files a run uses, and the models loaded from them: lazily, once, moved where needed.

``ModelFiles`` resolves every file before anything is loaded (so a missing file is reported at once);
``Models`` loads each model on first use and, between uses, keeps it on the GPU, moves it to the CPU
(offload) or drops it (reload), as the reference's ``--model_load_mode`` / ``--offload_model`` do; with
``block_swap`` the DiTs stream their last blocks from the CPU while they run (:mod:`.placement`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..loading.folders import resolve
from ..models.block_swap import check_count
from ..loading.identity import file_identity
from ..system import unified_memory
from .handles import DIT_ROLES, ROLES, ModelHandle, check_kind
from .lora import sync_loras
from .placement import num_blocks, on_device
from .store import ModelStore

log = logging.getLogger("pixelwizard")

LOAD_MODES = ("auto", "resident", "reload")
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class ModelFiles:
    """The weight file of each role; ``lr`` is the PixelWizard LR checkpoint or the base DiT."""

    text_encoder: Path | None = None
    vae: Path | None = None
    lr: Path | None = None
    hr: Path | None = None

    @classmethod
    def resolve(
        cls,
        *,
        ckpt_dir: str | Path | None = None,
        dit: str | Path | None = None,
        text_encoder: str | Path | None = None,
        vae: str | Path | None = None,
        lr_ckpt: str | Path | None = None,
        hr_ckpt: str | Path | None = None,
    ) -> "ModelFiles":
        """Files from an official Wan-AI folder and/or single files; a single file overrides the folder."""

        def pick(explicit: str | Path | None, component: str) -> Path | None:
            source = explicit or ckpt_dir
            return None if source is None else resolve(source, component)

        return cls(
            text_encoder=pick(text_encoder, "t5"),
            vae=pick(vae, "vae"),
            lr=pick(lr_ckpt or dit, "dit"),
            hr=None if hr_ckpt is None else resolve(hr_ckpt, "hr_dit"),
        )

    def require(self, *roles: str) -> None:
        """Fail now, before any loading, when a role the run needs has no file."""
        flags = {"text": "--ckpt_dir or --text_encoder", "vae": "--ckpt_dir or --vae_path",
                 "lr": "--ckpt_dir, --dit or --lr_ckpt", "hr": "--hr_ckpt"}
        missing = [role for role in roles if self.path(role) is None]
        if missing:
            raise ConfigError("no weights given for " + ", ".join(f"{r} (pass {flags[r]})" for r in missing))

    def check_kinds(self, *roles: str) -> None:
        """Read each file's keys (no tensor data) and refuse a file of the wrong kind for its role,
        e.g. an HR checkpoint given as the LR model, before anything heavy happens."""
        flags = {"text": "--text_encoder", "vae": "--vae_path", "lr": "--lr_ckpt/--dit", "hr": "--hr_ckpt"}
        for role in roles:
            try:
                check_kind(self.path(role), role)
            except ConfigError as error:
                raise ConfigError(f"{flags[role]}: {error}") from None

    def path(self, role: str) -> Path | None:
        return {"text": self.text_encoder, "vae": self.vae, "lr": self.lr, "hr": self.hr}[role]

    def identity(self, role: str) -> str:
        """The identity of the file behind ``role`` for metadata (:func:`~..loading.identity.file_identity`)."""
        path = self.path(role)
        return "" if path is None else str(file_identity(path))


class Models:
    """Lazily loaded models of one run and their placement policy."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        load_mode: str = "auto",
        offload: bool | None = None,
        t5_cpu: bool = False,
        attention: str = "auto",
        prebuilt: dict[str, object] | None = None,
        block_swap: int = 0,
        compile_blocks: bool = False,
        loras: dict[str, tuple] | None = None,
    ) -> None:
        """``block_swap``: 0, or how many of the LR and HR DiTs' last blocks are streamed from the CPU while
        they run; the DiTs then wait on the CPU between stages whatever ``offload`` says.
        ``compile_blocks``: torch.compile the DiTs' blocks (not with block swap). ``loras``: role ("lr", "hr")
        -> the LoRAs (:class:`~..loading.lora.LoraRef`) its DiT gets, merged when it is used (:mod:`.lora`)."""
        if load_mode not in LOAD_MODES:
            raise ConfigError(f"model load mode {load_mode!r}: choose one of {', '.join(LOAD_MODES)}")
        if isinstance(block_swap, bool) or not isinstance(block_swap, int) or block_swap < 0:
            raise ConfigError(f"--block_swap {block_swap!r}: give the number of DiT blocks to stream from the "
                              "CPU (0 = off)")
        if compile_blocks and block_swap:
            raise ConfigError("--compile with --block_swap: the swap moves weights under the compiled blocks; "
                              "use one of them")
        self.files = files
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.load_mode = "resident" if load_mode == "auto" else load_mode
        self.offload = self.device.type == "cuda" if offload is None else offload
        if self.offload and unified_memory(self.device):
            log.info("%s shares the host's memory: offloading saves nothing there, models stay put", self.device)
            self.offload = False
        self.t5_cpu = t5_cpu
        self.attention = attention
        self.block_swap = block_swap
        self.compile_blocks = compile_blocks
        self.loras = {role: tuple(items) for role, items in (loras or {}).items() if items}
        # models built in memory (``generate --demo``): used as if loaded, no file needed
        self._prebuilt: dict[str, object] = dict(prebuilt or {})
        self.store = ModelStore(one_per_role=True)
        if block_swap:
            self._check_block_swap()

    def _check_block_swap(self) -> None:
        """Refuse a block count larger than a DiT's now, from the file headers, before any stage runs."""
        for role in DIT_ROLES:
            if role in self._prebuilt:
                layers = num_blocks(self._prebuilt[role])
            elif self.files.path(role) is not None:
                layers = check_kind(self.files.path(role), role).config.get("num_layers")
            else:
                continue
            if layers:
                try:
                    check_count(self.block_swap, layers)
                except ConfigError as error:
                    raise ConfigError(f"--block_swap: {error}") from None

    def _swap(self, role: str) -> int:
        return self.block_swap if role in DIT_ROLES else 0

    def _home(self, role: str) -> torch.device:
        """Where a model waits between uses."""
        if role == "text" and self.t5_cpu:
            return torch.device("cpu")
        return torch.device("cpu") if self.offload or self._swap(role) else self.device

    def _work_device(self, role: str) -> torch.device:
        return torch.device("cpu") if role == "text" and self.t5_cpu else self.device

    def handle(self, role: str) -> ModelHandle:
        """The handle of ``role``'s file with this run's options (what a worker process is sent too)."""
        if role not in ROLES:
            raise ConfigError(f"unknown model role {role!r}")
        dtype = self.vae_dtype if role == "vae" else self.dtype
        swap = self._swap(role)
        mode = "block_swap" if swap else "offload" if self.offload else "gpu"
        options = dict(precision=PRECISION_NAMES[dtype], attention=self.attention, memory_mode=mode,
                       swap_blocks=swap, compile=self.compile_blocks, loras=self.loras.get(role, ()))
        if role in self._prebuilt:
            return ModelHandle.in_memory(role, **options)
        self.files.require(role)
        return ModelHandle(role, str(self.files.path(role)), **options)

    @contextlib.contextmanager
    def open(self, handle: ModelHandle, working_bytes: int = 0) -> Iterator[object]:
        """The model of ``handle`` on its working device for the duration of the block (then at its home,
        or dropped in load mode "reload"): the opener of :class:`~.engine.LocalStages`."""
        role = handle.role
        if handle.is_in_memory:
            sync_loras(self._prebuilt[role], handle.loras, self._work_device(role))
            with on_device(self._prebuilt[role], self._work_device(role), home=self._home(role),
                           swap_blocks=self._swap(role)) as model:
                yield model
            return
        reload = self.load_mode == "reload"  # dropped after use: not worth moving back
        try:
            with self.store.use(handle, self._work_device(role), home=None if reload else self._home(role),
                                swap_blocks=self._swap(role), working_bytes=working_bytes) as model:
                yield model
        finally:
            if reload:
                self.release(role)
            else:
                _empty_cache(self.device)  # as before the placement policy moved: once per stage

    def use(self, role: str) -> contextlib.AbstractContextManager[object]:
        """The model of ``role`` on its working device for the duration of the block."""
        return self.open(self.handle(role))

    def holds(self, role: str) -> bool:
        """Whether the model of ``role`` is loaded (or built in memory)."""
        if role in self._prebuilt:
            return True
        return self.files.path(role) is not None and self.store.holds(self.handle(role))

    def release(self, role: str | None = None) -> None:
        """Drop one model (or all) so its memory is freed."""
        for name in [role] if role else list(self._prebuilt):
            self._prebuilt.pop(name, None)
        self.store.release(role)
        _empty_cache(self.device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
