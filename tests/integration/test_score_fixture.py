"""Every method's per-image scores on the synthetic data stay what they were recorded as,
on this CPU's kernels and on the kernels every x86-64 CPU has.

``tests/data/method_scores.json`` holds the scores of each method (seeded random ResNet-18,
64 px) on each synthetic category. A refactoring that changes a score by more than
:data:`REL` fails here. After an intended change of a method's values, rewrite the file
with ``ANOMALY_BENCH_RECORD_SCORES=1 pytest tests/integration/test_score_fixture.py`` and
say why in the commit.

Each method runs twice: with the kernels this machine selects (AMX, AVX-512, ...) and in
a subprocess limited to AVX2 kernels without the AMX screen (``ANOMALY_BENCH_NO_AMX``,
oneDNN's ``ONEDNN_MAX_CPU_ISA``, ATen's ``ATEN_CPU_CAPABILITY``, MKL's
``MKL_ENABLE_INSTRUCTIONS``; ignored where they do not apply), so a figure that holds only
on the CPU it was recorded on fails on any machine, an AMX one included.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import compose_config

from anomaly_bench.runner import Runner

from cli_helpers import FAST

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "method_scores.json"
METHODS = ("padim", "patchcore", "spade", "texture_knn")
CATEGORIES = ("grain", "rotated_part", "stripes")
#: The kernels every x86-64 CPU of the last decade runs (the variables are ignored elsewhere).
PORTABLE = {"ANOMALY_BENCH_NO_AMX": "1", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
#: Relative tolerance, from float32 arithmetic. Kernels differ in the order in which they
#: add float32 products; every distance behind a score is a sum of squared differences
#: (anomaly_bench/ops/knn.py measures the chosen neighbours that way), so the order changes
#: it by rounding alone. For rounding errors of random sign a sum of n terms is off by at
#: most lambda * sqrt(n) * u (u = 2^-24; Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019),
#: with probability above 1 - 2 exp(-lambda^2 / 2): lambda = 7 leaves less than 1e-10 per
#: score. n = 1024 is the longest sum behind a recorded score (PatchCore's 1024-d patch
#: embedding): 7 * 32 * 2^-24 = 1.3e-5. (Measured on one Intel machine: the scores under
#: AMX, AVX-512 and AVX2 kernels agree to 8e-8.)
REL = 7 * math.sqrt(1024) * 2.0 ** -24


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


def _portable_scores(method: str, root: Path, run_dir: Path) -> dict[str, dict[str, float]]:
    """:func:`_scores` in a subprocess restricted to the portable kernels."""
    here = Path(__file__).resolve().parent
    script = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]\n"
        "from pathlib import Path\n"
        "from test_score_fixture import _scores\n"
        f"print(json.dumps(_scores({method!r}, Path({str(root)!r}), Path({str(run_dir)!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **PORTABLE}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


@pytest.mark.parametrize("kernels", ["native", "portable"])
@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_the_recorded_ones(method, kernels, synthetic_root, tmp_path, recorded):
    if kernels == "native":
        got = _scores(method, synthetic_root, tmp_path / "run")
    else:
        got = _portable_scores(method, synthetic_root, tmp_path / "run")
    if os.environ.get("ANOMALY_BENCH_RECORD_SCORES") == "1" and kernels == "native":
        data = {**recorded, method: got}
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        recorded.update(data)
    want = recorded[method]
    assert got.keys() == want.keys()
    for category in CATEGORIES:
        assert got[category].keys() == want[category].keys()
        for name, value in want[category].items():
            assert got[category][name] == pytest.approx(value, rel=REL, abs=1e-9), (
                method, kernels, category, name)
