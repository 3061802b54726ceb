"""Sweep summaries: every job's rows in summary.csv, a table in summary.md, and figures
under figures/: the first training images of each category (as stored and, when the jobs
aligned them, as turned) and the ROC curve and score scatter of the best and the default
setting.

A dataset reported per test subset (AeBAD-S's domain shifts, AeBAD-V's videos: rows
``<category>/<subset>``) counts in the table as the mean over its subsets, as its source
reports it (its whole-test-set row stays in summary.csv); ``summary.subset_tables`` adds
one table per named metric with a line per subset, their mean and the whole test set,
and a column per setting (the MMR presets: image AUROC and the two PROs).

A comparison puts two sweeps of the same settings side by side (e.g. the PaDiM layer sweep
without and with ORB alignment): their leading settings and default in one table, then
every setting's metric in both.

The Hydra callback writes a sweep's files when a multirun ends; when it never ran (a
crash, a cluster submission that ended elsewhere) the same files come from::

    python -m anomaly_bench.report.summary SWEEP_DIR [--metric image_auroc]
    python -m anomaly_bench.report.summary SWEEP_DIR --compare OTHER_SWEEP_DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.fsutil import atomic_open, describe
from anomaly_bench.metrics import METRIC_NAMES
from anomaly_bench.report.results import COLUMNS, read_rows, write_csv

#: Metrics a table can rank by and show (summary.csv carries them all).
METRICS = METRIC_NAMES
#: Columns of summary.md when ``summary.columns`` names none: the four headline metrics.
DEFAULT_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
#: Table columns shown in another unit than results.csv keeps: name -> (column, factor).
SCALED = {"s_per_image": ("ms_per_image", 1e-3)}
#: Cost columns (a comparison shows them beside the metric).
RUNTIME = ("train_s", "test_s", "ms_per_image", "s_per_image")
#: Descriptive columns named once in the table's heading when all rows share them.
SHARED = ("backbone", "weights", "layers", "resolution", "alignment")
#: Training images per category in the training-sample figure.
TRAIN_SAMPLES = 6


#: libyaml's parser where PyYAML was built with it (several times faster than the pure-Python
#: one, with the same resolvers): a summary reads every job's .hydra/config.yaml.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_LOADER)  # a safe loader: data, never code


def _job_dirs(sweep_dir: Path) -> list[tuple[str, Path]]:
    """(name, directory) of every job of a sweep, in sweep order (:func:`sweep.job_dirs`)."""
    from anomaly_bench.sweep import job_dirs

    return [(p.name, p) for p in job_dirs(sweep_dir)]


def failed_jobs(sweep_dir: Path) -> list[dict[str, str]]:
    """Jobs whose record says they failed: ``job``, ``overrides``, ``error`` and what the
    job's config names (method, backbone, dataset, category, seed)."""
    from anomaly_bench.sweep import JOB_RECORD, read_json

    out = []
    for name, d in _job_dirs(Path(sweep_dir)):
        record = read_json(d / JOB_RECORD) or {}
        if record.get("status") != "failed":
            continue
        cfg = _job_config(d)
        named = {k: _text((cfg.get(k) or {}).get("name", "")) for k in ("method", "backbone",
                                                                          "dataset")}
        category = _text((cfg.get("dataset") or {}).get("category", "")) or "?"  # unknown
        out.append({**named, "category": category,
                    "seed": _text(cfg.get("seed", "")), "job": name,
                    "overrides": " ".join(record.get("overrides") or []),
                    "error": str((record.get("error") or {}).get("message", ""))})
    return out


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = _read_yaml(path) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _job_config(job_dir: Path) -> dict:
    """A job's composed config (.hydra/config.yaml, interpolations unresolved), if any."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    return _read_yaml(path) or {}


def _summary_section(config: dict) -> dict:
    """The ``summary`` section of a composed config, if any."""
    return config.get("summary") or {}


def _text(value: Any) -> str:
    """A config value as written on the command line (``true``, ``null``, ``[a,b]``)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys of every leaf of a config (without its ``summary`` section)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if not prefix and key == "summary":
            continue
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _text(value)
    return out


def _differing(values: Mapping[int, Mapping[str, str]]) -> list[str]:
    """Keys whose value is not the same in every job (a missing key counts as a value)."""
    keys = sorted({k for v in values.values() for k in v})
    return [k for k in keys if len({v.get(k, "") for v in values.values()}) > 1]


def collect_job_rows(sweep_dir: Path) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """Rows of every job's results.csv plus ``job``, the swept keys, the described keys and
    any job ``label``.

    A key is swept when its command-line value differs between jobs. A key is described
    when its value in the composed configs differs between jobs without being swept: what
    a preset named on the command line (``experiment=...``) set differently, such as its
    backbone or input size.
    """
    jobs = _job_dirs(Path(sweep_dir))
    overrides = {num: _overrides(d) for num, d in jobs}
    swept = _differing(overrides)
    composed = {num: _job_config(d) for num, d in jobs}
    configs = {num: _flatten(c) for num, c in composed.items()}
    described = [k for k in _differing({n: c for n, c in configs.items() if c}) if k not in swept]
    rows = []
    for num, d in jobs:
        label = _summary_section(composed[num]).get("label")
        extra = {"label": str(label)} if label else {}
        for row in read_rows(d / "results.csv"):
            rows.append({**row, "job": num, **{k: overrides[num].get(k, "") for k in swept},
                         **{k: configs[num].get(k, "") for k in described}, **extra})
    return rows, swept, described


def sweep_settings(sweep_dir: Path) -> dict:
    """Summary settings of the sweep: the first job's composed config (which includes its
    ``experiment=`` preset and command-line overrides), else the sweep's multirun.yaml."""
    jobs = _job_dirs(Path(sweep_dir))
    settings = _summary_section(_job_config(jobs[0][1])) if jobs else {}
    path = Path(sweep_dir) / "multirun.yaml"
    if not settings and path.is_file():
        settings = _summary_section(_read_yaml(path) or {})
    return settings


def _fmt(v: float | str | None, column: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if column in METRICS:
        return f"{v:.4f}"
    return f"{v:.3f}" if column in SCALED else f"{v:.4g}"


def _mean(values: list[str]) -> float | None:
    nums = [float(v) for v in values if v not in ("", None)]
    return sum(nums) / len(nums) if nums else None


def _column(members: list[dict[str, str]], column: str) -> float | str | None:
    """A setting's value of ``column``: the mean over its rows (in the unit of SCALED), or
    for text such as ``backbone`` its distinct values."""
    source, factor = SCALED.get(column, (column, 1.0))
    values = [r.get(source, "") for r in members]
    try:
        mean = _mean(values)
    except ValueError:
        return " / ".join(dict.fromkeys(v for v in values if v))
    return None if mean is None else mean * factor


@dataclass
class Setting:
    """One swept setting: its values of the swept keys, result means, label and rows."""

    key: tuple[str, ...]
    means: dict[str, float | str | None]
    label: str
    members: list[dict[str, str]]


def split_categories(rows: list[dict[str, str]]) -> set[str]:
    """Categories reported per test subset (rows ``<category>/<subset>`` exist)."""
    return {r["category"].split("/", 1)[0] for r in rows if "/" in r.get("category", "")}


def averaged_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows a setting's means are taken over: a category reported per test subset
    counts through its subsets (their mean, as the source reports it), not its whole row."""
    split = split_categories(rows)
    return [r for r in rows if r.get("category", "") not in split]


def rank_settings(rows: list[dict[str, str]], swept: list[str], metric: str,
                  shown: Sequence[str], order: str = "rank") -> list[Setting]:
    """Rows grouped by setting, result columns averaged over categories (and subsets,
    :func:`averaged_rows`); ``order='rank'`` sorts by ``metric`` (best first, ties in job
    order), ``'sweep'`` keeps the job order."""
    rows = averaged_rows(rows)
    groups: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    first_job: dict[tuple[str, ...], int] = {}  # rows come in sweep order
    for i, r in enumerate(rows):
        key = tuple(r[k] for k in swept)
        groups[key].append(r)
        first_job.setdefault(key, i)
    settings = [Setting(key, {m: _column(members, m) for m in {*shown, metric}},
                        members[0].get("label", ""), members)
                for key, members in groups.items()]

    def score(st: Setting) -> float:
        value = st.means[metric]
        return value if isinstance(value, float) else -1.0

    if order == "rank":
        settings.sort(key=lambda st: (-score(st), first_job[st.key]))
    else:
        settings.sort(key=lambda st: first_job[st.key])
    return settings


def _is_default(setting: Setting, swept: list[str], marks: dict[str, str]) -> bool:
    return bool(marks) and all(marks.get(k) == v for k, v in zip(swept, setting.key, strict=True)
                               if k in marks)


def _shared_text(rows: list[dict[str, str]]) -> str:
    """``backbone X, weights Y, ...`` for the descriptive columns all rows share, and the
    names of those that differ."""
    same, differ = [], []
    for col in SHARED:
        values = {r.get(col, "") for r in rows}
        if len(values) == 1:
            if values != {""}:
                same.append(f"{col} {values.pop()}")
        else:
            differ.append(col)
    return "; ".join(part for part in (", ".join(same),
                                       f"per setting: {', '.join(differ)}" if differ else "")
                     if part)


def render_markdown(rows: list[dict[str, str]], swept: list[str], metric: str,
                    default_marks: dict[str, str] | None, columns: Sequence[str] | None = None,
                    order: str = "rank", described: Sequence[str] = (),
                    notes: Sequence[str] = ()) -> str:
    """The table: one line per swept setting, result columns averaged over categories.

    Columns: the swept keys, the setting's label (when the jobs have one), the described
    keys (what else differs between the jobs' configs), then ``columns`` (default: the four
    metrics). ``order='rank'`` sorts by ``metric`` (best first); ``'sweep'`` keeps the job
    order. The best value of each metric is bold; the default setting is marked. ``notes``
    follow the heading.
    """
    shown = list(columns or DEFAULT_COLUMNS)
    settings = rank_settings(rows, swept, metric, shown, order)
    labelled = any(r.get("label") for r in rows)
    best = {m: max((st.means[m] for st in settings if isinstance(st.means[m], float)),
                   default=None)
            for m in shown if m in METRICS}
    marks = {k: str(v) for k, v in (default_marks or {}).items()}
    cats = sorted({r["category"] for r in averaged_rows(rows)})
    split = sorted(split_categories(rows))
    if split:
        notes = [*notes, f"{', '.join(split)}: the mean over its test subsets, as the source "
                         "reports it (the whole test set's row is in summary.csv)."]
    first = rows[0]
    ranked = f"ranked by {metric}" if order == "rank" else "in sweep order"
    header = [*swept, *(["setting"] if labelled else []), *described, *shown]
    out = [
        f"# Sweep summary: {first.get('method', '')} on {first.get('dataset', '')}",
        "",
        "; ".join(part for part in (
            f"{len(settings)} settings from {len({r['job'] for r in rows})} jobs",
            f"categories: {', '.join(cats)}", _shared_text(rows),
            ranked + (" (means over categories)" if len(cats) > 1 else "")) if part) + ".",
        *(["", *notes] if notes else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---:"] * len(header)) + "|",
    ]
    for st in settings:
        is_default = _is_default(st, swept, marks)
        cells = [f"{v} (default)" if is_default and k in marks else v
                 for k, v in zip(swept, st.key, strict=True)]
        if labelled:
            cells.append(st.label)
        cells += [st.members[0].get(k, "") for k in described]
        for m in shown:
            text = _fmt(st.means[m], m)
            cells.append(f"**{text}**" if text and m in best and st.means[m] == best[m] else text)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import csv

    with path.open(newline="") as fh:
        recs = list(csv.DictReader(fh))
    return (np.array([float(r["score"]) for r in recs]),
            np.array([int(r["label"]) for r in recs]))


def _short_keys(keys: Sequence[str]) -> list[str]:
    """The last dotted part of each key (``layers.layer1`` -> ``layer1``) when those parts
    are distinct, else the keys."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return short if len(set(short)) == len(short) else list(keys)


def setting_figures(sweep_dir: Path, rows: list[dict[str, str]], swept: list[str], metric: str,
                    default_marks: dict[str, str] | None) -> list[str]:
    """Figures of the best setting (by ``metric``) and of the default one, per category:
    the ROC curve with its AUC and the image-score scatter with its marginal histogram, as
    the PaDiM layer-sweep document shows them. Drawn from each job's ``scores.csv`` into
    ``figures/`` at the sweep root; returns the markdown lines that show them."""
    from anomaly_bench.report import plots

    settings = rank_settings(rows, swept, metric, [metric])
    if not settings:
        return []
    marks = {k: str(v) for k, v in (default_marks or {}).items()}
    picks = [("best", settings[0])]
    default = next((st for st in settings if _is_default(st, swept, marks)), None)
    if default is not None and default is not settings[0]:
        picks.append(("default", default))
    lines = []
    for tag, st in picks:
        desc = ", ".join(f"{k}={v}" for k, v in zip(swept, st.key, strict=True)) or "all jobs"
        short = st.label or ", ".join(
            f"{k}={v}" for k, v in zip(_short_keys(swept), st.key, strict=True)) or "all jobs"
        lines += ["", f"## {tag.capitalize()} setting: {desc}", ""]
        for r in st.members:
            scores_csv = sweep_dir / r["job"] / r["category"] / "scores.csv"
            if not scores_csv.is_file():
                continue
            scores, labels = _read_scores(scores_csv)
            title = f"{r.get('method', '')} · {r['category']} · {short}"
            stem = sweep_dir / "figures" / f"{tag}_{r['category']}"
            for kind, fn in (("score_scatter", plots.plot_score_scatter),
                             ("roc", plots.plot_roc)):
                png = fn(Path(f"{stem}_{kind}.png"), scores, labels, title)
                if png is not None:
                    lines.append(f"![{tag} {r['category']} {kind}]"
                                 f"({png.relative_to(sweep_dir).as_posix()})")
    return lines


@dataclass
class TrainingSamples:
    """The first training images of a job's category and, when the job aligned its images,
    the quarter turns (counter-clockwise) it gave them."""

    paths: list[Path]
    turns: list[int] | None
    fallbacks: list[Path]
    reference: Path | None


def training_samples(job_config: Mapping[str, Any], n: int) -> TrainingSamples:
    """The first ``n`` training images of the run described by ``job_config`` (a job's
    ``config.json``: dataset with its folder, category, alignment).

    The turns are recomputed as the job computed them: the same aligner built from the
    same alignment settings and all training images (so the same reference), matching
    each image on its own, as :meth:`~anomaly_bench.alignment.orb.OrbRotationAligner.align_all`
    does for the job.
    """
    from anomaly_bench.alignment.orb import _reference_image, build_aligner
    from anomaly_bench.data import get_layout

    ds = job_config["dataset"]
    layout = get_layout(ds["name"])
    if hasattr(layout, "configure"):
        layout = layout.configure(ds)
    split = layout.split(Path(ds["root"]), str(job_config["category"]))
    train = [Path(rec.image_path) for rec in split.train]
    paths = train[:n]
    align = job_config.get("alignment") or {}
    aligner = build_aligner(align, train)
    if aligner is None:
        return TrainingSamples(paths, None, [], None)
    result = aligner.align_all(paths, desc="align")
    return TrainingSamples(paths, [result.rotations[str(p)] for p in paths],
                           [Path(p) for p in result.fallbacks],
                           _reference_image(align.get("reference"), train))


def training_figures(sweep_dir: Path, rows: list[dict[str, str]], n: int = TRAIN_SAMPLES
                     ) -> list[str]:
    """Per category of jobs that trained, the figure of its first ``n`` training images as
    stored and, when the jobs aligned them, as turned (:func:`training_samples`, from the
    first such job's ``config.json``) in ``figures/train_samples_<category>.png``.

    Returns the markdown lines that show them, or say why one is missing.
    """
    from anomaly_bench.alignment.orb import rotate_pil
    from anomaly_bench.data.loading import read_image
    from anomaly_bench.report import plots

    firsts: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.get("n_train") not in ("", "0", None):
            firsts.setdefault(r["category"], r)
    if n <= 0 or not firsts:
        return []
    lines = ["", "## Training images", ""]
    for category, r in firsts.items():
        try:
            cfg = json.loads((sweep_dir / r["job"] / category / "config.json").read_text())
            samples = training_samples(cfg, n)
            stored = []
            for p in samples.paths:
                image = read_image(p)
                image.thumbnail((256, 256))
                stored.append(image)
            fig_rows = [("as stored", [np.asarray(im) for im in stored],
                         [p.name for p in samples.paths])]
            if samples.turns is None:
                note = "as stored (the jobs used no alignment)"
            else:
                name = cfg["alignment"]["name"]
                captions = [("no match: 0°" if p in samples.fallbacks else f"{90 * k}° ccw")
                            for p, k in zip(samples.paths, samples.turns, strict=True)]
                fig_rows.append((f"turned ({name})",
                                 [np.asarray(rotate_pil(im, k))
                                  for im, k in zip(stored, samples.turns, strict=True)],
                                 captions))
                ref = samples.reference.name if samples.reference else ""
                note = (f"top: as stored; bottom: turned by the {name} alignment as in the "
                        f"jobs (quarter turns matching the reference image {ref})")
            title = (f"{r.get('dataset', '')}/{category} · first {len(samples.paths)} "
                     "training images")
            png = plots.plot_sample_rows(sweep_dir / "figures" / f"train_samples_{category}.png",
                                         fig_rows, title, note)
            lines.append(f"![training images {category}]"
                         f"({png.relative_to(sweep_dir).as_posix()})")
        except (OSError, KeyError, ValueError, AnomalyBenchError) as exc:
            lines.append(f"Training images of {category} not drawn: {exc}")
    return lines


def subset_markdown(rows: list[dict[str, str]], swept: list[str],
                    metrics: Sequence[str]) -> str:
    """Per category reported per subset and per metric: a line per subset, the mean over
    the subsets and the whole test set; a column per setting (job order)."""
    settings = rank_settings(rows, swept, metrics[0] if metrics else "image_auroc", (),
                             "sweep") if swept else []
    names = [", ".join(f"{k}={v}" for k, v in zip(swept, st.key, strict=True)) or "run"
             for st in settings] or ["run"]
    keys = [st.key for st in settings] or [()]
    out = []
    for cat in sorted(split_categories(rows)):
        mine = [r for r in rows if r["category"] == cat or r["category"].startswith(cat + "/")]
        subsets = list(dict.fromkeys(r["category"].split("/", 1)[1] for r in mine
                                     if "/" in r["category"]))
        for metric in metrics:
            present = any(metric in r for r in mine)
            out += ["", f"## {cat}: {metric} per test subset", ""]
            if not present:
                out += [f"{metric} is not a column of these results.csv files.", ""]
                continue
            out += ["| subset | " + " | ".join(names) + " |",
                    "|" + "|".join([":---:"] * (len(names) + 1)) + "|"]

            def value(key: tuple, category: str, metric: str = metric,
                      mine: list = mine) -> float | None:
                vals = [r.get(metric, "") for r in mine if r["category"] == category
                        and tuple(r[k] for k in swept) == key]
                return _mean(vals)

            table = {sub: [value(k, f"{cat}/{sub}") for k in keys] for sub in subsets}
            for sub in subsets:
                out.append(f"| {sub} | " + " | ".join(_fmt(v, "image_auroc")
                                                        for v in table[sub]) + " |")
            means = [_mean([str(table[sub][i]) for sub in subsets
                            if table[sub][i] is not None]) for i in range(len(keys))]
            out.append("| **mean** | " + " | ".join(f"**{_fmt(v, 'image_auroc')}**"
                                                    if v is not None else ""
                                                    for v in means) + " |")
            out.append("| whole test set | " + " | ".join(_fmt(value(k, cat), "image_auroc")
                                                         for k in keys) + " |")
    return "\n".join(out) + ("\n" if out else "")


def _load(sweep_dir: Path, metric: str | None = None, columns: Sequence[str] | None = None,
          order: str | None = None) -> dict[str, Any]:
    """A sweep's rows and table settings (arguments not given come from the jobs' own
    ``summary`` config, so an ``experiment=`` preset's table layout applies)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise AnomalyBenchError(f"sweep directory {sweep_dir} does not exist.")
    job = sweep_settings(sweep_dir)
    metric = metric or job.get("metric") or "image_auroc"
    order = order or job.get("order") or "rank"
    columns = columns or job.get("columns") or None
    if metric not in METRICS:
        raise AnomalyBenchError(f"summary metric {metric!r} is not one of {', '.join(METRICS)}.")
    if order not in ("rank", "sweep"):
        raise AnomalyBenchError(f"summary.order={order!r} is not one of rank, sweep.")
    unknown = [c for c in columns or () if c not in COLUMNS and c not in SCALED]
    if unknown:
        raise AnomalyBenchError(f"summary.columns {unknown} are not results.csv columns "
                                f"({', '.join(COLUMNS)}) or {', '.join(SCALED)}.")
    rows, swept, described = collect_job_rows(sweep_dir)
    failed = failed_jobs(sweep_dir)
    if not rows and not failed:
        raise AnomalyBenchError(
            f"no finished job under {sweep_dir}: expected <job>/results.csv files written by "
            "an anomaly-bench multirun."
        )
    jobs = _job_dirs(sweep_dir)
    config = _job_config(jobs[0][1]) if jobs else {}
    marks = {str(k): str(v) for k, v in (job.get("default") or {}).items()}
    return {"dir": sweep_dir, "rows": rows, "swept": swept, "described": described,
            "failed": failed,
            "metric": metric, "order": order, "columns": columns, "marks": marks,
            "config": config}


def _runtime_note(sweep: Mapping[str, Any]) -> list[str]:
    """Why later jobs of a cached sweep look faster, when the table shows costs."""
    shown = sweep["columns"] or DEFAULT_COLUMNS
    cached = ((sweep["config"].get("backbone") or {}).get("cache") or {}).get("enabled")
    if not cached or not any(c in RUNTIME for c in shown):
        return []
    return ["Runtimes are each job's own. The feature cache was on: the first job to need "
            "an image's backbone outputs computed them and later jobs read them, so their "
            "train_s and ms_per_image leave most of the backbone out."]


def write_summary(sweep_dir: Path, metric: str | None = None,
                  default_marks: dict[str, str] | None = None,
                  columns: Sequence[str] | None = None, order: str | None = None,
                  train_samples: int = TRAIN_SAMPLES) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` at the sweep root (atomically), with the
    training-sample and best/default-setting figures under ``figures/``.

    Settings not given come from the jobs' own ``summary`` config (so an ``experiment=``
    preset's table layout applies), else the defaults.
    """
    sweep = _load(Path(sweep_dir), metric, columns, order)
    sweep_dir, rows, swept = sweep["dir"], sweep["rows"], sweep["swept"]
    if default_marks is None:
        default_marks = sweep["marks"]
    csv_path = sweep_dir / "summary.csv"
    failed = sweep["failed"]
    extra = [k for k in (*swept, *sweep["described"]) if k not in COLUMNS]  # seed is both
    head = [*COLUMNS, "job", *extra, *(["error"] if failed else [])]
    every = rows + failed
    write_csv(csv_path, every, [*head, *sorted({k for r in every for k in r} - set(head))])
    md_path = sweep_dir / "summary.md"
    figures: list[str] = []
    if rows:
        text = render_markdown(rows, swept, sweep["metric"], default_marks, sweep["columns"],
                               sweep["order"], sweep["described"], _runtime_note(sweep))
        tables = sweep_settings(sweep_dir).get("subset_tables") or []
        if tables:
            text += subset_markdown(rows, swept, [tables] if isinstance(tables, str) else tables)
        try:
            figures = training_figures(sweep_dir, rows, train_samples)
            figures += setting_figures(sweep_dir, rows, swept, sweep["metric"], default_marks)
        except Exception as exc:  # a failing figure costs the figures, never the table
            figures = ["", f"Figures not drawn ({type(exc).__name__}: {exc})."]
    else:
        text = f"# Sweep summary: no job finished ({len(failed)} failed)\n"
    if failed:
        text += failed_markdown(failed)
    with atomic_open(md_path, "w") as fh:
        fh.write(text + ("\n".join(figures) + "\n" if figures else ""))
    return csv_path, md_path


def failed_markdown(failed: list[dict[str, str]]) -> str:
    """The section of summary.md listing the failed jobs and their errors."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    out = ["", f"## Failed jobs ({len(failed)})", "",
           "Each job's error is also in its job.json; re-running the sweep into its "
           "directory runs them again.", "", "| job | overrides | error |", "|---|---|---|"]
    out += [f"| {f['job']} | `{cell(f['overrides'])}` | {cell(f['error'])} |" for f in failed]
    return "\n".join(out) + "\n"


def _config_changes(a: Mapping[str, Any], b: Mapping[str, Any], skip: Sequence[str],
                    names: tuple[str, str]) -> str:
    """What the first jobs' configs of two sweeps set differently (swept keys aside)."""
    fa, fb = _flatten(a), _flatten(b)
    parts = [f"`{k}`: {fa[k]} ({names[0]}), {fb[k]} ({names[1]})"
             for k in sorted(fa.keys() & fb.keys()) if k not in skip and fa[k] != fb[k]]
    for mine, other, name in ((fa, fb, names[0]), (fb, fa, names[1])):
        only = [f"`{k}`={mine[k]}" for k in sorted(mine.keys() - other.keys()) if k not in skip]
        if only:
            parts.append(f"only in {name}: " + ", ".join(only))
    return "; ".join(parts) or "none besides the results"


def compare_markdown(sweep_a: Path, sweep_b: Path, out_dir: Path, metric: str | None = None,
                     top: int = 5) -> str:
    """Two sweeps of the same swept keys side by side: each one's ``top`` settings by
    ``metric`` and its default setting, with the cost columns its table shows; then every
    setting's metric in both and the difference; then links to both sweeps' figures
    (relative to ``out_dir``)."""
    a, b = _load(sweep_a, metric), _load(sweep_b, metric)
    for s in (a, b):
        if not s["rows"]:
            raise AnomalyBenchError(f"no finished job under {s['dir']} to compare.")
    metric = a["metric"]
    if a["swept"] != b["swept"]:
        raise AnomalyBenchError(
            f"{sweep_a} sweeps {', '.join(a['swept']) or 'nothing'} but {sweep_b} sweeps "
            f"{', '.join(b['swept']) or 'nothing'}: a comparison needs the same swept keys.")
    swept = a["swept"]
    names = (a["dir"].name, b["dir"].name)
    if names[0] == names[1]:
        names = (f"{a['dir'].parent.name}/{names[0]}", f"{b['dir'].parent.name}/{names[1]}")
    costs = [c for c in (a["columns"] or ()) if c in RUNTIME]
    shown = [metric, *costs]
    ranked = [rank_settings(s["rows"], swept, metric, shown) for s in (a, b)]
    position = [{st.key: i + 1 for i, st in enumerate(r)} for r in ranked]
    marks = a["marks"]

    def cells(settings: list[Setting], i: int, rank: int | None = None) -> list[str]:
        if i >= len(settings):
            return [""] * (1 + len(shown))
        st = settings[i]
        text = " / ".join(st.key) + (f" (rank {rank})" if rank else "")
        return [text, *(_fmt(st.means[c], c) for c in shown)]

    cats = sorted({r["category"] for s in (a, b) for r in s["rows"]})
    first = a["rows"][0]
    out = [
        f"# Sweep comparison: {first.get('method', '')} on {first.get('dataset', '')} "
        f"({', '.join(cats)}), {names[0]} and {names[1]}",
        "",
        f"- {names[0]}: `{a['dir']}` ({len(ranked[0])} settings; {_shared_text(a['rows'])})",
        f"- {names[1]}: `{b['dir']}` ({len(ranked[1])} settings; {_shared_text(b['rows'])})",
        f"- configs differ in: {_config_changes(a['config'], b['config'], swept, names)}",
        f"- setting = {' / '.join(swept) or 'all jobs'}; ranked by {metric}"
        + (" (means over categories)" if len(cats) > 1 else "") + ".",
        *(["", *_runtime_note(a)] if costs else []),
        "",
        f"## Top {top} and default",
        "",
    ]
    header = ["rank", *(f"{n}: {c}" for n in names for c in ("setting", *shown))]
    out += ["| " + " | ".join(header) + " |", "|" + "|".join([":---:"] * len(header)) + "|"]
    for i in range(min(top, max(len(r) for r in ranked))):
        out.append("| " + " | ".join([str(i + 1), *cells(ranked[0], i), *cells(ranked[1], i)])
                   + " |")
    defaults = [next((j for j, st in enumerate(r) if _is_default(st, swept, marks)), None)
                for r in ranked]
    if any(d is not None for d in defaults):
        row = ["default"]
        for r, d in zip(ranked, defaults, strict=True):
            row += cells(r, d, d + 1) if d is not None else cells(r, len(r))
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Every setting", "",
            "| " + " | ".join([*swept, f"{names[0]} rank", f"{names[0]} {metric}",
                               f"{names[1]} rank", f"{names[1]} {metric}",
                               f"{names[1]} − {names[0]}"]) + " |",
            "|" + "|".join([":---:"] * (len(swept) + 5)) + "|"]
    other = {st.key: st for st in ranked[1]}
    for st in ranked[0] + [st for st in ranked[1] if st.key not in position[0]]:
        va = st.means[metric] if st.key in position[0] else None
        vb = other[st.key].means[metric] if st.key in other else None
        diff = (f"{vb - va:+.4f}" if isinstance(va, float) and isinstance(vb, float) else "")
        keys = [f"{v} (default)" if _is_default(st, swept, marks) and k in marks else v
                for k, v in zip(swept, st.key, strict=True)]
        out.append("| " + " | ".join([*keys, str(position[0].get(st.key, "")), _fmt(va, metric),
                                      str(position[1].get(st.key, "")), _fmt(vb, metric),
                                      diff]) + " |")
    links = []
    for s, name in zip((a, b), names, strict=True):
        for png in sorted((s["dir"] / "figures").glob("*.png"),
                          key=lambda p: (not p.name.startswith("train_samples"), p.name)):
            rel = Path(os.path.relpath(png, out_dir)).as_posix()
            links.append(f"![{name} {png.stem}]({rel})")
    if links:
        out += ["", "## Figures", "", *links]
    return "\n".join(out) + "\n"


def write_comparison(sweep_a: Path, sweep_b: Path, out: Path | None = None,
                     metric: str | None = None, top: int = 5) -> Path:
    """Write :func:`compare_markdown` of two sweeps to ``out`` (default
    ``<sweep_a>/comparison.md``), atomically."""
    out = Path(out) if out is not None else Path(sweep_a) / "comparison.md"
    text = compare_markdown(Path(sweep_a), Path(sweep_b), out.parent, metric, top)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "w") as fh:
        fh.write(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="anomaly-bench-report",
        description="Rebuild summary.csv, summary.md and figures/ of a sweep; with --compare, "
                    "also those of a second sweep and a comparison of the two.")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--metric", default=None, help="ranking metric (default: the sweep's)")
    ap.add_argument("--compare", type=Path, default=None, metavar="OTHER_SWEEP_DIR",
                    help="a sweep of the same swept keys to put beside this one")
    ap.add_argument("--out", type=Path, default=None,
                    help="comparison file (default: SWEEP_DIR/comparison.md)")
    ap.add_argument("--top", type=int, default=5,
                    help="settings of each sweep in the comparison's first table")
    ap.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES,
                    help="training images per category in the training-sample figure (0: none)")
    args = ap.parse_args(argv)
    try:
        done = []
        for sweep_dir in (args.sweep_dir, *([args.compare] if args.compare else [])):
            csv_path, md_path = write_summary(sweep_dir, args.metric,
                                              train_samples=args.train_samples)
            print(md_path.read_text())
            done += [csv_path, md_path]
        if args.compare:
            path = write_comparison(args.sweep_dir, args.compare, args.out, args.metric, args.top)
            print(path.read_text())
            done.append(path)
    except AnomalyBenchError as exc:
        print(f"anomaly-bench: error: {exc}")
        return 2
    except OSError as exc:  # a summary file or figure that cannot be written
        print(f"anomaly-bench: error: {describe(exc)}.")
        return 2
    print("wrote " + ", ".join(str(p) for p in done))
    return 0


def main_exit() -> None:
    """Console script ``anomaly-bench-report``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_exit()
