"""--wait: a waiter takes the lock as soon as it is released, or refuses at the deadline."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from taskrunner.holder import Holder

from conftest import blocked_in_flock, children, finish, hold, kill_group, probe, start, wait_for


def test_waiter_runs_once_the_holder_is_done(lockdir: Path, tmp_path: Path, procs):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    holder = start("-l", str(lock), "-c", probe(log, go, "holder"))
    procs.append(holder)
    wait_for(log.exists, "the holder's command")
    waiter = start("-l", str(lock), "--wait", "60", "-c", probe(log, None, "waiter"))
    procs.append(waiter)
    wait_for(lambda: blocked_in_flock(waiter.pid), "the waiter to block on the lock")
    go.touch()
    assert finish(holder)[0] == 0
    assert finish(waiter) == (0, "", "")
    assert log.read_text().split() == [
        "start",
        "holder",
        "end",
        "holder",
        "start",
        "waiter",
        "end",
        "waiter",
    ]
    assert list(lockdir.iterdir()) == []


def test_waiter_refuses_at_its_deadline_and_is_counted(lockdir: Path, tmp_path: Path, procs):
    lock, go, counter, ran = (
        lockdir / "job.lock",
        tmp_path / "go",
        tmp_path / "count",
        tmp_path / "ran",
    )
    holder = hold(lock, go)
    procs.append(holder)
    status, _, err = finish(
        start("-l", str(lock), "--wait", "0.3", "-t", "5", "-f", str(counter), "-c", f"touch {ran}")
    )
    assert (status, err) == (75, "")
    assert counter.read_text() == "1\n"
    assert not ran.exists()
    go.touch()
    assert finish(holder)[0] == 0


def test_waiter_takes_over_when_the_holder_dies(lockdir: Path, tmp_path: Path, procs):
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    holder = start("-l", str(lock), "--", "sleep", "60")
    procs.append(holder)
    wait_for(lambda: children(holder.pid), "the holder's command")
    (command,) = children(holder.pid)
    waiter = start("-l", str(lock), "--wait", "60", "-c", f"touch {ran}")
    procs.append(waiter)
    wait_for(lambda: blocked_in_flock(waiter.pid), "the waiter to block on the lock")
    holder.send_signal(signal.SIGKILL)
    kill_group(command)
    status, _, err = finish(waiter)
    assert status == 0
    assert ran.exists()
    assert f"pid {holder.pid}" in err and "removed the stale lock" in err
    assert list(lockdir.iterdir()) == []


def test_a_waiters_record_says_when_it_took_the_lock(lockdir: Path, tmp_path: Path, procs):
    lock, go, seen = lockdir / "job.lock", tmp_path / "go", tmp_path / "seen"
    holder = hold(lock, go)
    procs.append(holder)
    waiter = start("-l", str(lock), "--wait", "60", "-c", f'cat "$TASKRUNNER_LOCKFILE" > {seen}')
    procs.append(waiter)
    wait_for(lambda: blocked_in_flock(waiter.pid), "the waiter to block on the lock")
    time.sleep(1.5)  # long enough for the record made before the wait to be renewed
    released = time.time()
    go.touch()
    assert finish(holder)[0] == 0
    assert finish(waiter)[0] == 0
    record = Holder.decode(seen.read_bytes())
    assert record is not None
    assert record.pid == waiter.pid
    assert record.started >= released - 0.1
