"""A toy world whose content can be measured, and a tiny PixelWizard trained on it (issue 17).

- :mod:`.world`: scenes, the prompt grammar and the deterministic renderer;
- :mod:`.measure`: colour, shape, motion, sharpness and flicker of a clip;
- :mod:`.vocab`: the word-level tokenizer of the grammar (a umT5-numbered ``tokenizer.json``);
- :mod:`.models`: the tiny model configs, stage settings and the weight files (``weights/``, with the
  ``demo.json`` that ``generate --demo`` reads);
- :mod:`.vae_training`, :mod:`.recipe`: training of the four models with the project's training code;
- :mod:`.evaluate`, :mod:`.broken`, :mod:`.ablation`: the real pipeline on the toy models and its checks,
  deliberately broken variants, the shortcut ablation;
- :mod:`.cli`: ``train-toy``, ``toy-check`` and ``toy-ablation``.

This package is a front end (it imports training and the pipeline); ``pipeline/demo.py`` finds the weights
by path and reads ``demo.json``, so nothing below imports it.
"""
