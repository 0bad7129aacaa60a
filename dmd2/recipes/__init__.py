"""Recipes: preset tables + component builders on top of :mod:`dmd2.train` (no training loop of their own).

``tiny``: a CPU-sized recipe with an analytic Gaussian-mixture teacher (no download), used by the tests and as the
template for new recipes.
"""
