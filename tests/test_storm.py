"""Many runs at once: never two commands at a time, every refusal counted, nothing left."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import HANG, finish, overlaps, probe, start, starts, wait_for

STORM = 100


def test_storm_of_simultaneous_starts_runs_exactly_one(lockdir: Path, tmp_path: Path, procs):
    lock, counter = lockdir / "job.lock", lockdir / "count"
    log, go = tmp_path / "log", tmp_path / "go"
    runners = [
        start("-l", str(lock), "-t", "100000", "-f", str(counter), "-c", probe(log, go))
        for _ in range(STORM)
    ]
    procs.extend(runners)
    # The one that runs waits for `go`, which comes once every other run has been refused.
    wait_for(lambda: sum(p.poll() is not None for p in runners) == STORM - 1, "the refusals")
    go.touch()
    statuses = sorted(finish(p)[0] for p in runners)
    assert statuses == [0] + [75] * (STORM - 1)
    assert starts(log) == 1
    assert overlaps(log) == []
    assert counter.read_text() == f"{STORM - 1}\n"
    assert [p.name for p in lockdir.iterdir()] == ["count"]


def test_storm_against_a_held_lock_counts_every_refusal(lockdir: Path, tmp_path: Path, procs):
    lock, counter = lockdir / "job.lock", lockdir / "count"
    log, go = tmp_path / "log", tmp_path / "go"
    holder = start("-l", str(lock), "-t", "100000", "-f", str(counter), "-c", probe(log, go))
    procs.append(holder)
    wait_for(log.exists, "the holder's command")
    runners = [
        start("-l", str(lock), "-t", "100000", "-f", str(counter), "-c", probe(log))
        for _ in range(STORM)
    ]
    procs.extend(runners)
    results = [finish(p) for p in runners]
    assert [r[0] for r in results] == [75] * STORM
    assert all(r[2] == "" for r in results), "a refusal below the threshold is silent"
    assert counter.read_text() == f"{STORM}\n"
    go.touch()
    assert finish(holder)[0] == 0
    assert starts(log) == 1
    assert [p.name for p in lockdir.iterdir()] == ["count"]


def test_waiters_run_one_after_another(lockdir: Path, tmp_path: Path, procs):
    lock, log = lockdir / "job.lock", tmp_path / "log"
    command = probe(log) + "; sleep 0.01"
    waiters = [start("-l", str(lock), "--wait", "60", "-c", command) for _ in range(25)]
    procs.extend(waiters)
    assert [finish(p)[0] for p in waiters] == [0] * 25
    assert starts(log) == 25
    assert overlaps(log) == []
    assert list(lockdir.iterdir()) == []


def test_overlap_checker_catches_a_broken_lock(lockdir: Path, tmp_path: Path):
    """The negative control: flock(1) on a lock file that its holder deletes lets a waiter
    and a newcomer run at once. The checker above must see that."""
    lock, log, go1, go2 = lockdir / "job.lock", tmp_path / "log", tmp_path / "go1", tmp_path / "go2"
    first = subprocess.Popen(["flock", str(lock), "sh", "-c", f"{probe(log, go1, 'A')}; rm {lock}"])
    wait_for(log.exists, "the first holder")
    waiter = subprocess.Popen(["flock", str(lock), "sh", "-c", probe(log, go2, "B")])
    go1.touch()
    first.wait(timeout=HANG)
    wait_for(lambda: starts(log) == 2, "the waiter to start on the deleted file")
    newcomer = subprocess.run(["flock", str(lock), "sh", "-c", probe(log, None, "C")], timeout=HANG)
    go2.touch()
    waiter.wait(timeout=HANG)
    assert newcomer.returncode == 0
    assert overlaps(log) == ["C started while B ran", "B ended while None ran"]
