"""Any folder in an MVTec-like layout (one category), with optional masks.

``<root>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``: the category is
named after the root folder unless ``dataset.category`` names it. Masks are optional
(without ``ground_truth/`` the split has no masks and pixel metrics stay empty) and are
named ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. A root whose sub-folders are such
categories works too (each sub-folder is one category).
"""

from __future__ import annotations

import os
from pathlib import Path

from .mvtec import MVTecLikeLayout
from .registry import register_layout


class FolderLayout(MVTecLikeLayout):
    """An MVTec-like folder that is itself the category (or a folder of such categories)."""

    def __init__(self) -> None:
        super().__init__(
            name="folder", title="folder dataset", good="good", mask_suffixes=("_mask", ""),
            masks_required=False,
        )

    @property
    def expected(self) -> str:
        return (
            "<root>/train/good, <root>/test/good, <root>/test/<defect> and optionally "
            "<root>/ground_truth/<defect>/<stem>_mask.<ext> or <stem>.<ext>."
        )

    def categories(self, root: Path) -> list[str]:
        """``[root's name]`` when root is a category (``.``/``..`` resolved), else sub-folders."""
        root = Path(root)
        if self.is_category(root):
            return [Path(os.path.abspath(root)).name]
        return super().categories(root)

    def accepts(self, root: Path, name: str) -> bool:
        """Any name labels a root that is itself the category."""
        return self.is_category(Path(root))

    def category_dir(self, root: Path, category: str) -> Path:
        """``root`` itself, unless it is not a category but has a sub-folder ``category``."""
        root = Path(root)
        sub = root / category
        return sub if not self.is_category(root) and sub.is_dir() else root

    def category_hint(self, root: Path, category: str) -> str:
        return (
            f"expected {root}/train/good and {root}/test/ (or a sub-folder {root / category} "
            f"with them)"
        )


FOLDER = register_layout(FolderLayout())
