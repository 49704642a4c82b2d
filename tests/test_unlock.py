"""``taskrunner unlock``: removes a stale lock, or with --force a manual hold; never a live
lock, and never unsafely, even while runs are taking the same lock over."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import (
    HANG,
    NOBODY,
    TASKRUNNER,
    finish,
    leave_stale,
    nobodys_file,
    overlaps,
    probe,
    run,
    settled,
    start,
    until,
    wait_for,
)

HOST = socket.gethostname()


def unlock(*args: str) -> subprocess.CompletedProcess[str]:
    return run("unlock", *args)


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


def refused(result: subprocess.CompletedProcess[str], *says: str) -> None:
    """Exit 75 and one line on stderr that says all of ``says``."""
    assert result.returncode == 75, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("taskrunner: error: not removed: ")
    for what in says:
        assert what in line, line


def test_a_stale_lock_is_removed(lockdir: Path, tmp_path: Path):
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    dead = leave_stale(lock)
    result = unlock(str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"removed the stale lock {lock} of pid {dead} on {HOST} ")
    assert result.stdout.endswith(" (command 'sleep 60')\n")
    assert list(lockdir.iterdir()) == []
    after = run("-l", str(lock), "-c", f"touch {ran}")
    assert (after.returncode, after.stderr) == (0, ""), "no stale lock left to warn about"
    assert ran.exists()


def test_no_lock(lockdir: Path):
    lock = lockdir / "job.lock"
    result = unlock(str(lock))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"no lock at {lock}\n", "")
    assert list(lockdir.iterdir()) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_live_lock_is_refused(lockdir: Path, tmp_path: Path, procs, force: list[str]):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    proc = settled(lock, go)
    procs.append(proc)
    before = snapshot(lock)
    refused(unlock(*force, str(lock)), str(lock), f"pid {proc.pid} on {HOST} for ", until(go))
    assert snapshot(lock) == before
    assert proc.poll() is None, "the holder's command keeps running"
    assert run("-l", str(lock), "-c", "true").returncode == 75
    go.touch()
    assert finish(proc)[0] == 0
    assert not lock.exists()


def test_a_lock_held_by_the_command_of_a_killed_runner_is_refused(
    lockdir: Path, tmp_path: Path, procs
):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    proc = start("-l", str(lock), "-c", probe(log, go))
    procs.append(proc)
    wait_for(log.exists, "the command")
    proc.kill()
    proc.wait()
    before = snapshot(lock)
    refused(unlock("--force", str(lock)), f"pid {proc.pid}")
    assert snapshot(lock) == before
    go.touch()
    wait_for(lambda: "end" in log.read_text(), "the command to end")
    wait_for(lambda: unlock(str(lock)).returncode == 0, "the lock to be stale")
    assert not lock.exists()


def test_a_lock_held_by_what_the_command_left_behind_is_refused(lockdir: Path, tmp_path: Path):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    try:
        assert run("-l", str(lock), "-c", f"{until(go)} >/dev/null 2>&1 &").returncode == 0
        refused(unlock(str(lock)), "processes its command started still hold it")
        assert lock.exists()
    finally:
        go.touch()
    wait_for(lambda: unlock(str(lock)).returncode == 0, "the lock to be let go")
    assert not lock.exists()


def test_a_manual_hold_needs_force(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.write_text("paused by ops\n")
    before = snapshot(lock)
    refused(unlock(str(lock)), "a file taskrunner did not write", "--force")
    assert snapshot(lock) == before
    result = unlock("--force", str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"removed the manual hold {lock} (")
    assert not lock.exists()


def test_a_manual_hold_in_use_is_refused_even_with_force(lockdir: Path, tmp_path: Path, procs):
    """An operator's ``flock FILE CMD`` on the lock path: removing it would break their lock."""
    lock, go = lockdir / "job.lock", tmp_path / "go"
    lock.write_text("")
    proc = subprocess.Popen(["flock", "-s", str(lock), "sh", "-c", until(go)])
    procs.append(proc)
    wait_for(lambda: f":{lock.stat().st_ino} " in Path("/proc/locks").read_text(), "the flock")
    refused(unlock("--force", str(lock)), "a process holds its flock")
    assert lock.exists()
    go.touch()
    proc.wait(timeout=HANG)


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo", "missing directory",
                                  "hard link"])  # fmt: skip
def test_a_path_that_cannot_be_used(lockdir: Path, tmp_path: Path, kind: str):
    lock, target = lockdir / "job.lock", tmp_path / "target"
    target.write_text("precious\n")
    says = {"symlink": "is a symbolic link", "directory": "is a directory",
            "fifo": "is a FIFO", "missing directory": "no such file or directory",
            "hard link": "has 2 hard links"}[kind]  # fmt: skip
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "directory":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "missing directory":
        lock = tmp_path / "nope" / "job.lock"
    else:
        os.link(target, lock)
    result = unlock("--force", str(lock))
    assert result.returncode == 71
    assert result.stdout == ""
    assert result.stderr == f"taskrunner: error: {lock}: {result.stderr.split(': ', 3)[-1]}"
    assert says in result.stderr and result.stderr.count("\n") == 1
    assert target.read_text() == "precious\n"
    assert lock.is_symlink() or lock.exists() or kind == "missing directory"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")
def test_another_users_file_is_not_removed(lockdir: Path):
    lock = lockdir / "job.lock"
    nobodys_file(lock)
    result = unlock("--force", str(lock))
    assert result.returncode == 71
    assert f"belongs to uid {NOBODY}" in result.stderr
    assert lock.exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "no lock file given"),
        (["a.lock", "b.lock"], "unlock takes one lock file"),
        (["--json", "a.lock"], "unknown option --json"),
        (["-f", "count", "a.lock"], "unknown option -f"),
        ([""], "a path is empty"),
    ],
    ids=str,
)
def test_usage_errors(args: list[str], says: str):
    result = unlock(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    usage, error = result.stderr.splitlines()
    assert usage == "usage: taskrunner unlock [--force] LOCKFILE"
    assert error.startswith("taskrunner: error: ") and says in error


RUNS, UNLOCKS = 20, 4


def after(go: Path, argv: list[str]) -> subprocess.Popen[str]:
    """taskrunner ``argv``, started the moment ``go`` exists."""
    return subprocess.Popen(
        ["sh", "-c", f'{until(go)}; exec "$@"', "sh", *TASKRUNNER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("round_", range(5))
def test_unlock_racing_runs_that_take_the_stale_lock_over(
    lockdir: Path, tmp_path: Path, round_: int
):
    """Runs and unlocks started at one moment against one stale lock: never two runs at
    once, every run ends, and every run that waits for the lock gets it."""
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    leave_stale(lock)
    command = f'echo "start $$" >> {log}; sleep 0.02; echo "end $$" >> {log}'
    waits = [["--wait", "60"] if i % 2 else [] for i in range(RUNS)]
    argvs = [["-l", str(lock), *w, "-c", command] for w in waits]
    argvs += [["unlock", str(lock)]] * UNLOCKS
    procs = [after(go, argv) for argv in argvs]
    go.touch()
    outputs = [p.communicate(timeout=HANG) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    runs, unlocks = results[:RUNS], results[RUNS:]
    assert overlaps(log) == []
    for (status, _, err), wait in zip(runs, waits):
        assert status == 0 if wait else status in (0, 75), err
    assert all(status in (0, 75) for status, _, _ in unlocks), unlocks
    ran = sum(status == 0 for status, _, _ in runs)
    assert log.read_text().count("start ") == ran
    stale_warnings = sum("stale lock" in err for _, _, err in runs)
    removals = sum("removed the stale lock" in out for _, out, _ in unlocks)
    assert stale_warnings + removals == 1, "the stale lock is removed once, by one of them"
    assert list(lockdir.iterdir()) == []
