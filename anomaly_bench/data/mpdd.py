"""MPDD (Jezek et al., 2021): metal parts in an MVTec-like tree.

Six categories; mask names may or may not carry the ``_mask`` suffix.
"""

from __future__ import annotations

from .mvtec import MVTecLikeLayout
from .registry import register_layout

MPDD_CATEGORIES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)

MPDD = register_layout(
    MVTecLikeLayout(
        name="mpdd", title="MPDD", mask_suffixes=("_mask", ""), known_categories=MPDD_CATEGORIES,
    )
)
