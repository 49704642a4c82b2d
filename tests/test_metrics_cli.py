"""--metrics-file from the command line: what each kind of invocation leaves in the file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import finish, flocked, hold, run, start, wait_for

NOBODY = 65534


def values(path: Path) -> dict[str, float]:
    """Each sample of the job ``job`` by its name, read with the official parser."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            assert sample.labels == {"name": "job"}
            found[sample.name] = sample.value
    return found


def test_every_kind_of_invocation_is_recorded(lockdir: Path, tmp_path: Path, procs):
    lock, prom, go = lockdir / "job.lock", tmp_path / "job.prom", tmp_path / "go"
    opts = ("-l", str(lock), "--name", "job", "--metrics-file", str(prom))
    before = time.time()
    assert run(*opts, "-c", "sleep 0.2").returncode == 0
    m = values(prom)
    assert before <= m["taskrunner_last_start_timestamp_seconds"] <= time.time()
    assert m["taskrunner_last_duration_seconds"] >= 0.2
    assert m["taskrunner_last_exit_status"] == 0
    assert m["taskrunner_last_invocation_status"] == 0
    assert (m["taskrunner_runs_total"], m["taskrunner_refusals_total"]) == (1, 0)
    assert (m["taskrunner_lock_held"], m["taskrunner_consecutive_refusals"]) == (0, 0)
    started = m["taskrunner_last_start_timestamp_seconds"]

    procs.append(hold(lock, go))
    assert run(*opts, "-c", "true").returncode == 75
    assert run(*opts, "--stuck-after", "0.001", "-c", "true").returncode == 76
    m = values(prom)
    assert m["taskrunner_last_start_timestamp_seconds"] == started, "a refusal keeps it"
    assert m["taskrunner_last_invocation_status"] == 76
    assert m["taskrunner_consecutive_refusals"] == 2
    assert (m["taskrunner_refusals_total"], m["taskrunner_reports_total"]) == (2, 1)
    assert m["taskrunner_lock_held"] == 1
    go.touch()
    assert finish(procs[0])[0] == 0

    assert run(*opts, "--timeout", "0.1", "-c", "sleep 30").returncode == 124
    m = values(prom)
    assert m["taskrunner_last_exit_status"] == 124
    assert m["taskrunner_consecutive_refusals"] == 0
    assert m["taskrunner_runs_total"] == 2, "the holder ran without --metrics-file"
    assert m["taskrunner_lock_held"] == 0
    assert m["taskrunner_last_start_timestamp_seconds"] > started


def test_an_unusable_lock_is_recorded_too(tmp_path: Path):
    prom = tmp_path / "job.prom"
    result = run("-l", str(tmp_path / "missing" / "job.lock"), "--name", "job",
                 "--metrics-file", str(prom), "-c", "true")  # fmt: skip
    assert result.returncode == 71
    m = values(prom)
    assert m["taskrunner_last_invocation_status"] == 71
    assert "taskrunner_last_start_timestamp_seconds" not in m


def test_a_metrics_file_that_cannot_be_written_is_a_warning(lockdir: Path, tmp_path: Path):
    target, prom, ran = tmp_path / "target", tmp_path / "job.prom", tmp_path / "ran"
    target.write_text("keep\n")
    prom.symlink_to(target)
    result = run("-l", str(lockdir / "job.lock"), "--metrics-file", str(prom),
                 "-c", f"touch {ran}; exit 3")  # fmt: skip
    assert result.returncode == 3
    assert ran.exists()
    assert f"metrics not written: {prom}: is a symbolic link" in result.stderr
    assert target.read_text() == "keep\n"


def test_a_storm_of_refusals_is_counted_exactly(lockdir: Path, tmp_path: Path, procs):
    lock, prom, go = lockdir / "job.lock", tmp_path / "job.prom", tmp_path / "go"
    procs.append(hold(lock, go))
    opts = ("-l", str(lock), "--name", "job", "--metrics-file", str(prom), "-c", "true")
    runs = [start(*opts) for _ in range(30)]
    assert [finish(p)[0] for p in runs] == [75] * 30
    m = values(prom)
    assert m["taskrunner_refusals_total"] == 30
    assert m["taskrunner_consecutive_refusals"] == 30
    go.touch()


def test_the_metrics_file_must_not_be_the_lock(lockdir: Path):
    lock = str(lockdir / "job.lock")
    result = run("-l", lock, "--metrics-file", lock, "-c", "true")
    assert result.returncode == 2
    assert "the metrics file must not be the lock file" in result.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another user",
)
def test_another_user_flocking_the_metrics_file_does_not_hold_the_run_up(lockdir: Path, procs):
    """The file is 0644 for node_exporter, so any user can open it and flock it; the run
    neither waits for that flock (its patience is 30 s, the flock is held for 40) nor
    leaves the metrics unwritten."""
    public = Path(tempfile.mkdtemp(prefix="taskrunner-public-", dir="/tmp"))
    try:
        public.chmod(0o755)
        prom = public / "job.prom"
        opts = ("-l", str(lockdir / "r.lock"), "--name", "job", "--metrics-file", str(prom))
        assert run(*opts, "-c", "true").returncode == 0
        assert stat.S_IMODE(prom.stat().st_mode) == 0o644
        holder = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "flock", "-s", str(prom), "sleep", "40"],
            start_new_session=True, text=True,
        )  # fmt: skip
        procs.append(holder)

        def nobody_flocks() -> bool:
            assert holder.poll() is None, "nobody's flock ended early"
            return flocked(prom)

        wait_for(nobody_flocks, "nobody to flock the metrics file")
        result = run(*opts, "-c", "true")
        assert (result.returncode, result.stderr) == (0, "")
        assert holder.poll() is None, "the run was done while nobody still held the flock"
        assert values(prom)["taskrunner_runs_total"] == 2
        sidecar = (public / "job.prom.lock").stat()
        assert (stat.S_IMODE(sidecar.st_mode), sidecar.st_uid) == (0o600, 0)
    finally:
        shutil.rmtree(public)
