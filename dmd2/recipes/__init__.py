"""Recipes: preset tables + component builders on top of :mod:`dmd2.train` (``python -m dmd2.recipes.NAME``; no
training loop of their own).

``tiny``: a CPU-sized recipe with an analytic Gaussian-mixture teacher (no download), used by the tests and as the
template for new recipes. ``imagenet64``: the paper's ImageNet-64 distillation of EDM's ADM teacher.
``toy2d``: a hand-written loop around :class:`~dmd2.core.DMD2` on a 2-D mixture (the end-to-end proof; the same
command line, its own ``train`` command).
"""
