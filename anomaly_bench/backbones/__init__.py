"""Shared frozen feature extractors behind one interface (:mod:`.base`): timm CNNs with
block-level layer selection."""

from anomaly_bench.backbones.base import Backbone, Features
from anomaly_bench.backbones.extractor import STAGES, FeatureExtractor, selection_tag

__all__ = ["STAGES", "Backbone", "FeatureExtractor", "Features", "selection_tag"]
