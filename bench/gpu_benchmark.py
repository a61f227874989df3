"""One-command GPU benchmark and memory profile of PixelWizard at the real model sizes (random weights).

    python3 bench/gpu_benchmark.py --out bench_gpu.json     # a CUDA GPU: about 8 minutes on one H100
    python bench/gpu_benchmark.py --small --device cpu      # tiny configs on the CPU: under a minute

What it does. It builds the four models of a run at their real sizes by default (``DiTConfig()`` for the
LR DiT, ``WanHRDiT(DiTConfig())`` with its anchor injector, the real umT5-XXL encoder, the real Wan2.2
VAE) with random weights (never from files), and runs the stages of a ``generate`` with the library's own
code (``TextEncoder.encode``, ``lr_anchor``, ``hr_latent``, ``tiled_decode_stream``) in each memory mode
(gpu, offload, block_swap_N), placing every model with ``pipeline.placement.on_device``.

Stages: text (prompt + negative, 512 tokens each, one batch), LR (448x256, both CFG branches in one batch),
HR at each size (2K 2560x1440, 4K 3840x2144; cond and uncond one after the other), decode at each size (the
preset's tiles along the width, overlap 3; ``order`` frame and tile), all for 121 frames. Stages are stopped
after a few steps and the full stage is extrapolated. Memory by stage: weights, inputs, peak, activations,
and for the decode its causal caches and transient.

Then, once per run, the DiT's CUDA paths (``cuda_paths``): graphs per compiled DiT block for each attention
backend (``torch._dynamo.explain``), page-locked host bytes per swapped block (planned and measured), and
one HR step at the LR size for sdpa / flash / sage where each runs, eager and compiled (compiled on CUDA).

Budget: ``--budget-s`` (default 450 on CUDA, none on the CPU) bounds the run; what does not fit is reported
as skipped. Out-of-memory errors are caught per stage and mode, reported as "OOM at X GiB", and the run
goes on. The JSON is rewritten after every stage, so a run cut short keeps what it did.

Output: a markdown table on stdout (``--out X.json`` also writes it to ``X.md``) and the JSON with every
figure and the environment (GPU, driver, torch/CUDA/cuDNN/flash-attn versions, attention backend,
measured matmul rate and copy bandwidths). ``--render X.json`` prints the tables of an earlier run.
Progress goes to stderr. Needs only torch and this repository (no text is tokenized, so not ftfy).

The code is the package ``bench/gpu`` (its ``__init__`` maps the modules; each module's docstring gives the
method of its part: memory in ``meters`` and ``harness``, each stage's timing in ``text``, ``lr``, ``hr``,
``decode``, the modes and the CPU's one process per mode in ``plan``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this folder first, for its ``gpu`` package (ahead of any installed module of that name); the repository
# root for ``pixelwizard_core``
sys.path[:0] = [str(HERE), str(HERE.parent)]

from gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
