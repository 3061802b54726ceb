"""Dataset layouts by name, and the resolution of dataset roots and categories.

A layout knows how one published dataset is arranged on disk. Layouts register here,
either with the :func:`register_layout` decorator on a class (instantiated without
arguments) or by calling it on an instance, which is the same as one ``LAYOUTS`` entry::

    @register_layout
    class VisaLayout:
        name = "visa"
        ...

Every module of :mod:`anomaly_bench.data` is imported the first time a layout is looked
up, so a new layout module needs no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from anomaly_bench.errors import ConfigError, DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import CategorySplit

from .layout_utils import names

DATA_ENV_VAR = "ANOMALY_BENCH_DATA"


@runtime_checkable
class DatasetLayout(Protocol):
    """How one dataset is laid out on disk.

    Optional extras the helpers below use when present: ``title`` (a display name for
    messages), ``expected`` (a sentence describing the layout), ``accepts(root, name)``
    (True when ``name`` is a valid category of ``root`` although ``categories`` does not
    list it, e.g. a label for a single-category folder) and ``category_hint(root, name)``
    (what a missing category folder should have looked like).
    """

    name: str

    def categories(self, root: Path) -> list[str]:
        """The categories present under ``root``, sorted."""
        ...

    def split(self, root: Path, category: str) -> CategorySplit:
        """Train/test records of ``category``; validates the layout and raises DataError."""
        ...


LAYOUTS: dict[str, DatasetLayout] = {}
_SKIP_MODULES = {"registry", "layout_utils", "loading", "catalog", "meta"}
_discovered = False

T = TypeVar("T")


def register_layout(obj: T) -> T:
    """Register a layout class (instantiated without arguments) or instance under its name."""
    layout = obj() if isinstance(obj, type) else obj
    name = getattr(layout, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{obj!r} has no 'name' and cannot be registered as a dataset layout")
    LAYOUTS[name] = layout  # type: ignore[assignment]
    return obj


def _discover() -> None:
    """Import every module of the data package once, so that their layouts register."""
    global _discovered
    if _discovered:
        return
    import anomaly_bench.data as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _SKIP_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _discovered = True


def available_layouts() -> list[str]:
    """Names of all registered layouts, sorted."""
    _discover()
    return sorted(LAYOUTS)


def get_layout(name: str) -> DatasetLayout:
    """The layout registered as ``name``; ConfigError listing the known names otherwise."""
    _discover()
    try:
        return LAYOUTS[str(name)]
    except KeyError:
        raise ConfigError(
            f"Unknown dataset layout '{name}'. Known layouts: {names(sorted(LAYOUTS))}. "
            f"Pick one with dataset=<name> (or dataset.name=<name>)."
        ) from None


def title(layout: DatasetLayout) -> str:
    """Display name of a layout for messages (``MVTec AD``, ``BTAD``, ...)."""
    return getattr(layout, "title", None) or layout.name


def _expected(layout: DatasetLayout) -> str:
    text = getattr(layout, "expected", None)
    return f" Expected layout: {text}" if text else ""


def resolve_root(
    layout_name: str,
    root: str | Path | None,
    data_root: str | Path,
    dirnames: Sequence[str],
) -> Path:
    """The dataset folder: ``root`` when given, else the first ``data_root/<d>`` with categories.

    ``dirnames`` are tried in order (``"."`` is ``data_root`` itself); a candidate counts
    when the layout finds at least one category in it.
    """
    layout = get_layout(layout_name)
    if root not in (None, ""):
        path = Path(root).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise DataError(
                f"The {title(layout)} dataset root {path} {what}. Set dataset.root to the "
                f"folder that holds the dataset.{_expected(layout)}"
            )
        return path
    base = Path(data_root).expanduser()
    if not dirnames:
        raise DataError(
            f"No folder to look for the {title(layout)} dataset in: set dataset.root=PATH."
            f"{_expected(layout)}"
        )
    tried = []
    for d in dirnames:
        cand = base if d in (".", "") else base / d
        if cand.is_dir():
            if layout.categories(cand):
                return cand
            tried.append(f"{cand} (exists, no {title(layout)} category inside)")
        else:
            tried.append(f"{cand} (missing)")
    raise DataError(
        f"No {title(layout)} dataset found under data_root={base}: tried {'; '.join(tried)}. "
        f"Set data_root (or the environment variable {DATA_ENV_VAR}) to the folder that "
        f"contains it, or set dataset.root=PATH.{_expected(layout)}"
    )


def _as_names(category: str | Sequence[str] | int) -> list[str]:
    if isinstance(category, str):
        return [c.strip() for c in category.split(",") if c.strip()]
    if isinstance(category, int):
        return [str(category)]
    return [str(c) for c in category]


def _match(name: str, available: Sequence[str]) -> str | None:
    """``name`` as listed in ``available``; ``1`` also matches ``01`` (YAML reads 01 as 1)."""
    if name in available:
        return name
    if name.isdigit():
        hits = [a for a in available if a.isdigit() and int(a) == int(name)]
        if len(hits) == 1:
            return hits[0]
    return None


def _single_category_hint(layout: DatasetLayout, root: Path) -> str:
    """A hint when ``root`` looks like one category folder rather than the dataset root."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return (
            f" {root} itself looks like a single category folder: set dataset.root to its "
            f"parent folder, or use dataset=folder dataset.root={root}."
        )
    return ""


def resolve_categories(
    layout: DatasetLayout, root: str | Path, category: str | Sequence[str]
) -> list[str]:
    """The categories to run: ``'all'`` -> every category present, else each named one.

    Every requested name, and every name the layout finds under ``root``, must be a plain
    folder name (:func:`~anomaly_bench.paths.check_name`; ConfigError otherwise), since
    categories name folders of the run directory. Raises DataError when ``'all'`` finds none
    or a named category is missing (listing the categories that are present).
    """
    root = Path(root)
    wanted = [check_name(name, "dataset.category") for name in _as_names(category)]
    available = [
        check_name(name, f"dataset.category (found under {root})")
        for name in layout.categories(root)
    ]
    if not wanted:
        raise ConfigError(
            f"dataset.category is empty: name a category or 'all' "
            f"(available under {root}: {names(available)})."
        )
    if wanted == ["all"]:
        if not available:
            raise DataError(
                f"No {title(layout)} category found under {root}."
                f"{_expected(layout)}{_single_category_hint(layout, root)}"
            )
        return list(available)
    accepts = getattr(layout, "accepts", None)
    out: list[str] = []
    for name in wanted:
        hit = _match(name, available)
        if hit is None and callable(accepts) and accepts(root, name):
            hit = name
        if hit is None:
            hint_fn = getattr(layout, "category_hint", None)
            hint = (
                hint_fn(root, name)
                if callable(hint_fn)
                else f"expected a folder {root / name}"
            )
            raise DataError(
                f"{title(layout)} category '{name}' not found under {root}: {hint} "
                f"(categories found: {names(available)}).{_single_category_hint(layout, root)}"
            )
        if hit not in out:
            out.append(hit)
    return out

