"""Types and ranges of every config key, checked in one step before any data is read.

Defaults live in the YAML files under ``conf/``; this module says what each key may hold.
:func:`validate` walks the composed config and raises a :class:`ConfigError` naming the
first key whose value is not allowed (its value and what would be), so a typo such as
``batch_size=abc`` or ``method.reg=0`` stops the run in a second with one paragraph,
not with a traceback after minutes of fitting. A method declares the keys of its group
with :func:`~anomaly_bench.methods.base.register`; keys nobody declares are refused too,
which catches misspelt keys in presets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from anomaly_bench.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """What one key may hold: a kind, optional bounds or choices, and whether null is allowed.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``"names"`` (a name or a list of
    names) or ``"any"``. ``lo``/``hi`` are inclusive bounds, ``above``/``below`` exclusive
    ones; ``choices`` are the allowed values (besides the kind, e.g. ``auto``).
    """

    kind: Any
    null: bool = False
    lo: float | None = None
    hi: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple = ()

    def allowed(self) -> str:
        """What is allowed, in words, for the error message."""
        kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 "names": "a name or a list of names", "any": "any value"}
        if self.kind is None:
            text = " or ".join(str(c) for c in self.choices)
        else:
            text = kinds[self.kind]
            bounds = []
            if self.above is not None:
                bounds.append(f"> {self.above:g}")
            if self.lo is not None:
                bounds.append(f">= {self.lo:g}")
            if self.hi is not None:
                bounds.append(f"<= {self.hi:g}")
            if self.below is not None:
                bounds.append(f"< {self.below:g}")
            if bounds:
                text += " " + " and ".join(bounds)
            if self.choices:
                text = " or ".join(str(c) for c in self.choices) + f" or {text}"
        return text + (" or null" if self.null else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if self.choices and _in(value, self.choices):
            return True
        if self.kind is None:
            return False
        if self.kind == "any":
            return True
        if self.kind == "names":
            items = value if isinstance(value, list | tuple) else [value]
            return bool(items) and all(isinstance(v, str | int) and not isinstance(v, bool)
                                       for v in items)
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return ((self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))


def _in(value: Any, choices: tuple) -> bool:
    return any(type(value) is type(c) and value == c for c in choices)


def one_of(*choices: Any, null: bool = False) -> Key:
    """A key holding one of ``choices``."""
    return Key(None, null=null, choices=tuple(choices))


Schema = Mapping[str, "Key | Schema"]

BLOCK = Key(int, null=True)
TOP: dict[str, Any] = {
    "data_root": Key(str),
    "stage": one_of("train", "test", "train_test"),
    "checkpoint": Key(str, null=True),
    "allow_other_category": Key(bool),
    "fit_scope": one_of("category", "dataset"),
    "save_model": Key(bool, choices=("auto",)),
    "device": Key(str),
    "seed": Key(int, lo=0),
    "batch_size": Key(int, lo=1),
    "num_workers": Key(int, lo=0, choices=("auto",)),
    "resume": Key(bool),
    "memory_cache_gb": Key(float, lo=0, choices=("auto",)),
    "plots": {"enabled": Key(bool), "max_overlays": Key(int, lo=0)},
    "summary": {"metric": Key(str), "default": Key("any"), "order": one_of("rank", "sweep"),
                "columns": Key("names", null=True), "label": Key(str, null=True),
                "subset_tables": Key("names", null=True)},
    "resolution": {"size": Key(int, lo=1, null=True), "crop": Key(int, lo=1, null=True)},
    "layers": {**{f"layer{i}": BLOCK for i in range(1, 5)}, "blocks": Key("any", null=True)},
    "backbone": {"name": Key(str), "kind": one_of("cnn", "vit", "clip"),
                 "image_size": Key(int, lo=16, null=True), "quick_gelu": Key(bool),
                 "hub_tag": Key(str, null=True), "pretrained": Key(bool),
                 "weights": Key(str, null=True), "weights_url": Key(str, null=True),
                 "mean": Key("any", null=True), "std": Key("any", null=True),
                 "truncate": Key(bool), "precision": one_of("fp32", "bf16", "fp16"),
                 "cache": {"enabled": Key(bool), "dir": Key(str),
                           "max_gb": Key(float, above=0, null=True)}},
    "alignment": {"name": one_of("none", "orb90"),
                  "reference": Key("any", null=True),
                  "n_features": Key(int, lo=1), "ratio": Key(float, above=0, hi=1),
                  "min_matches": Key(int, lo=1), "max_side": Key(int, lo=16)},
    "dataset": {"name": Key(str), "root": Key(str, null=True), "dirnames": Key("any"),
                "category": Key("names"), "generator_seed": Key(int, lo=0),
                "frame_stride": Key(int, lo=1)},
}


def check(value: Any, key: str, spec: Key) -> Any:
    """``value`` if ``spec`` accepts it, else a ConfigError naming the key, value and rule."""
    if not spec.accepts(value):
        raise ConfigError(f"{key}={value!r} is not allowed: expected {spec.allowed()}.")
    return value


def check_tree(values: Mapping[str, Any], schema: Schema, prefix: str) -> None:
    """Check every key of ``values`` against ``schema`` (unknown keys are errors)."""
    for key, value in values.items():
        full = f"{prefix}{key}"
        spec = schema.get(key)
        if spec is None:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{full} is not a known key (known here: {known}).")
        if isinstance(spec, Key):
            check(value, full, spec)
        elif not isinstance(value, Mapping):
            raise ConfigError(f"{full}={value!r} is not allowed: expected a group of keys "
                              f"({', '.join(sorted(spec))}).")
        else:
            check_tree(value, spec, f"{full}.")


def validate(cfg: Mapping[str, Any], method_schema: Schema) -> None:
    """Check the composed config (a plain resolved dict) against the schemas.

    Raises ConfigError for the first key that holds a value it may not, including keys
    that belong to no schema, and for a crop larger than the resize.
    """
    check_tree({k: v for k, v in cfg.items() if k != "method"}, TOP, "")
    check_tree(cfg.get("method", {}), {"name": Key(str), **method_schema}, "method.")
    res = cfg.get("resolution", {})
    size, crop = res.get("size"), res.get("crop")
    if size is not None and crop is not None and crop > size:
        raise ConfigError(f"resolution.crop={crop} is larger than resolution.size={size}: "
                          "the centre crop must fit inside the resized image.")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested mapping."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: Keys named first when two configurations differ (what a reader recognises first).
_LEADING = ("method.name", "backbone.name", "weights", "dataset", "dataset.name", "category",
            "seed", "stage")


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, a's value, b's value)`` of every leaf where two configurations differ.

    Leading keys (method and backbone name, weights, dataset, category, seed) come first,
    then the rest in name order. Tuples equal lists, as they do once stored as JSON.
    """
    def norm(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(tree).items()}

    fa, fb = norm(a), norm(b)
    keys = [k for k in _LEADING if k in fa or k in fb]
    keys += sorted((set(fa) | set(fb)) - set(keys))
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]
