"""Recipes: presets and builders over the one training loop (``python -m dmd2.recipes.NAME``)."""
