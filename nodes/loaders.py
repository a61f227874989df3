"""Loader nodes: they only describe models (handles); weights load when a sampler first needs them."""

from __future__ import annotations

from pixelwizard_core.models.attention import attention_choices
from pixelwizard_core.pipeline.handles import DEFAULT_SWAP_BLOCKS, PRECISIONS, ModelHandle
from pixelwizard_core.pipeline.memory import MEMORY_MODES

from . import host
from .types import CATEGORY, PW_STAGE_MODEL, PW_WAN, WanModels

VAE_PRECISIONS = ["fp32", "bf16", "fp16"]

# inputs both loaders share
MEMORY_MODE_TOOLTIP = ("auto: follow ComfyUI's VRAM setting (--highvram: gpu, --lowvram/--novram: block_swap, else offload); "
                       "gpu: keep the model on the GPU; offload: move it to the CPU when its stage ends; block_swap: "
                       "also stream the DiT's last swap_blocks blocks from CPU memory while it runs (small GPUs, same output). "
                       "In every mode ComfyUI may move the models to the CPU when it needs the room (Unload models, other models)")
SWAP_BLOCKS = ("INT", {"default": 0, "min": 0, "max": 30, "tooltip": f"block_swap only: DiT blocks (of 30) kept in CPU memory, "
                       f"about 0.33 GB each; 0 = {DEFAULT_SWAP_BLOCKS}"})
ATTENTION_TOOLTIP = "auto: the fastest backend that runs here (flash-attn on CUDA when installed), else PyTorch SDPA"


def attention_input() -> tuple:
    """Combo of the registered attention backends (read when ComfyUI asks, so new ones appear)."""
    return (list(attention_choices()), {"default": "auto", "tooltip": ATTENTION_TOOLTIP})


def memory_mode_input() -> tuple:
    return ([host.AUTO_MEMORY, *MEMORY_MODES.names()], {"default": host.AUTO_MEMORY, "tooltip": MEMORY_MODE_TOOLTIP})


COMPILE = ("BOOLEAN", {"default": False, "tooltip": "torch.compile the DiT blocks: the first sampling step compiles "
                      "(minutes), later steps and runs are faster; not with block_swap"})


def _options(precision: str, attention: str, memory_mode: str, swap_blocks: int = 0, compile: bool = False) -> dict:
    return {"precision": precision, "attention": attention, "memory_mode": host.memory_mode(memory_mode),
            "swap_blocks": swap_blocks, "compile": compile}


def _handle(role: str, path: object, options: dict) -> ModelHandle:
    """A checked handle for the file, leased to this node's output (see host.lease)."""
    return host.lease(ModelHandle.for_file(role, path, **options))


class PixelWizardWanLoader:
    DESCRIPTION = ("Wan2.2-TI2V-5B base models (DiT, VAE, umT5) from the ComfyUI model folders or an official "
                   "Wan-AI folder. Nothing loads until a sampler runs; the same files are loaded once.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PW_WAN,)
    RETURN_NAMES = ("wan",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "diffusion_model": (host.model_files("diffusion_models"), {"tooltip": "wan2.2_ti2v_5B_fp16.safetensors (models/diffusion_models)"}),
                "vae": (host.model_files("vae"), {"tooltip": "wan2.2_vae.safetensors (models/vae)"}),
                "text_encoder": (host.model_files("text_encoders"), {"tooltip": "umt5_xxl_fp16 or umt5_xxl_fp8_e4m3fn_scaled (models/text_encoders)"}),
                "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "DiT and text encoder weights; fp8: the DiT's block weights stored in float8 (half of bf16), computed in bf16"}),
                "vae_precision": (VAE_PRECISIONS, {"default": "fp32", "tooltip": "fp32 as the official pipeline; bf16 halves decode memory"}),
                "attention": attention_input(),
                "memory_mode": memory_mode_input(),
            },
            "optional": {
                "official_folder": ("STRING", {"default": "", "tooltip": "path of an official Wan-AI/Wan2.2-TI2V-5B folder; overrides the three files"}),
                "swap_blocks": SWAP_BLOCKS,
                "compile": COMPILE,
            },
        }

    def load(self, diffusion_model, vae, text_encoder, precision, vae_precision, attention, memory_mode, official_folder="",
             swap_blocks=0, compile=False):
        options = _options(precision, attention, memory_mode, swap_blocks, compile)
        if official_folder.strip():
            dit_path = vae_path = text_path = official_folder.strip()
        else:
            dit_path = host.model_path("diffusion_models", diffusion_model)
            vae_path = host.model_path("vae", vae)
            text_path = host.model_path("text_encoders", text_encoder)
        return (WanModels(
            dit=_handle("lr", dit_path, options),
            vae=_handle("vae", vae_path, {**options, "precision": vae_precision}),
            text=_handle("text", text_path, options),
        ),)


class PixelWizardCheckpointLoader:
    DESCRIPTION = ("A PixelWizard checkpoint (lr/model.pt for the anchor stage, 2k/model.pt or 4k/model.pt for the HR "
                   "stage) from models/diffusion_models; the file's keys are checked against the stage now.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PW_STAGE_MODEL,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "checkpoint": (host.model_files("diffusion_models"), {"tooltip": "e.g. PixelWizard/2k/model.pt"}),
            "stage": (["hr", "lr"], {"default": "hr", "tooltip": "hr: 2k/4k shortcut model; lr: anchor model"}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "weights precision (bf16 as the reference)"}),
            "attention": attention_input(),
            "memory_mode": memory_mode_input(),
        }, "optional": {"swap_blocks": SWAP_BLOCKS, "compile": COMPILE}}

    def load(self, checkpoint, stage, precision, attention, memory_mode, swap_blocks=0, compile=False):
        path = host.model_path("diffusion_models", checkpoint)
        return (_handle(stage, path, _options(precision, attention, memory_mode, swap_blocks, compile)),)
