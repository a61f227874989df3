"""The engine: the stages on loaded models, the model store, the memory model, presets and registries.

- stages: ``text`` (umT5 conditioning), ``stages`` (LR anchor, HR latent), ``loop`` (the sampling loop),
  ``tiled_decode`` with ``tile_plan`` and ``decode_budget``; ``anchors`` (anchor and latent files).
- the stage API: ``engine`` (the ``Stages`` protocol, ``DecodeSettings``, ``LocalStages``), ``runner``
  (the command line's one driver over any ``Stages``).
- models: ``handles`` (lazy model descriptions), ``store`` (the one model store), ``placement`` (where
  weights are), ``models`` (a run's files and models), ``demo``.
- settings: ``presets`` (HR presets registry), ``memory`` (the memory model and memory modes), ``jobs``.

See docs/ARCHITECTURE.md for the layers and the data flow.
"""
