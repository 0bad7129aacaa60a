"""Recipes: presets and builders over the one training loop (``python -m dmd2.recipes.NAME``).

``tiny``: a CPU-sized recipe with an analytic Gaussian-mixture teacher (no download), used by the engine's tests
and as the template for new recipes.
"""
