"""The command under faults of its environment: symbolic links where the run writes, write
failures (file-size limit, a file where the run directory goes, a read-only filesystem),
SIGTERM. Each one is one paragraph (or one line) with its exit code, writes nothing
outside the run directory, and keeps what was computed."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_bench.report.results import read_rows

from cli_helpers import FAST, make_mvtec, run_cli

pytestmark = pytest.mark.slow


def assert_clean_error(res, *needles, code: int = 2):
    assert res.code == code, (res.code, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    message = [ln for ln in res.stderr.splitlines() if ln.startswith("anomaly-bench:")]
    assert len(message) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in message[0], message[0]


@pytest.fixture
def mvtec(tmp_path):
    return make_mvtec(tmp_path / "mvtec", categories=("bottle",))


# (link in the run directory, extra overrides, whether a row was computed when refused)
LINKS = [
    ("cli.log", (), False),                   # Hydra's job log, appended to
    (".hydra/config.yaml", (), False),        # written by Hydra before the task
    (".results.csv.lock", (), True),          # dangling: opening would create the target
    ("results.csv", (), False),              # read at the start: refused before any work
    ("results.csv", ("resume=false",), True),  # not read: refused when the row is written
    ("bottle/scores.csv", (), True),
    ("bottle/config.json", (), True),
    ("bottle/model.pt", ("stage=train",), False),
]


@pytest.mark.parametrize(("name", "extra", "computed"), LINKS)
@pytest.mark.parametrize("target", ["outside", "inside"])
def test_nothing_is_written_through_a_symbolic_link(tmp_path, mvtec, name, extra, computed,
                                                    target):
    run = tmp_path / "run"
    folder = tmp_path / "elsewhere" if target == "outside" else run / "elsewhere"
    folder.mkdir(parents=True)
    victim = folder / "victim"
    dangling = name.endswith(".lock")
    if not dangling:
        victim.write_text("not yours\n")
    link = run / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    res = run_cli(["dataset=mvtec", f"dataset.root={mvtec}", "plots.enabled=false", *extra],
                  run)
    assert_clean_error(res, Path(name).name, "symbolic link")
    if computed:  # the refusal carries the computed row
        assert "image_auroc=" in res.stderr and "aupro=" in res.stderr
    assert not victim.exists() if dangling else victim.read_text() == "not yours\n"
    assert link.is_symlink()


def test_a_plot_behind_a_link_is_not_written_and_the_row_is(tmp_path, mvtec):
    run = tmp_path / "run"
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not yours")
    (run / "bottle" / "plots").mkdir(parents=True)
    (run / "bottle" / "plots" / "roc.png").symlink_to(victim)
    res = run_cli(["dataset=mvtec", f"dataset.root={mvtec}"], run)
    assert res.code == 0, res.stderr[-2000:]
    assert victim.read_bytes() == b"not yours"
    assert "plots not written" in (run / "cli.log").read_text()
    assert [r["category"] for r in read_rows(run / "results.csv")] == ["bottle"]


def _limited(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_file_over_the_size_limit_is_one_paragraph(tmp_path, mvtec):
    run = tmp_path / "run"
    # ulimit -f 128 (KiB): the PaDiM model.pt of this data set is about 460 KB
    cmd = [sys.executable, "-m", "anomaly_bench.cli", *FAST, "dataset=mvtec",
           f"dataset.root={mvtec}", "stage=train", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300, preexec_fn=_limited(128 * 1024))

    class Res:
        code, stderr = proc.returncode, proc.stderr

    assert_clean_error(Res, "model.pt", "File too large", "ulimit -f")
    assert not (run / "bottle" / "model.pt").exists()
    assert not [p for p in (run / "bottle").iterdir() if p.name.endswith(".tmp")]


def test_a_run_dir_under_a_file_is_one_paragraph(tmp_path, mvtec):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = run_cli(["dataset=mvtec", f"dataset.root={mvtec}"], blocker / "run", cwd=tmp_path)
    assert_clean_error(res, f"hydra.run.dir={blocker / 'run'}", "Not a directory",
                       "not a folder")
    sweep = run_cli(["-m", *FAST, "dataset=mvtec", f"dataset.root={mvtec}", "seed=0,1",
                     f"hydra.sweep.dir={blocker / 'sweep'}"], tmp_path / "x", cwd=tmp_path,
                    fast=False)
    assert_clean_error(sweep, f"hydra.sweep.dir={blocker / 'sweep'}", "Not a directory")


def _unshare() -> list[str] | None:
    """A command prefix giving a private mount namespace where a read-only tmpfs can be
    mounted, or None when this machine allows none."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(prefix[0]) is None:
            return None
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.parametrize("exists", [False, True])
def test_a_run_dir_on_a_read_only_filesystem_is_one_paragraph(tmp_path, mvtec, exists):
    prefix = _unshare()
    if prefix is None:
        pytest.skip("no mount namespace on this machine to mount a read-only filesystem")
    ro = tmp_path / "ro"
    ro.mkdir()
    run = ro / "run" if not exists else ro
    cli = [sys.executable, "-m", "anomaly_bench.cli", *FAST, "dataset=mvtec",
           f"dataset.root={mvtec}", f"hydra.run.dir={run}"]
    script = f"mount -t tmpfs -o ro tmpfs {ro} && exec \"$@\""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([*prefix, "sh", "-c", script, "sh", *cli], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)

    class Res:
        code, stderr = proc.returncode, proc.stderr

    assert_clean_error(Res, f"hydra.run.dir={run}", "Read-only file system")


# ---------------------------------------------------------------------- limits
def _guarded(limit: int):
    """preexec_fn capping the address space: a regression that allocates the refused
    configuration fails fast instead of exhausting a shared machine."""
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return preexec


def test_a_configuration_larger_than_the_machine_is_refused_before_any_image_is_read(
        tmp_path, mvtec):
    victim = mvtec / "bottle" / "train" / "good" / "000.png"
    victim.write_bytes(victim.read_bytes()[:100])  # reading any image would be an error
    run = tmp_path / "run"
    # about 4 TiB (1 TiB of input alone): more than any machine has
    cmd = [sys.executable, "-m", "anomaly_bench.cli", *FAST, "dataset=mvtec",
           f"dataset.root={mvtec}", "resolution.size=20000", "batch_size=256",
           f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300, preexec_fn=_guarded(12 * 2**30))

    class Res:
        code, stderr = proc.returncode, proc.stderr

    assert_clean_error(Res, "GiB", "resolution.size=20000", "batch_size=256", "memory")
    assert str(victim) not in proc.stderr
    assert not (run / "bottle").exists()


def test_a_name_too_long_for_the_filesystem_is_refused_before_fitting(tmp_path):
    data = make_mvtec(tmp_path / "data", categories=("cat",)) / "cat"
    name = "c" * 270
    res = run_cli(["dataset=folder", f"dataset.root={data}", f"dataset.category={name}"],
                  tmp_path / "run")
    assert_clean_error(res, "dataset.category=", "270 bytes", "255")
    assert "fit " not in res.stderr  # no progress bar: nothing was fitted
    assert not (tmp_path / "run" / "results.csv").exists()


def test_sigterm_stops_like_ctrl_c_and_the_next_run_resumes(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))
    run = tmp_path / "run"
    args = [*FAST, "dataset=mvtec", f"dataset.root={data}", "plots.enabled=false",
            f"hydra.run.dir={run}"]
    # SIGTERM (what SLURM sends before it kills a job) arrives while screw runs
    script = (
        "import os, signal, sys\n"
        "from anomaly_bench import cli, runner\n"
        "original = runner.Runner._test\n"
        "def _test(self, fitted, split, *a):\n"
        "    if split.category == 'screw':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return original(self, fitted, split, *a)\n"
        "runner.Runner._test = _test\n"
        "def report(*a):\n"
        "    print('USR1', signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, file=sys.stderr)\n"
        "    print('XFSZ', signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN, file=sys.stderr)\n"
        "import atexit; atexit.register(report)\n"
        f"sys.argv = ['anomaly-bench', *{args!r}]\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    message = [ln for ln in proc.stderr.splitlines() if ln.startswith("anomaly-bench:")]
    assert len(message) == 1 and "SIGTERM" in message[0] and str(run) in message[0], message
    assert "Traceback" not in proc.stderr
    assert "USR1 True" in proc.stderr and "XFSZ True" in proc.stderr  # SIGUSR1 left alone
    assert [r["category"] for r in read_rows(run / "results.csv")] == ["bottle"]
    resumed = run_cli(["dataset=mvtec", f"dataset.root={data}", "plots.enabled=false"], run)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert "bottle: already in" in resumed.stderr + resumed.stdout
    assert [r["category"] for r in read_rows(run / "results.csv")] == ["bottle", "screw"]
