"""Decode stage: ``tiled_decode_stream`` at each HR size, the preset's tiles along the width, overlap 3, in
frame and tile order, ``--decode-frames`` latent frames per tile.

Caches: the VAE's causal caches, measured between latent frames (the step callback runs after each tile of
each latent frame, when that frame's transient activations are freed): allocated there minus weights,
inputs, the blend masks, each tile's latent after conv2, each tile's last decoded piece and the output
chunk (sizes known from their shapes), at the last latent frame (steady state: every cache then holds its
2 frames; in tile order the largest over the tiles). ``cache_expected_bytes`` is the exact count from meta
tensors. This reads the caches directly instead of differencing a 1- and a 2-frame decode, whose peaks also
differ by the second frame's larger transient and output (4 frames instead of 1). transient = peak -
weights - inputs - caches: one latent frame of one tile at work. On the CPU, tile order's host canvas is in
the same memory and is subtracted from its caches.

Time: per latent frame the median of the frames after the first; the whole video's decode is extrapolated
from it (said so in the record). Under a budget a decode is predicted to take as long as the slowest one at
its size so far.
"""

from __future__ import annotations

import functools
import time

import torch

from pixelwizard_core.models.vae import VAEConfig, decoder_cache_elements
from pixelwizard_core.pipeline.presets import latent_frames
from pixelwizard_core.pipeline.tile_plan import SCALE, plan_tiles
from pixelwizard_core.pipeline.tiled_decode import tiled_decode_stream

from .config import OVERLAP, SEED, HRSize, Mode
from .harness import Bench, intervals, steady


@functools.cache
def cache_bytes_per_latent_pixel(config: VAEConfig, item: int) -> float:
    """Causal-cache bytes per latent pixel of a decoder at steady state: exact, from meta tensors."""
    return decoder_cache_elements(config, (16, 16)) * item / (16 * 16)


class DecodeStage:
    """The decode stages of a run; remembers the slowest decode per size to predict the next one's time."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.seconds: dict[str, float] = {}

    def run(self, mode: Mode, size: HRSize, order: str) -> None:
        bench, frames = self.bench, self.bench.args.decode_frames
        path = ("decode", size.label, order)
        if bench.over_budget(mode, path, self.seconds.get(size.label, 0.0)):
            return
        h, w = size.height // SCALE, size.width // SCALE
        tiles = plan_tiles((h, w), size.patches, "w", OVERLAP)
        areas = [(t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiles]

        def stage(record: dict) -> None:
            with bench.placed("vae", mode, record) as vae:
                generator = torch.Generator().manual_seed(SEED)
                latent = bench.inputs(
                    record, lambda: torch.randn(1, 48, frames, h, w, generator=generator).to(bench.device))
                states, stamps = [], []

                def on_step(done: int, total: int) -> None:
                    if order == "frame" and done % len(tiles):  # frame order: once every tile has the frame
                        return
                    bench.meter.sync()
                    stamps.append(time.perf_counter())
                    states.append(bench.meter.allocated())

                bench.meter.sync()
                start = time.perf_counter()
                for chunk in tiled_decode_stream(vae, latent, num_patches=size.patches, patch_dim="w",
                                                 overlap=OVERLAP, order=order, on_step=on_step):
                    del chunk
                bench.meter.sync()
                end = time.perf_counter()
                dtype = vae.dtype
            record.update(self._figures(record, size, order, areas, dtype, states, stamps, start, end))

        def after(record: dict) -> None:
            record["transient_bytes"] = record["activations_bytes"] - record["caches_bytes"]
            self.seconds[size.label] = max(self.seconds.get(size.label, 0.0), record["seconds"])

        bench.measure(mode, path, f"decode {size.label} {order}", stage,
                      ("seconds_per_latent_frame", "per latent frame"), after)

    def _figures(self, record: dict, size: HRSize, order: str, areas: list[int], dtype: torch.dtype,
                 states: list[int], stamps: list[float], start: float, end: float) -> dict:
        """Caches between latent frames, times per latent frame, and the whole video's decode extrapolated."""
        bench, frames = self.bench, self.bench.args.decode_frames
        base, item = record["weights_bytes"] + record["inputs_bytes"], dtype.itemsize
        masks = sum(a * SCALE * SCALE * 4 for a in areas)  # float32 blend weight of every tile, on the device
        inputs = [48 * frames * a * item for a in areas]  # each tile's latent after the VAE's conv2
        full = latent_frames(bench.setup.frames)
        per_pixel = cache_bytes_per_latent_pixel(bench.setup.vae, item)
        # each tile's stream keeps its last decoded piece (float32, 1 frame for the first latent frame, 4 after)
        pieces = [[3 * (4 if k else 1) * a * SCALE * SCALE * 4 for k in range(frames)] for a in areas]
        times = intervals(start, stamps)
        if order == "frame":
            chunk = 3 * 4 * size.height * size.width * 4  # the blended output frames (4 after the first)
            caches = [s - base - masks - sum(inputs) - sum(p[k] for p in pieces) - (chunk if k else chunk // 4)
                      for k, s in enumerate(states)]
            expected = sum(areas) * per_pixel
            per_frame = steady(times)
            total = times[0] + (full - 1) * per_frame
        else:  # on the CPU the host canvas of the whole video is in the same memory: not the device's
            canvas = 0 if bench.cuda else 3 * (4 * (frames - 1) + 1) * size.height * size.width * 4
            caches = [s - base - masks - canvas - inputs[k // frames] - pieces[k // frames][k % frames]
                      for k, s in enumerate(states)]
            expected = max(areas) * per_pixel
            per_tile = [times[i * frames:(i + 1) * frames] for i in range(len(areas))]
            per_frame = sum(steady(t) for t in per_tile)
            blend = (end - stamps[-1]) * full / frames  # yielding the host canvas, scaled to the whole video
            total = sum(t[0] + (full - 1) * steady(t) for t in per_tile) + blend
        # steady state: the last latent frame (of each tile in tile order), when every cache holds its 2 frames
        steady_caches = caches[-1] if order == "frame" else max(caches[frames - 1::frames])
        return {"width": size.width, "height": size.height, "latent_frames_decoded": frames, "tiles": len(areas),
                "tile_latent_areas": areas, "vae_dtype": str(dtype).replace("torch.", ""),
                "caches_bytes": steady_caches, "caches_bytes_each_callback": caches,
                "cache_expected_bytes": expected, "frame_seconds": times, "seconds_per_latent_frame": per_frame,
                "latent_frames_full_video": full, "full_decode_seconds_extrapolated": total,
                "extrapolation": f"first latent frame + {full - 1} x the median of the later ones"
                                 + (" per tile, plus the canvas output scaled to the video" if order == "tile" else "")}
