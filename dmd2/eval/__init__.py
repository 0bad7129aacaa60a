"""Evaluation: distribution distances (metrics.py), feature extractors and FID pipelines."""
from .metrics import feature_statistics, frechet_distance, frechet_distance_from_features, kid

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features", "kid"]
