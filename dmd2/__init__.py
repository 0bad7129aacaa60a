"""dmd2: Distribution Matching Distillation v2 (Yin et al. 2024, arXiv 2405.14867)."""

__version__ = "0.1.0"
