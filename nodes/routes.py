"""The pack's hooks into ComfyUI's server: what the model store holds, and /free reaching the worker pool.

- ``GET /pixelwizard/models``: every model the nodes hold (role, file, size, bytes on the GPU, whether
  ComfyUI's model manager lists it, the LoRAs merged into it) and the worker pool's state, for the frontend and for a user asking
  where their memory went.
- ``POST /free`` (the "Unload models" and "Free model and node cache" buttons) also stops the multi-GPU
  pool's worker processes, which ComfyUI's model manager cannot see (they are other processes); the
  models in this process are ComfyUI's to free (``nodes/comfy_memory.py``).
"""

from __future__ import annotations

import json
import logging

from pixelwizard_core.distributed import pool as pool_module
from pixelwizard_core.pipeline.lora import applied_loras
from pixelwizard_core.pipeline.placement import module_of
from pixelwizard_core.pipeline.store import SHARED_STORE, tensor_bytes

from .comfy_memory import bytes_on
from . import host

log = logging.getLogger("pixelwizard")


def held_models() -> dict:
    """What ``GET /pixelwizard/models`` answers."""
    manager = SHARED_STORE.host
    listed = getattr(manager, "listed", lambda key: False)
    gpu = host.device()
    models = [{"role": key.role, "file": key.file.name, "precision": key.precision,
               "bytes": tensor_bytes(module_of(model)), "device_bytes": bytes_on(module_of(model), gpu),
               "listed_by_comfyui": listed(key), "loras": [lora.describe() for lora in applied_loras(model)]}
              for key, model in SHARED_STORE.entries()]
    running = [repr(pool) for pool in pool_module.running_pools()]
    return {"models": models, "pools": running}


def free_request_stops_pools(body: dict) -> bool:
    """Whether a /free request's JSON asks for what our workers hold (either flag)."""
    return bool(body.get("unload_models") or body.get("free_memory"))


def register(server: object) -> None:
    """Add the route and the /free middleware to ComfyUI's ``PromptServer`` (before its app starts)."""
    from aiohttp import web

    @server.routes.get("/pixelwizard/models")
    async def models(request: web.Request) -> web.Response:
        return web.json_response(held_models())

    @web.middleware
    async def free_stops_pools(request: web.Request, handler):
        if request.method == "POST" and request.path == "/free":
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                body = {}
            if isinstance(body, dict) and free_request_stops_pools(body) and pool_module.running_pools():
                log.info("PixelWizard: /free stops the multi-GPU worker processes")
                pool_module.shutdown_all()
        return await handler(request)

    server.app.middlewares.append(free_stops_pools)
