"""results.csv writing, sweep summaries and plots."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import yaml

from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.report import plots
from anomaly_bench.report.results import COLUMNS, completed_categories, read_rows, write_row
from anomaly_bench.report.summary import main as summary_main
from anomaly_bench.report.summary import write_summary


def _row(category: str, auroc: float | None = 0.9, **extra):
    base = {c: None for c in COLUMNS}
    base.update(method="padim", dataset="synthetic", category=category, image_auroc=auroc,
                pixel_auroc=0.8, aupro=None, image_f1_max=0.7, seed=0, ms_per_image=12.345)
    base.update(extra)
    return base


def test_write_row_keeps_column_order_and_replaces_by_category(tmp_path):
    path = tmp_path / "results.csv"
    write_row(path, _row("a"))
    write_row(path, _row("b", extra_col="x"))
    write_row(path, _row("a", auroc=0.5))
    with path.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*COLUMNS, "extra_col"]
    rows = read_rows(path)
    assert [r["category"] for r in rows] == ["b", "a"]
    assert rows[1]["image_auroc"] == "0.500000" and rows[1]["aupro"] == ""
    assert rows[0]["extra_col"] == "x" and rows[0]["ms_per_image"] == "12.35"
    assert completed_categories(path) == {"a", "b"}


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    write_row(path, _row("a"))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_row(path, _row("b"))
    assert path.read_bytes() == before
    # no temporary file left; the lock file of write_row stays (flock locks are not unlinked)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.csv.lock", "results.csv"]


def _fake_sweep(root):
    values = [("0", "3"), ("1", "3"), ("2", "3")]
    for job, (l1, l2) in enumerate(values):
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"layers.layer1={l1}", f"layers.layer2={l2}", "method=padim"]))
        for cat, auroc in (("x", 0.5 + 0.1 * job), ("y", 0.9 - 0.2 * job)):
            write_row(d / "results.csv", _row(cat, auroc=auroc))
    return root


def test_summary_ranks_settings_and_marks_default(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    csv_path, md_path = write_summary(sweep, default_marks={"layers.layer1": "2"})
    rows = read_rows(csv_path)
    assert len(rows) == 6 and rows[0]["layers.layer1"] == "0" and rows[0]["job"] == "0"
    assert "layers.layer2" not in rows[0]  # not swept: the same in every job
    md = md_path.read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and "---" not in line][1:]
    # means over categories: job0 0.7, job1 0.65, job2 0.6
    assert [line.split("|")[1].strip() for line in table] == ["0", "1", "2 (default)"]
    assert "**0.7000**" in table[0]


def test_summary_draws_best_and_default_settings_from_job_scores(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    for job in range(3):
        for cat in ("x", "y"):
            lines = ["path,label,defect_type,score"] + [
                f"{i}.png,{i % 2},{'crack' if i % 2 else 'good'},{0.1 * i + job}"
                for i in range(8)]
            (sweep / str(job) / cat).mkdir()
            (sweep / str(job) / cat / "scores.csv").write_text("\n".join(lines) + "\n")
    _, md_path = write_summary(sweep, default_marks={"layers.layer1": "2"})
    md = md_path.read_text()
    assert "## Best setting: layers.layer1=0" in md
    assert "## Default setting: layers.layer1=2" in md
    for tag in ("best", "default"):
        for cat in ("x", "y"):
            for kind in ("roc", "score_scatter"):
                png = sweep / "figures" / f"{tag}_{cat}_{kind}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert f"(figures/{tag}_{cat}_{kind}.png)" in md


def test_summary_cli_and_missing_results(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"summary": {"metric": "pixel_auroc", "default": {"layers.layer1": 0}}}))
    assert summary_main([str(sweep)]) == 0
    assert "0 (default)" in (sweep / "summary.md").read_text()
    assert "ranked by pixel_auroc" in capsys.readouterr().out
    empty = tmp_path / "empty"
    (empty / "0").mkdir(parents=True)
    with pytest.raises(AnomalyBenchError, match="no finished job"):
        write_summary(empty)
    assert summary_main([str(empty)]) == 2


def _rgb(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _has_colour(img: np.ndarray, hex_colour: str, alpha: float = 1.0, tol: int = 6) -> np.ndarray:
    """Mask of the pixels showing ``hex_colour`` drawn with ``alpha`` over white."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    blended = np.round(alpha * rgb + (1 - alpha) * 255)
    return np.abs(img - blended).sum(axis=-1) <= tol


def _upper_left_share(mask: np.ndarray) -> float:
    """Share of the mask's pixels above the diagonal from its box's lower left to upper right."""
    ys, xs = np.nonzero(mask)
    u = (xs - xs.min()) / (xs.max() - xs.min())
    v = (ys.max() - ys) / (ys.max() - ys.min())
    return float(np.mean(v > u))


def test_roc_plot_draws_the_curve_in_the_anomaly_colour(tmp_path):
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    good = _rgb(plots.plot_roc(tmp_path / "good.png", labels * 5.0, labels, "padim · x"))
    h, w, _ = good.shape
    assert 0.9 < (w / h) / (4.2 / 4.0) < 1.1  # the 4.2 x 4.0 in figure, axes labels included
    assert h > 400  # 150 dpi
    curve = _has_colour(good, plots.ANOMALY_COLOR)
    assert curve.sum() > 1000
    # a perfect ranking climbs the left edge and runs along the top (the legend's sample
    # line, lower right, is the rest); the reversed ranking hugs the bottom and right
    assert _upper_left_share(curve) > 0.8
    bad = _rgb(plots.plot_roc(tmp_path / "bad.png", -labels * 5.0, labels, "padim · x"))
    assert _upper_left_share(_has_colour(bad, plots.ANOMALY_COLOR)) < 0.2
    assert plots.plot_roc(tmp_path / "none.png", labels * 1.0, np.zeros(40, int), "t") is None
    assert not (tmp_path / "none.png").exists()


def test_score_plots_show_each_class_present_in_its_colour(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 20), rng.normal(2, 1, 20)]
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    normal = labels == 0
    for fn, alpha in ((plots.plot_score_histogram, 0.55), (plots.plot_score_scatter, 0.8)):
        both = _rgb(fn(tmp_path / f"{fn.__name__}.png", scores, labels, "padim · x"))
        assert _has_colour(both, plots.NORMAL_COLOR, alpha).sum() > 200, fn.__name__
        assert _has_colour(both, plots.ANOMALY_COLOR, alpha).sum() > 200, fn.__name__
        one = _rgb(fn(tmp_path / f"{fn.__name__}_normal.png", scores[normal], labels[normal],
                      "padim · x"))
        assert _has_colour(one, plots.NORMAL_COLOR, alpha).sum() > 200, fn.__name__
        assert _has_colour(one, plots.ANOMALY_COLOR, alpha).sum() == 0, fn.__name__


def test_overlay_grid_has_one_tile_per_image(tmp_path):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    heights = {}
    for n, max_items in ((2, 16), (4, 16), (6, 16), (6, 4)):
        images = np.zeros((n, 32, 32, 3), np.uint8)
        images[..., 1] = 255  # pure green: only the plain image tiles show it unblended
        maps = rng.random((n, 32, 32))
        masks = np.zeros((n, 32, 32), bool)
        masks[0, 4:9, 4:9] = True
        out = plots.plot_overlay_grid(tmp_path / f"grid{n}_{max_items}.png", images, maps, masks,
                                      [f"img{i}" for i in range(n)], 0.0, 1.0, max_items)
        img = _rgb(out)
        tiles, count = ndimage.label((img == (0, 255, 0)).all(axis=-1))
        sizes = ndimage.sum_labels(tiles > 0, tiles, range(1, count + 1))
        assert count == min(n, max_items), (n, max_items, count)
        assert sizes.min() > 0.5 * sizes.max(), sizes  # whole tiles, not specks
        heights[n, max_items] = img.shape[0]
    assert heights[2, 16] < heights[4, 16] < heights[6, 16]  # one row per two images
    assert heights[6, 4] == heights[4, 16]  # max_items caps the rows


def test_f1_threshold_is_the_best_cut():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    assert plots._f1_threshold(scores, labels) == pytest.approx(0.35)


def test_texture_presets_compose_the_source_versions():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    got = {}
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        for v in range(1, 7):
            c = compose("config", overrides=[f"experiment=texture_v0{v}"])
            got[v] = (c.method.impl, c.backbone.name, c.backbone.truncate, c.resolution.size,
                      c.layers.layer2, c.layers.layer3)
    assert got[1] == ("reference", "wide_resnet50_2", False, 320, -1, None)  # hook, full net
    assert got[2] == ("reference", "wide_resnet50_2", True, 320, -1, None)  # stop after layer2
    assert got[3] == ("fast", "wide_resnet50_2", False, 320, -1, None)  # vectorised scores
    assert got[4] == ("fast", "wide_resnet50_2", True, 320, -1, None)
    assert got[5] == ("fast", "resnet50", True, 320, -1, None)  # slim bottlenecks
    assert got[6] == ("fast", "wide_resnet50_2", True, 1024, -1, None)


def _textured_overlays(n: int = 16, size: int = 224):
    """Images like photographs of textures (stripes, per-pixel noise), smooth maps, masks."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        stripes = 128 + 60 * np.sin((xx + yy * (0.5 + i / n)) / 3.0)
        noisy = stripes[..., None] * np.array([1.0, 0.8, 0.6]) + rng.normal(0, 12, (size, size, 3))
        images[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    maps = np.stack([ndimage.gaussian_filter(rng.random((size, size)), 6) for _ in range(n)])
    masks = maps > np.quantile(maps, 0.97, axis=(1, 2), keepdims=True)
    return images, maps, masks


def _column_runs(img: np.ndarray) -> list[tuple[int, int]]:
    """(start, width) of the runs of columns that are drawn (not white) in 80% of the rows
    between the first and the last drawn row: tiles and colour bar, not the gaps."""
    drawn = (img < 250).any(axis=-1)
    rows = np.flatnonzero(drawn.any(axis=1))
    full = drawn[rows[0] : rows[-1] + 1].mean(axis=0) >= 0.8
    edges = np.flatnonzero(np.diff(np.r_[0, full.astype(int), 0]))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_overlay_grid_is_titled_tight_slim_and_small(tmp_path):
    images, maps, masks = _textured_overlays()
    titles = [f"crack · {i}" for i in range(16)]
    path = plots.plot_overlay_grid(tmp_path / "grid.png", images, maps, masks, titles,
                                   float(maps.min()), float(maps.max()),
                                   title="padim · synthetic/stripes")
    assert path.stat().st_size < 400_000, path.stat().st_size
    img = _rgb(path)
    w = img.shape[1]
    runs = _column_runs(img)
    # four tile columns (image, map, image, map) and the colour bar, edge to edge
    assert len(runs) == 5, runs
    tiles, bar = runs[:4], runs[4]
    assert all(125 <= width <= 145 for _, width in tiles), tiles  # 1.5 in at 90 dpi
    assert bar[1] <= 12, bar  # a slim bar
    assert tiles[0][0] <= 10 and w - (bar[0] + bar[1]) < 80  # no wide margins
    assert sum(width for _, width in tiles) > 0.85 * w
    # the title: black text above the first tiles; none without a title
    first_tile_row = int(np.flatnonzero((img[:, tiles[0][0] + 5] < 250).any(axis=-1)).min())
    assert (img[:18].max(axis=-1) < 40).sum() > 100
    untitled = _rgb(plots.plot_overlay_grid(tmp_path / "plain.png", images, maps, masks, titles,
                                            float(maps.min()), float(maps.max())))
    assert (untitled[:18].max(axis=-1) < 40).sum() == 0
    assert first_tile_row > 30


def _captured(monkeypatch) -> list:
    """Figures passed to plots._save (still open when recorded)."""
    seen = []
    save = plots._save

    def record(fig, path, **kw):
        fig.canvas.draw()
        seen.append({"axes": fig.axes, "ticks": [(list(a.get_xticks()), list(a.get_yticks()))
                                                 for a in fig.axes]})
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "_save", record)
    return seen


def test_score_histograms_count_whole_images(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0, 1, 12), rng.normal(3, 1, 18)]  # 30 images, as a test set
    labels = np.r_[np.zeros(12, int), np.ones(18, int)]
    plots.plot_score_histogram(tmp_path / "hist.png", scores, labels, "padim · x")
    plots.plot_score_scatter(tmp_path / "scatter.png", scores, labels, "padim · x")
    hist_ax = seen[0]["axes"][0]
    _, yticks = seen[0]["ticks"][0]
    assert yticks and all(float(t).is_integer() for t in yticks), yticks
    heights = [p.get_height() for p in hist_ax.patches]
    assert sum(heights) == 30 and all(float(v).is_integer() for v in heights)
    n_bins = len(hist_ax.patches) // 2
    assert 5 <= n_bins <= 10, n_bins  # not 30 bins for 30 images
    side_xticks, _ = seen[1]["ticks"][1]  # the scatter's marginal histogram counts images
    assert all(float(t).is_integer() for t in side_xticks), side_xticks


def test_long_plot_titles_wrap_inside_the_figure(tmp_path):
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    scores = labels + np.linspace(0, 0.5, 20)
    short = _rgb(plots.plot_roc(tmp_path / "short.png", scores, labels, "padim · x"))
    title = ("padim · rotated_part · layers.layer1=0, layers.layer2=3, layers.layer3=1, "
             "alignment.reference=null, alignment.ratio=0.75")
    long = _rgb(plots.plot_roc(tmp_path / "long.png", scores, labels, title))
    assert long.shape[1] <= short.shape[1] * 1.05  # as wide as the figure, not the title
    assert long.shape[0] > short.shape[0] + 20  # the title took more lines instead
    scatter = _rgb(plots.plot_score_scatter(tmp_path / "scatter.png", scores, labels, title))
    assert scatter.shape[1] <= 6.4 * 150 * 1.02
