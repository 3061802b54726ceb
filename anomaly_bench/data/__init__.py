"""Datasets: layouts by name, the synthetic generator, preprocessing and loaders."""

from .loading import (
    Preprocess,
    RecordDataset,
    collate,
    denormalize,
    image_sizes,
    make_loader,
)
from .registry import (
    LAYOUTS,
    DatasetLayout,
    available_layouts,
    get_layout,
    register_layout,
    resolve_categories,
    resolve_root,
)
from .synthetic import SYNTHETIC_CATEGORIES, ensure_synthetic

__all__ = [
    "LAYOUTS",
    "SYNTHETIC_CATEGORIES",
    "DatasetLayout",
    "Preprocess",
    "RecordDataset",
    "available_layouts",
    "collate",
    "denormalize",
    "ensure_synthetic",
    "get_layout",
    "image_sizes",
    "make_loader",
    "register_layout",
    "resolve_categories",
    "resolve_root",
]
