"""The small interface every method implements, and the registry the runner builds from.

A method is a torch module that owns its feature extractor(s). Its lifecycle, driven by
the runner and the same for every method:

1. ``setup(context)``: what the method may need before the data that comes next (dataset,
   category and its class name for text prompts, the class names of every category it
   will see, few-shot references, device, seed, its output folder, whether to resume an
   interrupted training). The runner calls it before ``fit`` with the fitting context,
   and again before each tested category's predictions with that category's context.
2. ``fit(source)``: the images of its learning setting as a re-iterable
   :class:`~anomaly_bench.data.source.TrainSource` (one ordered pass with ``iter``, seeded
   epochs with ``source.epoch(e)``). A trained method hands it to
   :func:`anomaly_bench.training.train` and owns its train/eval modes.
3. ``predict(batch)``: image scores and anomaly maps per test batch.
4. ``finish(prediction)``: the predictions of the tested category's whole test set,
   concatenated, returned as final (the default returns them unchanged). A score formed
   over the test set (APRIL-GAN's official few-shot image score) is computed here, from
   what ``predict`` put in :attr:`~anomaly_bench.types.Prediction.extras`.

The learning setting (:data:`LEARNING`, declared when the method registers) says what
``fit`` reads: ``one_class`` (the normal training images of the fitted categories),
``zero_shot`` (nothing) or ``auxiliary`` (the annotated test images, masks included, of
another dataset's categories: APRIL-GAN's adapters). An auxiliary method is fitted once
per dataset and never tested on the images it learned from. Independently,
``method.k_shot`` > 0 gives a method few-shot references: a seeded choice of k normal
training images of the tested category, in the context before its predictions. Keys that
act only at test time (``k_shot``, ...) are declared too: a checkpoint is not checked
against them and takes them from the run. The fitted state travels through
``state_dict`` / :func:`load_fitted_state`. Nothing in the runner depends on which method
it is.

A method holds one backbone or several (MMR: a trained encoder and a frozen teacher), as
submodules that are :class:`~anomaly_bench.backbones.base.Backbone` instances. The first
one built reads the input (its normalisation and input size are the preprocessing's); it
comes from the ``backbone`` group, every further one from a backbone group under the
method's own config (``method.teacher``), declared as a role when the method registers.
The ``weights`` and ``layers`` columns name each of them (``<first> + <role>=<tag>``),
and checkpoints leave out exactly the frozen ones.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from anomaly_bench.backbones.weights import weights_tag as config_weights_tag
from anomaly_bench.configs import option_values
from anomaly_bench.data.loading import IMAGE_FILTERS, MASK_FILTERS
from anomaly_bench.data.source import TrainSource
from anomaly_bench.errors import CheckpointError, ConfigError
from anomaly_bench.ops.blur import BORDERS
from anomaly_bench.schema import TOP, Key, Schema, one_of
from anomaly_bench.types import Batch, Prediction

Config = Mapping[str, Any]
MethodFactory = Callable[[Config, Config, Config, int], "AnomalyMethod"]
Learning = str | Callable[[Config], str]
_REGISTRY: dict[str, MethodFactory] = {}
_SCHEMAS: dict[str, Schema] = {}
_LEARNING: dict[str, Learning] = {}
_TEST_TIME: dict[str, tuple[str, ...]] = {}
_ROLES: dict[str, tuple[str, ...]] = {}
#: Backbone keys that change no value a method computes (where features are cached, ...);
#: ``pretrained`` and ``weights`` are compared through the weights tag instead.
NEUTRAL_BACKBONE_KEYS = ("cache", "shared", "truncate", "pretrained", "weights", "precision")
#: Keys every method group has: the blur of its anomaly maps (sigma and border convention,
#: see :mod:`anomaly_bench.ops.blur`) and the paper's preprocessing (``resolution=paper``
#: reads ``input_size`` and ``input_crop``; the resampling filters apply at any resolution).
COMMON_KEYS: dict[str, Key] = {
    "blur_sigma": Key(float, lo=0),
    "blur_border": one_of(*BORDERS),
    "input_size": Key(int, lo=1, null=True),
    "input_crop": Key(int, lo=1, null=True),
    "input_resample": one_of(*IMAGE_FILTERS),
    "mask_resample": one_of(*MASK_FILTERS),
}


@dataclass(frozen=True)
class MethodContext:
    """What a method learns before the data that comes next (see :meth:`AnomalyMethod.setup`).

    ``category`` is the category fitted or tested (``all`` for a fit over a whole
    dataset); ``class_name`` its name as words for text prompts (``metal_nut`` -> ``metal
    nut``; empty for a whole dataset) and ``class_names`` those of every category the
    method will see in this step (each batch names its images' categories,
    :attr:`~anomaly_bench.types.Batch.categories`); ``references`` the few-shot images of
    the tested category (None unless ``k_shot`` > 0 and a category is being tested);
    ``out_dir`` the folder of this step in the run directory (a training state goes
    there); ``resume`` whether an interrupted training there continues.
    """

    dataset: str
    category: str
    class_name: str
    references: TrainSource | None
    device: torch.device
    seed: int
    out_dir: Path
    resume: bool
    class_names: Mapping[str, str] = field(default_factory=dict)


#: What ``fit`` reads: the normal training images, nothing, or another dataset's
#: annotated test images.
LEARNING = ("one_class", "zero_shot", "auxiliary")


class AnomalyMethod(nn.Module, ABC):
    """Base class: ``setup``, ``fit`` on normal images, ``predict`` scores and maps."""

    name: str = ""
    #: What ``fit`` reads: one of :data:`LEARNING` (set from the registration by
    #: :func:`build_method`).
    learning: str = "one_class"
    #: Few-shot references of the tested category in the context before its predictions
    #: (``method.k_shot``; 0 = none).
    k_shot: int = 0
    #: True when the method models each feature position (PaDiM): every image of a
    #: category must then give the same feature grid.
    fixed_grid: bool = False

    def backbones(self) -> dict[str, Backbone]:
        """The method's backbones by attribute name, in the order they were built (the
        first reads the input)."""
        return {n: m for n, m in self.named_children() if isinstance(m, Backbone)}

    @property
    def frozen(self) -> tuple[str, ...]:
        """Submodules that are never fitted (the backbones not built trainable):
        checkpoints leave them out and ``stage=test`` rebuilds them from their config and
        weights. A trained backbone is part of the fitted state."""
        return tuple(n for n, b in self.backbones().items() if not b.trainable)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """What fitting produced: ``state_dict`` without the :attr:`frozen` submodules."""
        return {k: v for k, v in self.state_dict().items()
                if k.split(".", 1)[0] not in self.frozen}

    @property
    def zero_shot(self) -> bool:
        """True when the method learns from no image (the runner gives ``fit`` none)."""
        return self.learning == "zero_shot"

    def setup(self, context: MethodContext) -> None:
        """Receive the context of what comes next: before ``fit``, and before each tested
        category's predictions (kept as ``self.context``)."""
        self.context = context

    @abstractmethod
    def fit(self, batches: Iterable[Batch]) -> None:
        """Learn the normal model from the training source (batches on the device)."""

    @abstractmethod
    def predict(self, batch: Batch) -> Prediction:
        """Image scores (B,) and anomaly maps (B, H, W) at the batch's image size."""

    def fit_bytes(self, n_images: int, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """Bytes fitting on ``n_images`` holds beyond one batch, estimated from the
        backbone's feature shapes ``{name: (C, h, w)}`` before any image is read (a lower
        bound: what the method's statistics or bank certainly hold in float32). The
        runner refuses a configuration whose memory exceeds the machine's
        (:mod:`anomaly_bench.footprint`)."""
        return 0

    def memo_bytes(self, n_fit: int, n_test: int,
                   shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """Bytes of what the method derives from its blocks and keeps in the in-process memo
        for a sweep's later jobs (``memory_cache_gb=auto`` sizes the memo with it): by
        default what fitting holds, in float64."""
        return 2 * self.fit_bytes(n_fit, shapes) if n_fit else 0

    def _tags(self, what: str) -> str:
        """``<first> + <name>=<tag> ...`` of attribute ``what`` over the backbones."""
        tags = [str(getattr(b, what, "")) for b in self.backbones().values()]
        names = list(self.backbones())
        return " + ".join([*tags[:1], *(f"{n}={t}" for n, t in zip(names[1:], tags[1:],
                                                                     strict=True))])

    def finish(self, prediction: Prediction) -> Prediction:
        """The final scores and maps of a tested category from its whole test set's
        predictions (``extras`` concatenated per key); the default changes nothing."""
        return prediction

    @property
    def weights_tag(self) -> str:
        """Which weights every backbone uses (recorded in every result row):
        ``<input backbone's tag> + <role>=<tag>`` with several."""
        return self._tags("weights_tag")

    @property
    def layers_tag(self) -> str:
        """Which blocks the backbones use, e.g. ``layer1.2+layer2.3+layer3.5`` (with
        several: ``blocks.11 + teacher=layer1.2+layer2.3+layer3.5``)."""
        return self._tags("tag")

    @property
    def required_input_size(self) -> int | None:
        """The only input size a backbone takes (a CLIP tower), or None when any works."""
        sizes = [b.fixed_size for b in self.backbones().values()
                 if getattr(b, "fixed_size", None) is not None]
        return sizes[0] if sizes else None

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the input backbone expects its input normalised with (preprocessing
        uses them: ImageNet statistics for the CNNs, CLIP's own for a CLIP tower). A method
        whose other backbones expect other statistics converts for them."""
        first = next(iter(self.backbones().values()), None)
        return (tuple(getattr(first, "mean", IMAGENET_MEAN)),
                tuple(getattr(first, "std", IMAGENET_STD)))


def register(name: str, schema: Schema, *, learning: Learning = "one_class",
             test_time: tuple[str, ...] = (),
             roles: tuple[str, ...] = ()) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator registering ``factory(method_cfg, backbone_cfg, layers_cfg, seed)``.

    ``schema`` declares the method's own keys of the ``method`` group (types and ranges,
    see :mod:`anomaly_bench.schema`); :data:`COMMON_KEYS` are added to it. ``learning`` is
    its learning setting (:data:`LEARNING`), or a function of its config when a key
    chooses it. ``test_time`` names keys that act only at test time (``k_shot``, ...):
    a checkpoint is neither checked against them nor restored with its own values.
    ``roles`` name the method's keys that are backbone groups besides ``backbone`` (MMR:
    ``teacher``); each is checked like the ``backbone`` group.
    """
    def deco(factory: MethodFactory) -> MethodFactory:
        _REGISTRY[name] = factory
        _SCHEMAS[name] = {**COMMON_KEYS, **schema, **{r: TOP["backbone"] for r in roles}}
        _LEARNING[name] = learning
        _TEST_TIME[name] = tuple(test_time)
        _ROLES[name] = tuple(roles)
        return factory

    return deco


def learning_of(method_cfg: Mapping[str, Any]) -> str:
    """The learning setting of the configured method (without building it)."""
    name = _known(method_cfg.get("name"))
    learning = _LEARNING[name]
    value = learning({**method_defaults(name), **method_cfg}) if callable(learning) \
        else learning
    assert value in LEARNING, f"{name}: learning setting {value!r} is not in {LEARNING}"
    return value


def keys_at_test(name: str) -> tuple[str, ...]:
    """Keys of method ``name`` that act only at test time."""
    return _TEST_TIME[_known(name)]


def backbone_roles(name: str) -> tuple[str, ...]:
    """Keys of method ``name`` that are backbone groups (besides the ``backbone`` group)."""
    return _ROLES[_known(name)]


def requested_weights(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
                      seed: int) -> str:
    """The ``weights`` tag of every backbone the config asks for, without building any
    (hashes local weights files): equal to the built method's :attr:`~AnomalyMethod.
    weights_tag`."""
    def tag(b: Mapping[str, Any]) -> str:
        return config_weights_tag(b["name"], b.get("hub_tag"), bool(b.get("pretrained", True)),
                                  b.get("weights"), seed, b.get("weights_url"),
                                  b.get("kind", "cnn"), bool(b.get("quick_gelu", False)))

    roles = backbone_roles(method_cfg.get("name"))
    return " + ".join([tag(backbone_cfg),
                       *(f"{r}={tag(role_config(method_cfg, backbone_cfg, r))}" for r in roles)])


def role_config(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
                role: str) -> dict[str, Any]:
    """The backbone group of ``role`` as built: ``backbone.pretrained=false`` makes every
    network of the run seeded-random, this one too (a weights file still wins)."""
    cfg = dict(method_cfg[role])
    cfg["pretrained"] = (bool(cfg.get("pretrained", True))
                         and bool(backbone_cfg.get("pretrained", True)))
    return cfg


def comparable(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method config without what changes no computed value in its backbone roles
    (cache, truncation; their weights are compared through the weights tag)."""
    roles = backbone_roles(method_cfg.get("name"))
    return {k: ({kk: vv for kk, vv in v.items() if kk not in NEUTRAL_BACKBONE_KEYS}
                if k in roles and isinstance(v, Mapping) else v)
            for k, v in method_cfg.items()}


def _known(name: Any) -> str:
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"method.name={name!r} is unknown; available: {', '.join(available())}.")
    return str(name)


def method_schema(name: str) -> Schema:
    """The declared keys of method ``name``; ConfigError listing the methods when unknown."""
    return _SCHEMAS[_known(name)]


def available() -> list[str]:
    """Names of the registered methods."""
    _import_all()
    return sorted(_REGISTRY)


def build_method(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
                 layers_cfg: Mapping[str, Any], seed: int) -> AnomalyMethod:
    """Construct the method named ``method_cfg['name']`` from the composed config.

    Keys ``method_cfg`` leaves out take the values of the method's YAML file
    (``conf/method/<name>.yaml``), the one place where defaults live, so the factories
    and constructors hold none. The instance gets its learning setting and ``k_shot``.
    """
    name = _known(method_cfg.get("name"))
    full = {**method_defaults(name), **method_cfg}
    method = _REGISTRY[name](full, backbone_cfg, layers_cfg, seed)
    method.learning = learning_of(full)
    method.k_shot = int(full.get("k_shot") or 0)
    return method


def method_defaults(name: str) -> dict[str, Any]:
    """The keys of ``conf/method/<name>.yaml`` (shared keys included) with their defaults."""
    return option_values("method", name)


def load_fitted_state(method: AnomalyMethod, state: Mapping[str, torch.Tensor],
                      source: str) -> None:
    """Load a :meth:`~AnomalyMethod.fitted_state`, allocating buffers unset before ``fit``.

    Every fitted entry must match; the frozen submodules keep the weights they were built
    with."""
    own = dict(method.named_buffers())
    for key, value in state.items():
        module_path, _, leaf = key.rpartition(".")
        module = method.get_submodule(module_path) if module_path else method
        if leaf in module._buffers and key not in own:
            module._buffers[leaf] = torch.empty_like(value)
    try:
        result = method.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.split(".", 1)[0] not in method.frozen]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {source} does not match the configured method ({first}); use the "
            "same method, backbone and layers as the run that wrote it."
        ) from exc


def _import_all() -> None:
    """Import every module of this package once; each registers its method on import."""
    import importlib
    import pkgutil

    import anomaly_bench.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "common"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
