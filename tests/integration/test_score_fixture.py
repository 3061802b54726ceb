"""Every method's per-image scores on the synthetic data stay what they were recorded as.

``tests/data/method_scores.json`` holds the scores of each method (seeded random ResNet-18,
64 px) on each synthetic category. A refactoring that changes any score by more than
1e-6 (relative) fails here. After an intended change of a method's values, rewrite the
file with ``ANOMALY_BENCH_RECORD_SCORES=1 pytest tests/integration/test_score_fixture.py``
and say why in the commit.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from fixtures import compose_config

from anomaly_bench.runner import Runner

from cli_helpers import FAST

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "method_scores.json"
METHODS = ("padim", "patchcore", "spade", "texture_knn")
CATEGORIES = ("grain", "rotated_part", "stripes")


def _scores(method: str, root: Path, run_dir: Path) -> dict[str, dict[str, float]]:
    cfg = compose_config([*FAST, f"method={method}", "dataset=synthetic",
                          f"dataset.root={root}", "plots.enabled=false", "device=cpu"])
    Runner(cfg, run_dir).run()
    out = {}
    for category in CATEGORIES:
        with (run_dir / category / "scores.csv").open(newline="") as fh:
            out[category] = {Path(r["path"]).relative_to(root / category).as_posix():
                             float(r["score"]) for r in csv.DictReader(fh)}
    return out


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_the_recorded_ones(method, synthetic_root, tmp_path, recorded):
    got = _scores(method, synthetic_root, tmp_path / "run")
    if os.environ.get("ANOMALY_BENCH_RECORD_SCORES") == "1":
        data = {**recorded, method: got}
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        recorded.update(data)
    want = recorded[method]
    assert got.keys() == want.keys()
    for category in CATEGORIES:
        assert got[category].keys() == want[category].keys()
        for name, value in want[category].items():
            assert got[category][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (
                method, category, name)
