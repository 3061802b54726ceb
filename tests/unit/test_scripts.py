"""The table scripts in scripts/: the commands they run, with the commands themselves
replaced by recorders (no sweep runs)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$AB_TEST_LOG"
prev=""
train=""
for arg in "$@"; do
  case "$arg" in
    *seed=FAIL*) exit 2 ;;
    stage=train) train=1 ;;
    hydra.sweep.dir=*) dir="${arg#hydra.sweep.dir=}"; mkdir -p "$dir" ;;
  esac
  if [ "$prev" = "--out" ]; then echo "comparison" > "$arg"; fi
  prev="$arg"
done
if [ -n "$train" ]; then  # a finished training job, as the runner records it
  mkdir -p "$dir/job-1"; echo '{"status": "finished"}' > "$dir/job-1/job.json"
fi
"""


def _run(script: str, tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("anomaly-bench", "anomaly-bench-report", "anomaly-bench-import-aprilgan"):
        path = bin_dir / name
        path.write_text(RECORDER)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.txt"
    full = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "AB_TEST_LOG": str(log), "OUT": str(tmp_path / "out"), **env}
    full.pop("LAUNCHER", None)
    full.update(env)
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.is_file() else []
    return proc.returncode, sorted(calls), proc.stdout + proc.stderr


def test_padim_tables_go_to_slurm_through_the_preset(tmp_path):
    code, calls, out = _run("padim_screw_tables.sh", tmp_path, "/data", "hydra.launcher.mem_gb=64")
    assert code == 0, out
    out_dir = tmp_path / "out"
    sweeps = [c for c in calls if c.startswith("anomaly-bench -m")]
    assert sweeps == sorted(
        f"anomaly-bench -m experiment={e} data_root=/data hydra.sweep.dir={out_dir}/{e} "
        "hydra/launcher=slurm hydra.launcher.mem_gb=64"
        for e in ("padim_screw_layers", "padim_screw_layers_orb90"))
    assert f"anomaly-bench-report {out_dir}/padim_screw_layers --compare " \
           f"{out_dir}/padim_screw_layers_orb90 --out {out_dir}/comparison.md" in calls


@pytest.mark.parametrize(("script", "tables"), [
    ("texture_tables.sh", ["experiment=texture_v01,texture_v02,texture_v03,texture_v04,"
                           "texture_v05,texture_v06"]),
    ("spade_tables.sh", ["method=spade dataset=mvtec dataset.category=all",
                         "experiment=spade_mvtec_layers",
                         "experiment=spade_mvtec_gallery seed=0,1,2",
                         "experiment=spade_stc"]),
    ("mmr_aebad_tables.sh", ["experiment=mmr_aebad_s method.masking=random,saliency",
                             "experiment=mmr_aebad_v method.masking=random,saliency"]),
])
def test_table_scripts_run_each_table_as_a_sweep(tmp_path, script, tables):
    code, calls, out = _run(script, tmp_path, "/data", LAUNCHER="parallel")
    assert code == 0, out
    assert len(calls) == len(tables)
    for table in tables:
        assert any(c.startswith(f"anomaly-bench -m {table} data_root=/data hydra.sweep.dir=")
                   and c.endswith("hydra/launcher=parallel") for c in calls), (table, calls)


def test_a_failed_sweep_is_named_and_the_script_exits_non_zero(tmp_path):
    code, calls, out = _run("spade_tables.sh", tmp_path, "/data", "seed=FAIL", LAUNCHER="basic")
    assert code == 1
    assert len(calls) == 4 and not any("hydra/launcher" in c for c in calls)
    assert "== failed: spade_mvtec spade_mvtec_layers spade_mvtec_gallery spade_stc" in out
    assert f"OUT={tmp_path / 'out'}" in out


def test_clip_tables_train_adapters_then_test_them_on_the_other_dataset(tmp_path):
    """Adapters trained on VisA are tested on MVTec AD and the reverse, through the
    launcher, with the checkpoint of the training job's directory."""
    code, calls, out = _run("clip_tables.sh", tmp_path, "/data", "hydra.launcher.mem_gb=64")
    assert code == 0, out
    out_dir = tmp_path / "out"
    assert len(calls) == 10 and all(c.startswith("anomaly-bench -m ") for c in calls)
    assert all("hydra/launcher=slurm hydra.launcher.mem_gb=64" in c for c in calls)
    for trained, tested in (("visa", "mvtec"), ("mvtec", "visa")):
        ckpt = f"checkpoint={out_dir}/aprilgan_trained_on_{trained}/job-1/model.pt"
        assert any(f"stage=train dataset={trained}" in c for c in calls)
        assert any(f"experiment=aprilgan_zero_shot_{tested} {ckpt}" in c for c in calls)
    assert sum("experiment=winclip" in c for c in calls) == 4


def test_clip_tables_can_use_the_published_adapters(tmp_path):
    code, calls, out = _run("clip_tables.sh", tmp_path, "/data", "backbone.quick_gelu=true",
                            "hydra.launcher.mem_gb=64", APRILGAN_ADAPTERS="/pretrained")
    assert code == 0, out
    out_dir = tmp_path / "out"
    imports = [c for c in calls if c.startswith("anomaly-bench-import-aprilgan")]
    assert imports == sorted(
        f"anomaly-bench-import-aprilgan /pretrained/{s}_pretrained.pth "
        f"{out_dir}/aprilgan_trained_on_{s}/model.pt --trained-on {s} backbone.quick_gelu=true"
        for s in ("visa", "mvtec"))
    assert not any("stage=train" in c for c in calls)
    assert any(f"checkpoint={out_dir}/aprilgan_trained_on_visa/model.pt" in c for c in calls)
