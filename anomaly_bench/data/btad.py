"""BTAD (Mishra et al., 2021) as published: categories 01, 02, 03.

``<root>/<cat>/{train/ok, test/ok, test/ko, ground_truth/ko}``. Images and masks use
different extensions per category (bmp or png), so a mask is matched by its stem alone.
"""

from __future__ import annotations

from .mvtec import MVTecLikeLayout
from .registry import register_layout

BTAD_CATEGORIES = ("01", "02", "03")

BTAD = register_layout(
    MVTecLikeLayout(
        name="btad", title="BTAD", good="ok", mask_suffixes=("", "_mask"),
        known_categories=BTAD_CATEGORIES,
    )
)
