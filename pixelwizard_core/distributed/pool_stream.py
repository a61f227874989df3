"""The parent's half of a streamed decode (``WorkerPool.decode_stream``): every worker sends each of its
tiles' weighted piece of a latent frame as it decodes it; a chunk of video is blended once every tile's
piece of that frame is here, and the pieces are dropped.

The workers may run ``STREAM_AHEAD`` latent frames beyond the chunk last yielded (credits), so host memory
holds a few chunks whatever the video's length; the time the consumer takes does not count against the
job's time limit.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..pipeline.tiled_decode import BlendPlan
from .pool_rpc import Replies, Rpc
from .tiles import blend_tiles

STREAM_AHEAD = 2  # latent frames a streamed decode's workers may send beyond the chunk last yielded


def chunk_frames(latent_frames: int) -> list[int]:
    """Video frames per chunk: 1 for the first latent frame (the causal VAE's), 4 for each after."""
    return [1] + [4] * (latent_frames - 1)


class FrameAssembler:
    """Tile pieces by latent frame until each frame has all of its tiles' pieces."""

    def __init__(self, plan: BlendPlan) -> None:
        self.plan = plan
        self.tiles = len(plan.tiles)
        self.received: dict[int, dict[int, torch.Tensor]] = {}  # latent frame -> tile index -> weighted piece

    def keep(self, frame: int, pieces: dict[int, torch.Tensor]) -> None:
        self.received.setdefault(frame, {}).update(pieces)

    def complete(self, frame: int) -> bool:
        return len(self.received.get(frame, ())) == self.tiles

    def blend(self, frame: int) -> torch.Tensor:
        """The frame's chunk of video; its pieces are released."""
        return blend_tiles(self.plan, self.received.pop(frame))


def stream_chunks(rpc: Rpc, replies: Replies, assembler: FrameAssembler, job: int, latent_frames: int
                  ) -> Generator[torch.Tensor, None, list]:
    """Yield each chunk as soon as it is complete, granting the workers credit as the consumer takes them;
    returns the workers' reports once all have finished."""
    rpc.allow(job, STREAM_AHEAD)
    for frame in range(latent_frames):
        replies.wait_for(lambda: assembler.complete(frame), f"latent frame {frame}")
        chunk = assembler.blend(frame)
        rpc.allow(job, frame + 1 + STREAM_AHEAD)
        replies.hold()
        yield chunk
        replies.resume()
        del chunk  # not kept while the next frame arrives
    _, infos = replies.finish()
    return infos
