"""Runs one experiment: for each selected category fit, score, evaluate and report.

The runner only talks to the generic interfaces: a dataset layout, an
:class:`~anomaly_bench.methods.AnomalyMethod`, the metrics and the report writers.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from anomaly_bench import checkpoint, footprint, memo_budget
from anomaly_bench.data import (
    Preprocess,
    denormalize,
    ensure_synthetic,
    get_layout,
    image_sizes,
    make_loader,
    resolve_categories,
    resolve_root,
)
from anomaly_bench.data.source import TrainSource
from anomaly_bench.data.views import DrawnViews, TrainView
from anomaly_bench.errors import AnomalyBenchError, ConfigError, OutputError
from anomaly_bench.fsutil import atomic_open, describe
from anomaly_bench.memo import MEMO, file_stamp
from anomaly_bench.methods import (
    AnomalyMethod,
    MethodContext,
    build_method,
    comparable,
    learning_of,
    method_defaults,
    method_schema,
    requested_weights,
)
from anomaly_bench.metrics import METRIC_NAMES, compute_metrics
from anomaly_bench.paths import check_name, inside
from anomaly_bench.report import plots
from anomaly_bench.report.results import (
    completed_categories,
    format_value,
    record_digest,
    rows_by_category,
    to_cell,
    write_rows,
)
from anomaly_bench.runtime import (
    PeakMemory,
    Stopwatch,
    loader_workers,
    release,
    resolve_device,
    seed_everything,
)
from anomaly_bench.schema import differences, validate
from anomaly_bench.types import Batch, CategorySplit, Prediction, SampleRecord

log = logging.getLogger("anomaly_bench")
#: Per category: the resolved configuration its results.csv row stands for.
JOB_CONFIG = "config.json"


@dataclass
class Outputs:
    """Everything predicted for one category's test set (kept on the device)."""

    scores: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor | None
    paths: list[str]
    defect_types: list[str]
    rotations: torch.Tensor


@dataclass
class Fitted:
    """A method ready to test: fitted in this run, or restored from a checkpoint."""

    method: AnomalyMethod
    weights: str
    preprocess: Preprocess
    n_train: int | None  # images fit read in this run (None: restored from a checkpoint)
    train_s: float | None
    peak_mb: float  # peak memory while fitting (0 when restored)


def resolution_tag(res: dict[str, Any]) -> str:
    """``256/224`` (resize/crop), ``256`` (resize only) or ``native``."""
    size, crop = res.get("size"), res.get("crop")
    if size is None and crop is None:
        return "native"
    return f"{size or 'native'}/{crop}" if crop else str(size)


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset folder: ``dataset.root`` or the first matching folder under ``data_root``."""
    ds = cfg.dataset
    if ds.name == "synthetic":
        root = Path(ds.root or Path(cfg.data_root) / ds.dirnames[0]).expanduser()
        return ensure_synthetic(root, seed=int(ds.get("generator_seed", 0)))
    if ds.name == "folder" and not ds.root:
        raise ConfigError(
            "dataset=folder needs dataset.root=PATH, a folder with train/good, test/good, "
            "test/<defect> and optionally ground_truth/<defect>."
        )
    return resolve_root(ds.name, ds.root, cfg.data_root, list(ds.dirnames))


class Runner:
    """One configured experiment over one or more categories, writing into ``run_dir``."""

    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (),
                 sweep: bool = False) -> None:
        """``sweep``: the job is one of a multirun (``memory_cache_gb=auto`` then keeps the
        in-process memo on; a single run gains nothing from it)."""
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # an interpolation that cannot be resolved
            raise ConfigError(f"the configuration cannot be resolved: {exc}") from None
        validate(plain, method_schema(str(cfg.method.name)))  # type: ignore[arg-type]
        self.cfg = cfg
        self._resolved: dict[str, Any] = plain  # type: ignore[assignment]
        self._weights: str | None = None
        self.run_dir = Path(run_dir)
        self.overrides = " ".join(overrides)
        self.device = resolve_device(cfg.device)
        self.num_workers = loader_workers(cfg.get("num_workers", 0), self.device)
        budget = cfg.get("memory_cache_gb", "auto")
        # auto in a sweep: sized for each fit's work and the machine (_check_memory)
        self._memo_auto = budget == "auto" and sweep
        if not self._memo_auto:
            MEMO.configure(int(float(0 if budget == "auto" else budget) * 2**30))
        self.results_path = self.run_dir / "results.csv"
        self.transform: Any = None  # loader hook of the current category's alignment
        self.reused: list[str] = []  # categories skipped: finished before (resume)

    def _section(self, key: str) -> dict[str, Any]:
        """A resolved top-level section of the configuration, as plain data (a copy the
        caller may change)."""
        return copy.deepcopy(self._resolved[key])

    # ------------------------------------------------------------------ orchestration
    def run(self) -> list[dict[str, Any]]:
        """Fit and test every selected category; the rows written (none for stage=train).

        One code path for both fit scopes: a model fitted per category (the default), or
        one model fitted on every selected category at once (``fit_scope=dataset``, and
        always for a method learning from an auxiliary dataset), tested on each category.
        """
        cfg = self.cfg
        layout = get_layout(cfg.dataset.name)
        if hasattr(layout, "configure"):  # layouts with options of their own (e.g. STC)
            layout = layout.configure(self._section("dataset"))
        self.layout = layout
        root = dataset_root(cfg)
        categories = resolve_categories(layout, root, cfg.dataset.category)
        for category in categories:  # folder names the run directory's filesystem takes
            check_name(category, "dataset.category", self.run_dir)
        splits = [layout.split(root, c) for c in categories]
        learning = learning_of(self._section("method"))
        whole = cfg.fit_scope == "dataset" or learning == "auxiliary"
        self._check_setting(learning, whole, splits)
        done = completed_categories(self.results_path) if cfg.resume else set()
        todo = []
        for split in splits:
            if split.category in done and cfg.stage != "train":
                self._check_resumable(split.category, root)
                log.info("%s: already in %s with this configuration, skipped (resume=true)",
                         split.category, self.results_path)
                self.reused.append(split.category)
                continue
            todo.append(split)
        tested = todo if cfg.stage != "train" else []
        rows = []
        if whole and (tested or cfg.stage == "train"):
            fitted = self._fitted(splits, tested, learning, len(categories), whole=True)
            rows = [self._test(fitted, split, root) for split in tested]
        elif not whole:
            for split in todo:
                fitted = self._fitted([split], [split] if tested else [], learning,
                                      len(categories), whole=False)
                if tested:
                    rows.append(self._test(fitted, split, root))
                del fitted
                release(self.device)  # the next category (or job) starts with the GPU free
        release(self.device)
        if rows:
            if len(rows) > 1:
                means = {k: _mean([r[k] for r in rows]) for k in METRIC_NAMES}
                log.info("mean over %d categories: image AUROC %s, pixel AUROC %s, AUPRO %s, "
                         "%.1f ms/image", len(rows), _fmt(means["image_auroc"]),
                         _fmt(means["pixel_auroc"]), _fmt(means["aupro"]),
                         _mean([r["ms_per_image"] for r in rows]) or 0.0)
            log.info("run directory: %s (results.csv)", self.run_dir)
        return rows

    def _check_setting(self, learning: str, whole: bool, splits: list[CategorySplit]) -> None:
        """Refuse, before any image is read, what the learning setting and scope cannot do."""
        cfg = self.cfg
        method = cfg.method.name
        if learning == "auxiliary" and cfg.stage == "train_test":
            raise ConfigError(
                f"method={method} learns from the annotated test images of another dataset "
                "(the auxiliary setting), so it is never tested on the data it was trained on: "
                f"train it with stage=train dataset=<A>, then test it with stage=test "
                "checkpoint=<that run directory> dataset=<B> (e.g. A=visa, B=mvtec)."
            )
        if learning == "auxiliary" and cfg.stage == "train":
            bare = [s.category for s in splits if not s.has_masks]
            if bare:
                raise ConfigError(
                    f"method={method} trains on annotated test images (pixel masks), but "
                    f"{splits[0].dataset} has no masks for {', '.join(bare[:5])}: train it on a "
                    "dataset with ground-truth masks (e.g. mvtec or visa)."
                )
        if whole and cfg.alignment.name != "none":
            why = ("fit_scope=dataset fits" if cfg.fit_scope == "dataset"
                   else f"method={method} (auxiliary setting) fits")
            raise ConfigError(f"{why} one model on every category, but alignment="
                              f"{cfg.alignment.name} aligns each category to its own "
                              "reference: use alignment=none.")
        k = int(cfg.method.get("k_shot") or 0)
        if k and cfg.stage != "train":
            short = [s for s in splits if len(s.train) < k]
            if short:
                s = short[0]
                raise ConfigError(
                    f"method.k_shot={k} asks for {k} reference images, but {s.dataset}/"
                    f"{s.category} has {len(s.train)} training images: choose "
                    f"method.k_shot <= {len(s.train)}."
                )

    def _fitted(self, splits: list[CategorySplit], tested: list[CategorySplit], learning: str,
                n_categories: int, whole: bool) -> Fitted:
        """The model to test ``tested`` with: fitted on ``splits`` (one category, or every
        category of ``whole`` dataset) by the learning setting, or restored from
        ``checkpoint`` at stage=test (a whole-dataset model may come from another dataset)."""
        cfg = self.cfg
        model_cfg = {k: self._section(k) for k in checkpoint.MODEL_KEYS}
        dataset = splits[0].dataset
        name = "all" if whole else splits[0].category
        out_dir = self.run_dir if whole else inside(self.run_dir, self.run_dir / name)
        seed_everything(int(cfg.seed))
        self.transform = None
        if cfg.stage == "test":
            ckpt = checkpoint.locate(cfg.checkpoint, None if whole else name, n_categories)
            payload = checkpoint.load(ckpt)
            wanted = {"weights": self.requested_weights()}
            if not whole:
                wanted.update(dataset=dataset, category=name)
            checkpoint.check_matches(payload, ckpt, model_cfg, wanted,
                                     whole or bool(cfg.get("allow_other_category", False)),
                                     whole)
            if learning == "auxiliary":
                checkpoint.check_unseen(payload, ckpt, dataset, [s.category for s in tested])
            method = checkpoint.restore(payload, ckpt, model_cfg["backbone"], model_cfg["method"])
            weights = payload["meta"]["weights"]
            log.info("%s: loaded %s (fitted on %s/%s)", name, ckpt, payload["meta"]["dataset"],
                     payload["meta"]["category"])
            records = []
        else:
            method = build_method(model_cfg["method"], model_cfg["backbone"],
                                  model_cfg["layers"], int(cfg.seed))
            weights = method.weights_tag
            records = [dataclasses.replace(r, category=s.category) for s in splits
                       for r in (s.test if learning == "auxiliary" else s.train)
                       if learning != "zero_shot"]
        method = method.to(self.device)
        preprocess = self._preprocess(method, model_cfg)
        self._check_memory(method, records, tested, preprocess)
        refs = [r for s in tested for r in s.train] if cfg.method.get("k_shot") else []
        self._check_sizes(method, records + [r for s in tested for r in s.test] + refs,
                          preprocess, name)
        if not whole:
            self.transform = self._alignment(model_cfg["alignment"], splits[0])
        if cfg.stage == "test":
            return Fitted(method, weights, preprocess, None, None, 0.0)
        source = self._source(records, preprocess, learning == "auxiliary", model_cfg["method"],
                              getattr(method, "augment", None), name,
                              getattr(method, "train_view", None))
        method.setup(MethodContext(
            dataset=dataset, category=name, class_name="" if whole else self._words(name),
            references=None, device=self.device, seed=int(cfg.seed), out_dir=out_dir,
            resume=bool(cfg.resume), class_names={s.category: self._words(s.category)
                                                  for s in splits}))
        watch = Stopwatch(self.device)
        with PeakMemory(self.device) as peak, watch:
            method.fit(source)
        if self._save_model():
            meta = {**self._describe(method, model_cfg, dataset, name),
                    "categories": [s.category for s in splits]}
            path = checkpoint.save(inside(self.run_dir, out_dir / "model.pt"), method,
                                   model_cfg, meta)
            log.info("%s: model saved to %s", name, path)
        return Fitted(method, weights, preprocess, len(source), watch.seconds, peak.peak_mb)

    def _describe(self, method: AnomalyMethod, model_cfg: dict[str, Any], dataset: str,
                  category: str) -> dict[str, Any]:
        """What a model is and was fitted on: the leading columns of its rows and the
        description of its checkpoint."""
        return {"method": model_cfg["method"]["name"], "backbone": model_cfg["backbone"]["name"],
                "weights": method.weights_tag, "dataset": dataset, "category": category,
                "layers": method.layers_tag, "resolution": resolution_tag(model_cfg["resolution"]),
                "alignment": model_cfg["alignment"]["name"], "seed": int(self.cfg.seed)}

    def _words(self, category: str) -> str:
        """The category as words for text prompts (the layout's own names where it has them)."""
        named = getattr(self.layout, "class_name", None)
        return named(category) if callable(named) else category.replace("_", " ")

    def job_config(self, root: Path, category: str) -> dict[str, Any]:
        """The resolved configuration one results row stands for; resume compares it.

        Everything that can change a computed value is in it (method, backbone and its
        weights, layers, resolution, alignment, seed, dataset with its folder and
        options, category, stage and the checkpoint file); what only changes how fast or
        where (device, batch size, cache, plots) is not.
        """
        cfg = self.cfg
        model = {k: self._section(k) for k in checkpoint.MODEL_KEYS}
        for key in ("cache", "shared", "truncate"):
            model["backbone"].pop(key, None)
        if model["backbone"].get("precision") == "fp32":  # the default, as rows before it
            model["backbone"].pop("precision")
        model["method"] = comparable(model["method"])
        dataset = {k: v for k, v in self._section("dataset").items()
                   if k not in ("category", "root", "dirnames")}
        ckpt = None
        if cfg.stage == "test" and cfg.checkpoint:
            p = Path(str(cfg.checkpoint)).expanduser()
            st = p.stat() if p.exists() else None
            ckpt = [str(p.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None]
        return {**model, "weights": self.requested_weights(), "seed": int(cfg.seed),
                "fit_scope": str(cfg.fit_scope),
                "dataset": {**dataset, "root": str(Path(root).resolve())},
                "category": category, "stage": str(cfg.stage), "checkpoint": ckpt}

    def requested_weights(self) -> str:
        """The weights tag of every backbone the config asks for (hashes a local weights
        file once)."""
        if self._weights is None:
            self._weights = requested_weights(self._section("method"),
                                              self._section("backbone"), int(self.cfg.seed))
        return self._weights

    def _check_resumable(self, category: str, root: Path) -> None:
        """Allow skipping a finished category only when its row has this configuration.

        The row's ``record_sha256`` must be the digest of the category's config.json and
        scores.csv as they are now (rows written before that column: config.json alone),
        so files left by a run that failed before writing its row never vouch for an
        older row.
        """
        path = self.run_dir / category / JOB_CONFIG
        wanted = self.job_config(root, category)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        digest = rows_by_category(self.results_path)[category].get("record_sha256")
        if digest:
            try:
                scores = (self.run_dir / category / "scores.csv").read_bytes()
            except OSError:
                scores = None
            if scores is None or not isinstance(stored, dict) \
                    or record_digest(stored, scores) != digest:
                raise ConfigError(
                    f"{self.results_path} holds a row for category {category} that its files "
                    f"{path} and scores.csv do not match (a later run stopped before writing "
                    "its row, or the files were changed), so what the row stands for is "
                    "unknown. resume=true only skips rows whose files match: pass "
                    "resume=false to recompute that category and replace its row, or run "
                    "into a new directory."
                )
        if isinstance(stored, dict) and isinstance(stored.get("method"), dict) \
                and stored["method"].get("name") == wanted["method"]["name"]:
            # a method key added since the row was written: its default is what ran
            stored["method"] = {**method_defaults(wanted["method"]["name"]), **stored["method"]}
        diff = differences(stored, wanted) if isinstance(stored, dict) else None
        if diff == []:
            return
        what = ("its configuration differs ("
                + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:4])
                + (f"; {len(diff) - 4} more" if len(diff) > 4 else "") + ")"
                if diff else f"its configuration is unknown ({path} is missing or unreadable)")
        raise ConfigError(
            f"{self.results_path} already holds a result for category {category} and "
            f"{what}. resume=true only skips categories finished with the same configuration: "
            "run into a new directory (the default outputs/<date>/<time>), or pass "
            "resume=false to recompute that category and replace its row."
        )

    def _test(self, fitted: Fitted, split: CategorySplit, root: Path) -> dict[str, Any]:
        """Score, evaluate and write the results of one category with a fitted model."""
        cfg = self.cfg
        cat_dir = inside(self.run_dir, self.run_dir / split.category)
        seed_everything(int(cfg.seed))
        method = fitted.method
        refs = self._references(method, split, fitted.preprocess)
        method.setup(MethodContext(
            dataset=split.dataset, category=split.category,
            class_name=self._words(split.category), references=refs, device=self.device,
            seed=int(cfg.seed), out_dir=cat_dir, resume=bool(cfg.resume),
            class_names={split.category: self._words(split.category)}))
        model_cfg = {k: self._section(k) for k in checkpoint.MODEL_KEYS}
        row: dict[str, Any] = {**self._describe(method, model_cfg, split.dataset,
                                                split.category), "weights": fitted.weights}
        with PeakMemory(self.device) as peak:
            outputs, test_s = self._predict(method.eval(), split, fitted.preprocess)
        metrics = compute_metrics(outputs.scores, outputs.labels, outputs.maps, outputs.masks)
        row.update({
            **{k: metrics.get(k) for k in METRIC_NAMES},
            "n_train": (None if fitted.n_train is None
                        else fitted.n_train + (len(refs) if refs is not None else 0)),
            "n_test": len(split.test),
            "train_s": fitted.train_s,
            "test_s": test_s,
            "ms_per_image": 1000 * test_s / max(len(split.test), 1),
            "peak_mem_mb": max(fitted.peak_mb, peak.peak_mb),
            "device": str(self.device),
            "overrides": self.overrides,
        })
        subset_rows = self._subset_rows(split, outputs, row)
        self._save_results(cat_dir, outputs, [row, *subset_rows], root)
        log.info("%s: image AUROC %s, pixel AUROC %s, AUPRO %s, %.1f ms/image",
                 split.category, _fmt(row["image_auroc"]), _fmt(row["pixel_auroc"]),
                 _fmt(row["aupro"]), row["ms_per_image"])
        if cfg.plots.enabled:  # optional: a failure costs the figures, never the results
            try:
                self._plots(cat_dir, outputs, split, fitted.preprocess, row)
            except Exception as exc:  # any plotting failure is only a warning
                log.warning("%s: plots not written (%s: %s); results.csv and scores.csv were",
                            split.category, type(exc).__name__, exc)
        return row

    def _subset_rows(self, split: CategorySplit, out: Outputs,
                     row: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per declared test subset (``<category>/<subset>``): the category's row
        with the metrics and image count of that subset's test images alone."""
        rows = []
        for name in split.subsets:
            pick = [i for i, r in enumerate(split.test) if r.subset == name]
            if not pick:
                continue
            idx = torch.as_tensor(pick, device=out.scores.device)
            metrics = compute_metrics(
                out.scores[idx], out.labels[idx], out.maps[idx],
                out.masks[idx] if out.masks is not None else None)
            rows.append({**row, **{k: metrics.get(k) for k in METRIC_NAMES},
                         "category": f"{split.category}/{name}", "n_test": len(pick),
                         "test_s": None})
        return rows

    def _save_results(self, cat_dir: Path, outputs: Outputs, rows: list[dict[str, Any]],
                      root: Path) -> None:
        """scores.csv, the rows' configuration, then the results.csv rows (the category's
        first, in one write) carrying the digest of both files (``record_sha256``), so a
        row is only ever read with the files it was computed with. Nothing computed is
        lost silently: when the run directory cannot take them, the error carries the
        category's row itself."""
        row = rows[0]
        try:
            scores = self._write_scores(cat_dir, outputs)
            config = self.job_config(root, row["category"])
            with atomic_open(inside(self.run_dir, cat_dir / JOB_CONFIG), "w") as fh:
                json.dump(config, fh, indent=1, sort_keys=True)
            digest = record_digest(config, scores)
            write_rows(inside(self.run_dir, self.results_path),
                       [{**r, "record_sha256": digest} for r in rows])
        except (OSError, AnomalyBenchError) as exc:
            values = ", ".join(f"{k}={format_value(k, v)}" for k, v in row.items()
                               if k != "overrides")
            why = describe(exc) if isinstance(exc, OSError) else str(exc)
            raise OutputError(
                f"cannot write the results of category {row['category']} into {cat_dir} or "
                f"{self.results_path}: {why}. The computed row was: {values}."
            ) from None

    def _check_sizes(self, method: AnomalyMethod, records: list[SampleRecord],
                     preprocess: Preprocess, where: str) -> None:
        """Refuse image sizes the backbone (one fixed input size) or, at native
        resolution, the method or a batch (one size for all images) cannot take.

        Read from the image headers of ``records`` (every image the model will see in
        this run) before anything is fitted: a method that models each position
        (``fixed_grid``) needs one grid for all images, and a batch stacks images of one
        size. ``where`` names them in the message (a category, or ``all``).
        """
        need = method.required_input_size
        if need is not None and (preprocess.crop or preprocess.size) != need:
            raise ConfigError(
                f"backbone {self.cfg.backbone.name} takes {need} px images but resolution="
                f"{resolution_tag({'size': preprocess.size, 'crop': preprocess.crop})} gives "
                f"others: set resolution.size={need} resolution.crop=null (or "
                f"backbone.image_size to the size you want)."
            )
        if preprocess.size is not None or preprocess.crop is not None:
            return  # every image is resized or cropped to one size
        sizes = image_sizes(list(dict.fromkeys(r.image_path for r in records)))
        if len(sizes) < 2 or not (method.fixed_grid or int(self.cfg.batch_size) > 1):
            return
        listed = "; ".join(f"{w}x{h}: {len(p)} images (e.g. {p[0]})"
                           for (w, h), p in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        why = (f"{method.name} models every feature position, so all images need one size"
               if method.fixed_grid else
               f"batch_size={self.cfg.batch_size} stacks images of one size (batch_size=1 "
               "would take them one by one)")
        raise ConfigError(
            f"resolution=native but the images of {self.cfg.dataset.name}/{where} have "
            f"{len(sizes)} sizes ({listed}); {why}. Set resolution.size (e.g. resolution=r256 "
            "or resolution=paper) so that they are resized to one size."
        )

    def _check_memory(self, method: AnomalyMethod, fit_records: list[SampleRecord],
                      tested: list[CategorySplit], preprocess: Preprocess) -> None:
        """Refuse a configuration that needs more memory than the device has
        (:mod:`anomaly_bench.footprint`), before any image is read: fitting on
        ``fit_records``, then testing each split of ``tested`` in turn. The input size is
        the crop or resize, or at native resolution the largest image header."""
        cfg = self.cfg
        backbones = method.backbones()
        if not backbones:
            return
        side = preprocess.crop or preprocess.size
        if side is not None:
            w = h = int(side)
        else:
            records = fit_records + [r for s in tested for r in s.test]
            sizes = image_sizes([r.image_path for r in records])
            if not sizes:
                return
            w, h = max(sizes, key=lambda s: s[0] * s[1])
        shapes = {}  # every backbone's features (several: prefixed with their role)
        for i, (role, bb) in enumerate(backbones.items()):
            own = footprint.feature_shapes(bb.channels, bb.strides, (h, w))
            shapes.update(own if i == 0 else {f"{role}.{k}": v for k, v in own.items()})
        n_fit = len(fit_records)
        n_test = max((len(s.test) for s in tested), default=0)
        fp = footprint.estimate(shapes, (h, w), int(cfg.batch_size),
                                method.fit_bytes(n_fit, shapes) if n_fit else 0, n_test,
                                any(s.has_masks for s in tested))
        if self._memo_auto:  # the memo of a sweep job: its own work, its share of the host
            images = {r.image_path for r in fit_records} | {r.image_path for s in tested
                                                            for r in s.test + s.train}
            extractor = next(iter(backbones.values()))  # the one reading the input
            memo = memo_budget.auto(len(images), (h, w), extractor.memo_blocks(),
                                    extractor.cache is not None,
                                    method.memo_bytes(n_fit, n_test, shapes), fp.total,
                                    len(extractor.channels))
            MEMO.configure(memo.bytes)
            log.info("memory_cache_gb=auto: %.2f GiB (this job's work %.2f GiB, its share of "
                     "the machine %s)", memo.bytes / 2**30, memo.work / 2**30,
                     "unknown" if memo.share is None else f"{memo.share / 2**30:.2f} GiB")
        size, crop = (("null" if v is None else v) for v in (preprocess.size, preprocess.crop))
        footprint.check(fp, self.device, {
            "inputs": f"for one batch of batch_size={cfg.batch_size} images of {w}x{h} px "
                      f"(resolution.size={size}, resolution.crop={crop})",
            "features": f"for the backbone features of that batch ({method.layers_tag}: "
                        "layers.*)",
            "method": f"for what {method.name} holds while fitting on {n_fit} images "
                      "(method.* keys)",
            "maps": f"for the anomaly maps of the {n_test} test images at {w}x{h} px",
        })

    def _alignment(self, cfg: dict[str, Any], split: CategorySplit) -> Any:
        """The loader hook rotating images and masks as the alignment decides, or None."""
        if cfg.get("name", "none") == "none":
            return None
        from anomaly_bench.alignment.hook import rotation_hook
        from anomaly_bench.alignment.orb import build_aligner

        paths = [r.image_path for r in split.train + split.test]
        try:  # the jobs of a sweep in one process align once
            ref = cfg.get("reference")
            ref_file = Path(str(ref)).expanduser() if isinstance(ref, str) else None
            key: tuple | None = (
                "align", repr(sorted(cfg.items())), tuple(file_stamp(p) for p in paths),
                file_stamp(ref_file) if ref_file is not None and ref_file.is_file() else None)
        except OSError:
            key = None  # a missing file: alignment itself reports it
        result = MEMO.get(key) if key is not None else None
        if result is None:
            aligner = build_aligner(cfg, [r.image_path for r in split.train])
            if aligner is None:
                return None
            result = aligner.align_all(paths, desc=f"align {split.category}")
            if key is not None:
                MEMO.put(key, result)
        n_turned = sum(1 for k in result.rotations.values() if k % 4)
        log.info("%s: alignment turned %d of %d images", split.category, n_turned, len(paths))
        if result.fallbacks:
            log.warning("%s: %d of %d images had too few ORB matches and were not rotated",
                        split.category, len(result.fallbacks), len(paths))
        return rotation_hook(result.rotations)

    def _save_model(self) -> bool:
        flag = self.cfg.save_model
        if isinstance(flag, str) and flag == "auto":
            return self.cfg.stage == "train"
        return bool(flag)

    # ------------------------------------------------------------------ data and scoring
    def _preprocess(self, method: AnomalyMethod, model_cfg: dict[str, Any]) -> Preprocess:
        """The resolution config with the backbone's statistics and the method's filters."""
        mean, std = method.normalisation
        filters = {**method_defaults(model_cfg["method"]["name"]), **model_cfg["method"]}
        return Preprocess(size=model_cfg["resolution"].get("size"),
                          crop=model_cfg["resolution"].get("crop"), mean=mean, std=std,
                          resample=filters["input_resample"],
                          mask_resample=filters["mask_resample"])

    def _batches(self, records: list[SampleRecord], preprocess: Preprocess, with_masks: bool,
                 desc: str, view: DrawnViews | None = None,
                 batch_size: int | None = None) -> Iterator[Batch]:
        """Device batches of ``records``; through a training view, the view gives each
        image its final size (preprocessing then only normalises) and masks are not read."""
        transform = self.transform
        if view is not None:
            transform = dataclasses.replace(view, before=self.transform)
            preprocess = dataclasses.replace(preprocess, size=None, crop=None)
            with_masks = False
        loader = make_loader(records, preprocess, int(batch_size or self.cfg.batch_size),
                             self.num_workers, with_masks=with_masks,
                             transform_pil=transform,
                             pin_memory=self.device.type == "cuda")
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            yield batch.to(self.device)

    def _source(self, records: list[SampleRecord], preprocess: Preprocess, with_masks: bool,
                method_cfg: dict[str, Any], augment: Any, name: str,
                view: TrainView | None = None) -> TrainSource:
        """``records`` as a re-iterable source of device batches (seeded epochs, optional
        validation split and training batch size from the method's ``train`` group, its
        augmentation hook and its training view; a view without a size takes the test
        images' size)."""
        if view is not None and getattr(view, "size", 0) is None:
            side = preprocess.crop or preprocess.size
            if side is None:
                raise ConfigError(
                    f"method={method_cfg.get('name')} crops its training images to the test "
                    "images' size, but resolution is native: set resolution.size (e.g. "
                    "resolution=paper) or the method's train_size.")
            view = dataclasses.replace(view, size=int(side))
        train = method_cfg.get("train") or {}
        return TrainSource(
            records, lambda recs, what, view=None: self._batches(
                recs, preprocess, with_masks, f"{what} {name}", view, train.get("batch_size")),
            seed=int(self.cfg.seed), val_fraction=float(train.get("val_fraction", 0.0)),
            augment=augment, view=view)

    def _references(self, method: AnomalyMethod, split: CategorySplit,
                    preprocess: Preprocess) -> TrainSource | None:
        """A seeded choice of ``method.k_shot`` normal training images of the tested
        category (few-shot references), or None."""
        if not method.k_shot:
            return None
        records = [dataclasses.replace(r, category=split.category) for r in split.train]
        return self._source(records, preprocess, False, {}, None,
                            split.category).choose(method.k_shot)

    def _predict(self, method: AnomalyMethod, split: CategorySplit,
                 preprocess: Preprocess) -> tuple[Outputs, float]:
        watch = Stopwatch(self.device)
        preds, labels, masks, paths, defects, turns = [], [], [], [], [], []
        for batch in self._batches(split.test, preprocess, split.has_masks,
                                   f"test {split.category}"):
            with watch:
                preds.append(method.predict(batch))
            labels.append(batch.labels)
            if batch.masks is not None:
                masks.append(batch.masks[:, 0] > 0.5)
            paths += batch.paths
            defects += batch.defect_types
            turns.append(batch.rotations if batch.rotations is not None
                         else torch.zeros(len(batch.paths), dtype=torch.long))
        with watch:  # the method's step over the whole test set
            final = method.finish(Prediction(
                image_scores=torch.cat([p.image_scores for p in preds]),
                anomaly_maps=torch.cat([p.anomaly_maps for p in preds]),
                extras={k: torch.cat([p.extras[k] for p in preds]) for k in preds[0].extras}))
        out = Outputs(
            scores=final.image_scores, labels=torch.cat(labels), maps=final.anomaly_maps,
            masks=torch.cat(masks) if masks and split.has_masks else None,
            paths=paths, defect_types=defects, rotations=torch.cat([t.cpu() for t in turns]),
        )
        return out, watch.seconds

    # ------------------------------------------------------------------ outputs
    def _write_scores(self, cat_dir: Path, out: Outputs) -> bytes:
        """Per-image scores (path, label, defect type, score) for later analysis; the
        bytes written (the row's digest covers them)."""
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["path", "label", "defect_type", "score"])
        for p, lab, d, s in zip(out.paths, out.labels.tolist(), out.defect_types,
                                out.scores.tolist(), strict=True):
            w.writerow([to_cell(p), lab, to_cell(d), repr(float(s))])
        data = text.getvalue().encode("utf-8", "surrogateescape")
        with atomic_open(inside(self.run_dir, cat_dir / "scores.csv"), "wb") as fh:
            fh.write(data)
        return data

    def _plots(self, cat_dir: Path, out: Outputs, split: CategorySplit,
               preprocess: Preprocess, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        scores = out.scores.float().cpu().numpy()
        labels = out.labels.cpu().numpy()
        title = f"{row['method']} · {split.dataset}/{split.category}"
        pdir = inside(self.run_dir, cat_dir / "plots")
        plots.plot_roc(pdir / "roc.png", scores, labels, title)
        plots.plot_score_histogram(pdir / "score_hist.png", scores, labels, title)
        plots.plot_score_scatter(pdir / "score_scatter.png", scores, labels, title)
        pick = _overlay_selection(labels, int(self.cfg.plots.max_overlays))
        if pick.size:
            records = [split.test[i] for i in pick]
            loader = make_loader(records, preprocess, len(records), 0, with_masks=split.has_masks,
                                 transform_pil=self.transform)
            batch = next(iter(loader))
            images = denormalize(batch.images, preprocess)
            maps = out.maps[torch.as_tensor(pick, device=out.maps.device)].float().cpu().numpy()
            masks = (out.masks[torch.as_tensor(pick, device=out.masks.device)].cpu().numpy()
                     if out.masks is not None else None)
            # show every image in its original orientation: undo the alignment's turns
            for j, k in enumerate(out.rotations[pick].tolist()):
                if k:
                    images[j] = np.rot90(images[j], -k)
                    maps[j] = np.rot90(maps[j], -k)
                    if masks is not None:
                        masks[j] = np.rot90(masks[j], -k)
            vmin, vmax = float(out.maps.min()), float(out.maps.max())
            titles = [f"{out.defect_types[i]} · {scores[i]:.3g}" for i in pick]
            plots.plot_overlay_grid(pdir / "overlays.png", images, maps, masks, titles, vmin, vmax,
                                    title=title)
        log.debug("%s: plots in %.1fs", split.category, time.perf_counter() - t0)


def _overlay_selection(labels: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` test indices: anomalous ones first (3/4), then normal ones, evenly spaced."""
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_anom = min(len(anomalous), max(k - min(len(normal), k // 4), 0))
    n_norm = min(len(normal), k - n_anom)
    take = [a[np.linspace(0, len(a) - 1, n).round().astype(int)] if n else a[:0]
            for a, n in ((anomalous, n_anom), (normal, n_norm))]
    return np.concatenate(take)


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values (None when there are none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
