"""Runs one experiment: for each selected category fit, score, evaluate and report.

The runner only talks to the generic interfaces: a dataset layout, an
:class:`~anomaly_bench.methods.AnomalyMethod`, the metrics and the report writers.
"""

from __future__ import annotations

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

from anomaly_bench import checkpoint
from anomaly_bench.data import (
    Preprocess,
    denormalize,
    ensure_synthetic,
    get_layout,
    make_loader,
    resolve_categories,
    resolve_root,
)
from anomaly_bench.errors import ConfigError
from anomaly_bench.memo import MEMO, file_stamp
from anomaly_bench.methods import AnomalyMethod, build_method
from anomaly_bench.metrics import compute_metrics
from anomaly_bench.report import plots
from anomaly_bench.report.results import completed_categories, write_row
from anomaly_bench.runtime import PeakMemory, Stopwatch, resolve_device, seed_everything
from anomaly_bench.types import Batch, CategorySplit

log = logging.getLogger("anomaly_bench")
STAGES = ("train", "test", "train_test")
#: In-process memo budget (GiB) of a multirun job with ``memory_cache_gb=auto``.
SWEEP_MEMO_GB = 4


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


def _plain(cfg: DictConfig, key: str) -> dict[str, Any]:
    return OmegaConf.to_container(cfg[key], resolve=True)  # type: ignore[return-value]


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
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}.")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = " ".join(overrides)
        self.device = resolve_device(cfg.device)
        budget = cfg.get("memory_cache_gb", "auto")
        if budget == "auto":
            budget = SWEEP_MEMO_GB if sweep else 0
        try:
            MEMO.configure(int(float(budget) * 2**30))
        except (TypeError, ValueError):
            raise ConfigError(f"memory_cache_gb={budget!r} must be auto or a number of GiB "
                              "(0 turns the in-process memo off).") from None
        self.results_path = self.run_dir / "results.csv"
        self.transform: Any = None  # loader hook of the current category's alignment

    # ------------------------------------------------------------------ orchestration
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        layout = get_layout(cfg.dataset.name)
        if hasattr(layout, "configure"):  # layouts with options of their own (e.g. STC)
            layout = layout.configure(_plain(cfg, "dataset"))
        root = dataset_root(cfg)
        categories = resolve_categories(layout, root, cfg.dataset.category)
        done = completed_categories(self.results_path) if cfg.resume else set()
        rows = []
        for category in categories:
            if category in done and cfg.stage != "train":
                log.info("%s: already in %s, skipped (resume=true)", category, self.results_path)
                continue
            split = layout.split(root, category)
            rows.append(self.run_category(split, len(categories)))
        return rows

    def run_category(self, split: CategorySplit, n_categories: int) -> dict[str, Any]:
        cfg = self.cfg
        seed_everything(int(cfg.seed))
        model_cfg = {k: _plain(cfg, k) for k in checkpoint.MODEL_KEYS}
        weights_tag = None
        if cfg.stage == "test":
            ckpt = checkpoint.locate(cfg.checkpoint, split.category, n_categories)
            payload = checkpoint.load(ckpt)
            method = checkpoint.restore(payload, ckpt)
            model_cfg, weights_tag = payload["config"], payload["weights_tag"]
            log.info("%s: loaded %s", split.category, ckpt)
        else:
            method = build_method(model_cfg["method"], model_cfg["backbone"],
                                  model_cfg["layers"], int(cfg.seed))
        method = method.to(self.device).eval()
        weights_tag = weights_tag or method.weights_tag
        preprocess = Preprocess(size=model_cfg["resolution"].get("size"),
                                crop=model_cfg["resolution"].get("crop"))
        self.transform = self._alignment(model_cfg["alignment"], split)
        cat_dir = self.run_dir / split.category
        train_time = Stopwatch(self.device)
        with PeakMemory(self.device) as peak:
            if cfg.stage != "test":
                with train_time:
                    # zero-shot methods never see the training images
                    method.fit([] if method.zero_shot
                               else self._batches(split.train, preprocess, split, "fit"))
                if self._save_model():
                    path = checkpoint.save(cat_dir / "model.pt", method, model_cfg,
                                           split.category, int(cfg.seed))
                    log.info("%s: model saved to %s", split.category, path)
            outputs, test_s = None, 0.0
            if cfg.stage != "train":
                outputs, test_s = self._predict(method, split, preprocess)
        metrics = (compute_metrics(outputs.scores, outputs.labels, outputs.maps, outputs.masks)
                   if outputs is not None else {})
        row = {
            "method": model_cfg["method"]["name"],
            "backbone": model_cfg["backbone"]["name"],
            "weights": weights_tag,
            "dataset": split.dataset,
            "category": split.category,
            "layers": method.layers_tag,
            "resolution": resolution_tag(model_cfg["resolution"]),
            "alignment": model_cfg["alignment"]["name"],
            "seed": int(cfg.seed),
            **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")},
            "n_train": (0 if method.zero_shot else len(split.train))
            if cfg.stage != "test" else None,
            "n_test": len(split.test) if outputs is not None else None,
            "train_s": train_time.seconds if cfg.stage != "test" else None,
            "test_s": test_s if outputs is not None else None,
            "ms_per_image": (1000 * test_s / max(len(split.test), 1)
                             if outputs is not None else None),
            "peak_mem_mb": peak.peak_mb,
            "device": str(self.device),
            "overrides": self.overrides,
        }
        if outputs is not None:
            self._write_scores(cat_dir, outputs)
            if cfg.plots.enabled:
                self._plots(cat_dir, outputs, split, preprocess, row)
            write_row(self.results_path, row)
            log.info("%s: image AUROC %s, pixel AUROC %s, AUPRO %s, %.1f ms/image",
                     split.category, _fmt(row["image_auroc"]), _fmt(row["pixel_auroc"]),
                     _fmt(row["aupro"]), row["ms_per_image"])
        return row

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
        if result.fallbacks:
            log.warning("%s: %d of %d images had too few ORB matches and were not rotated",
                        split.category, len(result.fallbacks), len(split.train) + len(split.test))
        return rotation_hook(result.rotations)

    def _save_model(self) -> bool:
        flag = self.cfg.save_model
        if isinstance(flag, str) and flag == "auto":
            return self.cfg.stage == "train"
        return bool(flag)

    # ------------------------------------------------------------------ data and scoring
    def _batches(self, records: list, preprocess: Preprocess, split: CategorySplit,
                 what: str) -> Iterator[Batch]:
        loader = make_loader(records, preprocess, int(self.cfg.batch_size),
                             int(self.cfg.num_workers), with_masks=split.has_masks,
                             transform_pil=self.transform)
        desc = f"{what} {split.category}"
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            yield batch.to(self.device)

    def _predict(self, method: AnomalyMethod, split: CategorySplit,
                 preprocess: Preprocess) -> tuple[Outputs, float]:
        watch = Stopwatch(self.device)
        scores, labels, maps, masks, paths, defects, turns = [], [], [], [], [], [], []
        for batch in self._batches(split.test, preprocess, split, "test"):
            with watch:
                pred = method.predict(batch)
            scores.append(pred.image_scores)
            maps.append(pred.anomaly_maps)
            labels.append(batch.labels)
            if batch.masks is not None:
                masks.append(batch.masks[:, 0] > 0.5)
            paths += batch.paths
            defects += batch.defect_types
            turns.append(batch.rotations if batch.rotations is not None
                         else torch.zeros(len(batch.paths), dtype=torch.long))
        out = Outputs(
            scores=torch.cat(scores), labels=torch.cat(labels), maps=torch.cat(maps),
            masks=torch.cat(masks) if masks and split.has_masks else None,
            paths=paths, defect_types=defects, rotations=torch.cat([t.cpu() for t in turns]),
        )
        return out, watch.seconds

    # ------------------------------------------------------------------ outputs
    def _write_scores(self, cat_dir: Path, out: Outputs) -> None:
        """Per-image scores (path, label, defect type, score) for later analysis."""
        import csv
        import os
        import tempfile

        cat_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cat_dir, prefix=".scores-", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "defect_type", "score"])
            for p, lab, d, s in zip(out.paths, out.labels.tolist(), out.defect_types,
                                    out.scores.tolist(), strict=True):
                w.writerow([p, lab, d, repr(float(s))])
        os.replace(tmp, cat_dir / "scores.csv")

    def _plots(self, cat_dir: Path, out: Outputs, split: CategorySplit,
               preprocess: Preprocess, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        scores = out.scores.float().cpu().numpy()
        labels = out.labels.cpu().numpy()
        title = f"{row['method']} · {split.dataset}/{split.category}"
        pdir = cat_dir / "plots"
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
            plots.plot_overlay_grid(pdir / "overlays.png", images, maps, masks, titles, vmin, vmax)
        log.debug("%s: plots in %.1fs", split.category, time.perf_counter() - t0)


def _overlay_selection(labels: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` test indices: anomalous ones first (3/4), then normal ones, evenly spaced."""
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_anom = min(len(anomalous), max(k - min(len(normal), k // 4), 0))
    n_norm = min(len(normal), k - n_anom)
    take = [a[np.linspace(0, len(a) - 1, n).round().astype(int)] if n else a[:0]
            for a, n in ((anomalous, n_anom), (normal, n_norm))]
    return np.concatenate(take)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
