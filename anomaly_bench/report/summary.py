"""Sweep summaries: every job's rows in summary.csv, a ranked table in summary.md, and the
figures of the best and the default setting under figures/.

The Hydra callback writes them when a multirun ends; when it never ran (a crash, a
cluster submission that ended elsewhere) the same files come from::

    python -m anomaly_bench.report.summary SWEEP_DIR [--metric image_auroc]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.fsutil import atomic_open
from anomaly_bench.report.results import COLUMNS, read_rows, write_csv

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


def _job_dirs(sweep_dir: Path) -> list[tuple[int, Path]]:
    jobs = [(int(p.name), p) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(jobs)


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _job_summary(job_dir: Path) -> dict:
    """The ``summary`` section of a job's composed config (.hydra/config.yaml), if any."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg.get("summary") or {}


def collect_job_rows(sweep_dir: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of every job's results.csv plus ``job``, the swept keys and any job ``label``.

    A key is swept when its override value differs between jobs.
    """
    jobs = _job_dirs(sweep_dir)
    overrides = {num: _overrides(d) for num, d in jobs}
    keys = sorted({k for o in overrides.values() for k in o})
    swept = [k for k in keys if len({o.get(k, "") for o in overrides.values()}) > 1]
    rows = []
    for num, d in jobs:
        label = _job_summary(d).get("label")
        extra = {"label": str(label)} if label else {}
        for row in read_rows(d / "results.csv"):
            rows.append({**row, "job": str(num), **{k: overrides[num].get(k, "") for k in swept},
                         **extra})
    return rows, swept


def sweep_settings(sweep_dir: Path) -> dict:
    """Summary settings of the sweep: the first job's composed config (which includes its
    ``experiment=`` preset and command-line overrides), else the sweep's multirun.yaml."""
    jobs = _job_dirs(Path(sweep_dir))
    settings = _job_summary(jobs[0][1]) if jobs else {}
    path = Path(sweep_dir) / "multirun.yaml"
    if not settings and path.is_file():
        settings = (yaml.safe_load(path.read_text()) or {}).get("summary") or {}
    return settings


def _fmt(v: float | None, column: str = "") -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if column in METRICS else f"{v:.4g}"


def _mean(values: list[str]) -> float | None:
    nums = [float(v) for v in values if v not in ("", None)]
    return sum(nums) / len(nums) if nums else None


@dataclass
class Setting:
    """One swept setting: its values of the swept keys, result means, label and rows."""

    key: tuple[str, ...]
    means: dict[str, float | None]
    label: str
    members: list[dict[str, str]]


def rank_settings(rows: list[dict[str, str]], swept: list[str], metric: str,
                  shown: Sequence[str], order: str = "rank") -> list[Setting]:
    """Rows grouped by setting, result columns averaged over categories; ``order='rank'``
    sorts by ``metric`` (best first, ties in job order), ``'sweep'`` keeps the job order."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    first_job: dict[tuple[str, ...], int] = {}
    for r in rows:
        key = tuple(r[k] for k in swept)
        groups[key].append(r)
        first_job.setdefault(key, int(r["job"]))
    settings = [Setting(key, {m: _mean([r.get(m, "") for r in members]) for m in {*shown, metric}},
                        members[0].get("label", ""), members)
                for key, members in groups.items()]
    if order == "rank":
        settings.sort(key=lambda st: (-(st.means[metric] if st.means[metric] is not None
                                        else -1.0), first_job[st.key]))
    else:
        settings.sort(key=lambda st: first_job[st.key])
    return settings


def _is_default(setting: Setting, swept: list[str], marks: dict[str, str]) -> bool:
    return bool(marks) and all(marks.get(k) == v for k, v in zip(swept, setting.key, strict=True)
                               if k in marks)


def render_markdown(rows: list[dict[str, str]], swept: list[str], metric: str,
                    default_marks: dict[str, str] | None, columns: Sequence[str] | None = None,
                    order: str = "rank") -> str:
    """The table: one line per swept setting, result columns averaged over categories.

    ``order='rank'`` sorts by ``metric`` (best first); ``'sweep'`` keeps the job order.
    The best value of each metric is bold; the default setting is marked.
    """
    shown = list(columns or METRICS)
    settings = rank_settings(rows, swept, metric, shown, order)
    labelled = any(r.get("label") for r in rows)
    best = {m: max((st.means[m] for st in settings if st.means[m] is not None), default=None)
            for m in shown if m in METRICS}
    marks = {k: str(v) for k, v in (default_marks or {}).items()}
    cats = sorted({r["category"] for r in rows})
    first = rows[0]
    ranked = f"ranked by {metric}" if order == "rank" else "in sweep order"
    header = [*swept, *(["setting"] if labelled else []), *shown]
    out = [
        f"# Sweep summary: {first.get('method', '')} on {first.get('dataset', '')}",
        "",
        f"{len(settings)} settings from {len({r['job'] for r in rows})} jobs; "
        f"categories: {', '.join(cats)}; backbone {first.get('backbone', '')} "
        f"({first.get('weights', '')}); {ranked}"
        + (" (means over categories)" if len(cats) > 1 else "") + ".",
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
        lines += ["", f"## {tag.capitalize()} setting: {desc}", ""]
        for r in st.members:
            scores_csv = sweep_dir / r["job"] / r["category"] / "scores.csv"
            if not scores_csv.is_file():
                continue
            scores, labels = _read_scores(scores_csv)
            title = f"{r.get('method', '')} · {r['category']} · {desc}"
            stem = sweep_dir / "figures" / f"{tag}_{r['category']}"
            for kind, fn in (("score_scatter", plots.plot_score_scatter),
                             ("roc", plots.plot_roc)):
                png = fn(Path(f"{stem}_{kind}.png"), scores, labels, title)
                if png is not None:
                    lines.append(f"![{tag} {r['category']} {kind}]"
                                 f"({png.relative_to(sweep_dir).as_posix()})")
    return lines


def write_summary(sweep_dir: Path, metric: str | None = None,
                  default_marks: dict[str, str] | None = None,
                  columns: Sequence[str] | None = None, order: str | None = None
                  ) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` at the sweep root (atomically).

    Settings not given come from the jobs' own ``summary`` config (so an ``experiment=``
    preset's table layout applies), else the defaults.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise AnomalyBenchError(f"sweep directory {sweep_dir} does not exist.")
    job = sweep_settings(sweep_dir)
    metric = metric or job.get("metric") or "image_auroc"
    order = order or job.get("order") or "rank"
    columns = columns or job.get("columns") or None
    if default_marks is None and job.get("default"):
        default_marks = {str(k): str(v) for k, v in job["default"].items()}
    if metric not in METRICS:
        raise AnomalyBenchError(f"summary metric {metric!r} is not one of {', '.join(METRICS)}.")
    if order not in ("rank", "sweep"):
        raise AnomalyBenchError(f"summary.order={order!r} is not one of rank, sweep.")
    unknown = [c for c in columns or () if c not in COLUMNS]
    if unknown:
        raise AnomalyBenchError(f"summary.columns {unknown} are not results.csv columns "
                                f"({', '.join(COLUMNS)}).")
    rows, swept = collect_job_rows(sweep_dir)
    if not rows:
        raise AnomalyBenchError(
            f"no finished job under {sweep_dir}: expected <job>/results.csv files written by "
            "an anomaly-bench multirun."
        )
    csv_path = sweep_dir / "summary.csv"
    write_csv(csv_path, rows, [*COLUMNS, "job", *swept,
                               *sorted({k for r in rows for k in r} - {*COLUMNS, "job", *swept})])
    md_path = sweep_dir / "summary.md"
    text = render_markdown(rows, swept, metric, default_marks, columns, order)
    figures = setting_figures(sweep_dir, rows, swept, metric, default_marks)
    with atomic_open(md_path, "w") as fh:
        fh.write(text + ("\n".join(figures) + "\n" if figures else ""))
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anomaly_bench.report.summary",
                                 description="Rebuild summary.csv and summary.md of a sweep.")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--metric", default=None, help="ranking metric (default: the sweep's)")
    args = ap.parse_args(argv)
    try:
        csv_path, md_path = write_summary(args.sweep_dir, args.metric)
    except AnomalyBenchError as exc:
        print(f"anomaly-bench: error: {exc}")
        return 2
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
