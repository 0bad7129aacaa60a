"""Recipes: preset tables + component builders on top of :mod:`dmd2.train` (``python -m dmd2.recipes.NAME``; no
training loop of their own). Each gives :class:`~dmd2.train.Recipe` its ``build`` and its ``generator`` builder, so
``dmd2.train.load_generator(RUN)`` reads any recipe's checkpoints.

Every module here, one line each:

* ``mnist``: the embedded default - distil the shipped class-conditional EDM teacher on MNIST on a CPU, then evaluate.
* ``mnist_teacher``: that teacher's network, its EDM training and its evaluation (FID / KID / label accuracy).
* ``imagenet64``: the paper's ImageNet-64 distillation of EDM's ADM teacher (Sec. 5.1).
* ``sdxl``: the paper's SDXL text-to-image student (Sec. 5.2; full fine-tune or LoRA memory modes).
* ``sdxl_export``: a diffusers ``StableDiffusionXLPipeline`` folder from an SDXL student (``sdxl export``).
* ``sdxl_memory``: the SDXL memory plan per memory mode (``sdxl memory``).
* ``sdxl_ode``: the 1-step SDXL warm start - teacher ODE pairs and the generator's regression on them
  (``sdxl ode-pairs``, ``sdxl ode-pretrain``).
* ``tiny``: a CPU-sized recipe with an analytic Gaussian-mixture teacher (no download), used by the tests and as the
  template for new recipes.
* ``toy2d``: a hand-written loop around :class:`~dmd2.core.DMD2` on a 2-D mixture (the end-to-end proof; the same
  command line, its own ``train`` command).
"""
