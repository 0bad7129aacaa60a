"""Recipes: preset tables + component builders on top of :mod:`dmd2.train` (``python -m dmd2.recipes.NAME``; no
training loop of their own). Each gives :class:`~dmd2.train.Recipe` its ``build`` and its ``generator`` builder, so
``dmd2.train.load_generator(RUN)`` reads any recipe's checkpoints.

* ``mnist``: the embedded default - distil the shipped class-conditional EDM teacher on MNIST on a CPU, then evaluate
  (FID / KID / label accuracy); ``mnist_teacher``: that teacher's network, training and evaluation.
* ``imagenet64``: the paper's ImageNet-64 distillation of EDM's ADM teacher (Sec. 5.1).
* ``sdxl``: the paper's SDXL text-to-image student (Sec. 5.2; full fine-tune or LoRA memory modes);
  ``sdxl_export``: a diffusers ``StableDiffusionXLPipeline`` folder from a student UNet; ``sdxl_memory``: the memory
  plan per mode.
* ``tiny``: a CPU-sized recipe with an analytic Gaussian-mixture teacher (no download), used by the tests and as the
  template for new recipes.
* ``toy2d``: a hand-written loop around :class:`~dmd2.core.DMD2` on a 2-D mixture (the end-to-end proof; the same
  command line, its own ``train`` command).
"""
