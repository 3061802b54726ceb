"""Shared feature extractors: timm CNNs with block-level layer selection."""

from anomaly_bench.backbones.extractor import STAGES, FeatureExtractor, Features, selection_tag

__all__ = ["STAGES", "FeatureExtractor", "Features", "selection_tag"]
