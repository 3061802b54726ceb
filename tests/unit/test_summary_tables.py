"""Sweep tables: described columns, units, runtimes, two sweeps side by side, training images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from fixtures import compose_config
from PIL import Image

from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.report.results import COLUMNS, read_rows, write_row
from anomaly_bench.report.summary import (
    compare_markdown,
    main,
    training_samples,
    write_comparison,
    write_summary,
)


def _row(category: str, **values):
    row = {c: None for c in COLUMNS}
    row.update(method="padim", dataset="synthetic", category=category, seed=0,
               backbone="wide_resnet50_2", weights="random(seed=0)", resolution="256/224",
               alignment="none", n_train=0)
    row.update(values)
    return row


def _job(root, num: int, overrides: list[str], config: dict, rows: list[dict]):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for row in rows:
        write_row(d / "results.csv", row)


def _tables(md: str) -> list[list[list[str]]]:
    """Every markdown table of ``md`` as rows of cells (header first, rule dropped)."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set(":-") for c in cells):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def _texture_sweep(root):
    """Three versions as the texture presets make them: one swept key (experiment), the
    backbone, truncation and input size set by each preset."""
    versions = [("texture_v01", "wide_resnet50_2", False, 320, 1969.0, 0.995),
                ("texture_v05", "resnet50", True, 320, 74.0, 0.992),
                ("texture_v06", "wide_resnet50_2", True, 1024, 310.0, 0.923)]
    for num, (exp, backbone, truncate, size, ms, auroc) in enumerate(versions):
        config = {"backbone": {"name": backbone, "truncate": truncate, "pretrained": False},
                  "resolution": {"size": size, "crop": None},
                  "dataset": {"name": "mvtec", "category": ["carpet", "grid"]},
                  "summary": {"label": f"#{exp[-2:]}", "order": "sweep",
                              "columns": ["s_per_image", "image_auroc", "pixel_auroc"]}}
        rows = [_row(cat, method="texture_knn", dataset="mvtec", backbone=backbone,
                     resolution=str(size), ms_per_image=ms + 10 * c, image_auroc=auroc,
                     pixel_auroc=0.9)
                for c, cat in enumerate(("carpet", "grid"))]
        _job(root, num, [f"experiment={exp}", "data_root=/data"], config, rows)
    return root


def test_version_table_names_each_rows_backbone_and_size_and_runtime_in_seconds(tmp_path):
    sweep = _texture_sweep(tmp_path / "sweep")
    csv_path, md_path = write_summary(sweep)
    md = md_path.read_text()
    (table,) = _tables(md)
    header, *rows = table
    assert header == ["experiment", "setting", "backbone.name", "backbone.truncate",
                      "resolution.size", "s_per_image", "image_auroc", "pixel_auroc"]
    got = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert [r[0] for r in rows] == ["texture_v01", "texture_v05", "texture_v06"]  # sweep order
    assert got["texture_v05"]["backbone.name"] == "resnet50"
    assert got["texture_v01"]["backbone.name"] == "wide_resnet50_2"
    assert got["texture_v06"]["resolution.size"] == "1024"
    assert got["texture_v01"]["backbone.truncate"] == "false"
    # mean over the two categories (1969 and 1979 ms) in seconds
    assert got["texture_v01"]["s_per_image"] == "1.974"
    assert got["texture_v05"]["s_per_image"] == "0.079"
    # the heading names only what every row shares: not one backbone for all
    heading = next(line for line in md.splitlines() if line.startswith("3 settings"))
    assert "backbone wide_resnet50_2" not in heading
    assert "weights random(seed=0)" in heading and "per setting: backbone, resolution" in heading
    # summary.csv keeps milliseconds and gains the described keys
    by_job = {(r["experiment"], r["category"]): r for r in read_rows(csv_path)}
    assert by_job["texture_v05", "carpet"]["ms_per_image"] == "74.00"
    assert by_job["texture_v05", "grid"]["backbone.name"] == "resnet50"


def test_texture_presets_default_to_the_mvtec_textures():
    for v in range(1, 7):
        cfg = compose_config([f"experiment=texture_v0{v}"])
        assert cfg.dataset.name == "mvtec"
        assert list(cfg.dataset.category) == ["carpet", "grid", "leather", "tile", "wood"]
        assert list(cfg.summary.columns) == ["s_per_image", "image_auroc", "pixel_auroc"]
    other = compose_config(["experiment=texture_v03", "dataset=synthetic",
                            "dataset.category=all"])
    assert other.dataset.name == "synthetic" and other.dataset.category == "all"


def _layer_sweep(root, shift: float, alignment: str, cached: bool = True):
    """Six (layer1, layer2) settings on one category; the metric decreases with layer1
    and ``shift`` moves the aligned sweep."""
    config_base = {"backbone": {"name": "wide_resnet50_2", "cache": {"enabled": cached}},
                   "alignment": {"name": alignment, **({"ratio": 0.75} if alignment != "none"
                                                     else {})},
                   "summary": {"metric": "image_auroc",
                               "columns": ["image_auroc", "ms_per_image", "train_s"],
                               "default": {"layers.layer1": 2, "layers.layer2": 1}}}
    num = 0
    for l1 in range(3):
        for l2 in range(2):
            auroc = 0.9 - 0.1 * l1 + 0.01 * l2 + shift * (l1 == 1)
            config = {**config_base, "layers": {"layer1": l1, "layer2": l2}}
            row = _row("part", image_auroc=auroc, ms_per_image=100.0 + num,
                       train_s=50.0 if num == 0 else 2.0, alignment=alignment, n_train=0)
            _job(root, num, [f"layers.layer1={l1}", f"layers.layer2={l2}",
                             "experiment=padim_screw_layers"], config, [row])
            num += 1
    return root


def test_layer_table_shows_each_settings_runtimes():
    cfg = compose_config(["experiment=padim_screw_layers"])
    assert {"ms_per_image", "train_s"} <= set(cfg.summary.columns)


def test_layer_table_runtime_columns_and_cache_note(tmp_path):
    sweep = _layer_sweep(tmp_path / "plain", 0.0, "none")
    _, md_path = write_summary(sweep)
    md = md_path.read_text()
    (table,) = _tables(md)
    header, *rows = table
    assert header == ["layers.layer1", "layers.layer2", "image_auroc", "ms_per_image", "train_s"]
    first = dict(zip(header, rows[0], strict=True))
    assert first["layers.layer1"] == "0" and first["layers.layer2"] == "1"  # 0.91, best
    assert first["ms_per_image"] == "101" and first["train_s"] == "2"
    job0 = next(dict(zip(header, r, strict=True)) for r in rows if r[:2] == ["0", "0"])
    assert job0["train_s"] == "50"
    assert "feature cache was on" in md
    uncached = _layer_sweep(tmp_path / "uncached", 0.0, "none", cached=False)
    assert "feature cache" not in write_summary(uncached)[1].read_text()


def test_comparison_puts_both_sweeps_side_by_side(tmp_path):
    plain = _layer_sweep(tmp_path / "padim_screw_layers", 0.0, "none")
    aligned = _layer_sweep(tmp_path / "padim_screw_layers_orb90", 0.15, "orb90")
    out = tmp_path / "comparison.md"
    assert main([str(plain), "--compare", str(aligned), "--out", str(out), "--top", "3"]) == 0
    md = out.read_text()
    assert (plain / "summary.md").is_file() and (aligned / "summary.md").is_file()
    assert "`alignment.name`: none (padim_screw_layers), orb90 (padim_screw_layers_orb90)" in md
    assert "only in padim_screw_layers_orb90: `alignment.ratio`=0.75" in md
    top, every = _tables(md)
    header, *rows = top
    assert header == ["rank",
                      "padim_screw_layers: setting", "padim_screw_layers: image_auroc",
                      "padim_screw_layers: ms_per_image", "padim_screw_layers: train_s",
                      "padim_screw_layers_orb90: setting",
                      "padim_screw_layers_orb90: image_auroc",
                      "padim_screw_layers_orb90: ms_per_image",
                      "padim_screw_layers_orb90: train_s"]
    assert [r[0] for r in rows] == ["1", "2", "3", "default"]
    assert rows[0][1:3] == ["0 / 1", "0.9100"]  # plain: layer1=0 leads
    assert rows[0][5:7] == ["1 / 1", "0.9600"]  # aligned: layer1=1 gained 0.15
    # the default (layer1=2, layer2=1) with its rank in each sweep
    assert rows[3][1] == "2 / 1 (rank 5)" and rows[3][2] == "0.7100"
    assert rows[3][5] == "2 / 1 (rank 5)"
    header, *rows = every
    assert header[:2] == ["layers.layer1", "layers.layer2"] and len(rows) == 6
    diffs = {tuple(r[:2]): r[-1] for r in rows}
    assert diffs["1", "0"] == "+0.1500" and diffs["0", "0"] == "+0.0000"
    assert diffs["2 (default)", "1 (default)"] == "+0.0000"


def test_comparison_refuses_sweeps_of_other_keys(tmp_path):
    plain = _layer_sweep(tmp_path / "a", 0.0, "none")
    other = _texture_sweep(tmp_path / "b")
    with pytest.raises(AnomalyBenchError, match="same swept keys"):
        compare_markdown(plain, other, tmp_path)
    assert main([str(plain), "--compare", str(tmp_path / "missing")]) == 2
    path = write_comparison(plain, _layer_sweep(tmp_path / "c", 0.1, "orb90"))
    assert path == plain / "comparison.md" and path.is_file()


@pytest.fixture(scope="module")
def rotated_part(tmp_path_factory):
    from anomaly_bench.data import ensure_synthetic

    root = ensure_synthetic(tmp_path_factory.mktemp("syn") / "synthetic", seed=0)
    turns = json.loads((root / "manifest.json").read_text())["categories"]["rotated_part"]
    return root, turns["rotations"]


def _trained_sweep(root, dataset_root, alignment: dict):
    job_config = {"dataset": {"name": "synthetic", "root": str(dataset_root),
                              "generator_seed": 0},
                  "category": "rotated_part", "alignment": alignment}
    _job(root, 0, ["experiment=padim_screw_layers"], {}, [
        _row("rotated_part", image_auroc=0.8, n_train=32, alignment=alignment["name"])])
    (root / "0" / "rotated_part").mkdir()
    (root / "0" / "rotated_part" / "config.json").write_text(json.dumps(job_config))
    return root, job_config


def _tiles(png, n_rows: int, n_cols: int) -> list[list[np.ndarray]]:
    """The image tiles of a plot_sample_rows figure (1.5 in tiles at 90 dpi), inner part."""
    with Image.open(png) as im:
        img = np.asarray(im.convert("L")).astype(float)
    dpi = 90
    top, row, head, left, col, tile = 0.5, 1.67, 0.17, 0.25, 1.54, 1.5  # inches
    out = []
    for r in range(n_rows):
        y = round((top + r * row + head) * dpi)
        xs = [round((left + c * col) * dpi) for c in range(n_cols)]
        inner = slice(10, round(tile * dpi) - 10)
        out.append([img[y:, x:][inner, inner] for x in xs])
    return out


def _near(size: tuple[int, int], inches: tuple[float, float], dpi: int = 90) -> bool:
    return all(abs(px - i * dpi) <= 1 for px, i in zip(size, inches, strict=True))


def _pose(tile: np.ndarray) -> tuple[bool, int]:
    """(standing, side of the head) of the dark part in a tile: its long axis, and the sign
    of its mass centre's offset from the middle of its extent along that axis."""
    ys, xs = np.nonzero(tile < np.median(tile) - 30)
    standing = bool(ys.std() > xs.std())
    along = ys if standing else xs
    return standing, int(np.sign(along.mean() - (along.min() + along.max()) / 2))


def test_training_figure_shows_the_jobs_quarter_turns(rotated_part, tmp_path):
    root, manifest = rotated_part
    sweep, job_config = _trained_sweep(tmp_path / "aligned", root,
                                       {"name": "orb90", "reference": 3, "n_features": 1000,
                                        "ratio": 0.75, "min_matches": 10, "max_side": 512})
    samples = training_samples(job_config, 6)
    assert [p.name for p in samples.paths] == [f"{i:03d}.png" for i in range(6)]
    assert samples.reference.name == "003.png"
    # turning image i by (k_ref - k_i) gives it the reference's orientation
    k_ref = manifest["train/good/003.png"]
    want = [(k_ref - manifest[f"train/good/{i:03d}.png"]) % 4 for i in range(6)]
    assert samples.turns == want and len(set(want)) > 1
    _, md_path = write_summary(sweep, train_samples=6)
    png = sweep / "figures" / "train_samples_rotated_part.png"
    assert "(figures/train_samples_rotated_part.png)" in md_path.read_text()
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert _near(im.size, (0.25 + 6 * 1.54, 0.5 + 2 * 1.67))  # 6 columns, 2 rows
    stored, turned = _tiles(png, 2, 6)
    # the drawn part: lying or standing, and on which side of its extent its heavy head is
    poses_stored, poses_turned = [_pose(t) for t in stored], [_pose(t) for t in turned]
    assert poses_turned == [poses_stored[3]] * 6  # every turned image as the reference
    assert [p != poses_stored[3] for p in poses_stored] == [k != 0 for k in want]


def test_training_figure_of_an_unaligned_sweep_has_one_row(rotated_part, tmp_path):
    root, _ = rotated_part
    sweep, job_config = _trained_sweep(tmp_path / "plain", root, {"name": "none"})
    assert training_samples(job_config, 4).turns is None
    write_summary(sweep, train_samples=4)
    with Image.open(sweep / "figures" / "train_samples_rotated_part.png") as im:
        assert _near(im.size, (0.25 + 4 * 1.54, 0.5 + 1.67))  # 4 columns, 1 row
    # a dataset that moved: the summary says so instead of failing
    (sweep / "0" / "rotated_part" / "config.json").write_text(json.dumps(
        {**job_config, "dataset": {**job_config["dataset"], "root": str(tmp_path / "gone")}}))
    _, md_path = write_summary(sweep, train_samples=4)
    assert "Training images of rotated_part not drawn" in md_path.read_text()
