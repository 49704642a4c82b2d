"""Signals to the runner reach the command; the time limit; the lock outlives the command."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    TASKRUNNER,
    alive,
    blocked_in_flock,
    children,
    finish,
    hold,
    probe,
    run,
    start,
    wait_for,
)

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]


def trapping(sig: signal.Signals, tmp_path: Path) -> str:
    """A command that traps ``sig``, notes it, and exits 7 only once allowed to."""
    got, letgo, ready = tmp_path / "got", tmp_path / "letgo", tmp_path / "ready"
    return (
        f"trap 'echo {sig.name} > {got}; while [ ! -e {letgo} ]; do sleep 0.01; done; exit 7' "
        f"{sig.name[3:]}; touch {ready}; while :; do sleep 0.01; done"
    )


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_reaches_the_command_and_the_lock_waits_for_it(
    sig: signal.Signals, lockdir: Path, tmp_path: Path, procs
):
    lock = lockdir / "job.lock"
    proc = start("-l", str(lock), "-c", trapping(sig, tmp_path))
    procs.append(proc)
    wait_for((tmp_path / "ready").exists, "the command")
    proc.send_signal(sig)
    wait_for((tmp_path / "got").exists, "the command to get the signal")
    assert (tmp_path / "got").read_text().strip() == sig.name
    # The command is still finishing up: the runner and the lock must wait for it.
    assert proc.poll() is None
    assert lock.exists()
    assert run("-l", str(lock), "-c", "true").returncode == 75
    (tmp_path / "letgo").touch()
    status, _, err = finish(proc)
    assert status == 7
    assert "taskrunner:" not in err
    assert not lock.exists()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_command_killed_by_the_signal_gives_128_plus_n(sig: signal.Signals, lockdir: Path, procs):
    lock = lockdir / "job.lock"
    proc = start("-l", str(lock), "--", "sleep", "60")
    procs.append(proc)
    wait_for(lambda: children(proc.pid), "the command")
    proc.send_signal(sig)
    assert finish(proc)[0] == 128 + sig
    assert not lock.exists()


def test_signal_reaches_everything_the_command_started(lockdir: Path, tmp_path: Path, procs):
    pids = tmp_path / "pids"
    proc = start("-l", str(lockdir / "job.lock"), "-c", f"sleep 60 & echo $! > {pids}; wait")
    procs.append(proc)
    wait_for(lambda: pids.exists() and pids.read_text().strip(), "the grandchild")
    grandchild = int(pids.read_text())
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    wait_for(lambda: not alive(grandchild), "the grandchild to be gone")


def test_time_limit_stops_the_command_with_124(lockdir: Path):
    lock = lockdir / "job.lock"
    result = run("-l", str(lock), "--timeout", "0.3", "--", "sleep", "60")
    assert result.returncode == 124
    assert "time limit of 0.3s" in result.stderr
    assert not lock.exists()


def test_time_limit_kills_a_command_that_ignores_term(lockdir: Path, tmp_path: Path):
    got = tmp_path / "got"
    cmd = f"trap 'echo TERM > {got}' TERM; while :; do sleep 0.01; done"
    result = run(
        "-l", str(lockdir / "job.lock"), "--timeout", "0.2", "--kill-after", "0.3", "-c", cmd
    )
    assert result.returncode == 124
    assert got.read_text() == "TERM\n"
    assert "status 137" in result.stderr


def test_time_limit_reaches_processes_left_behind(lockdir: Path, tmp_path: Path):
    """The command ends at TERM but leaves a process that ignores TERM: it is KILLed at the
    end of the grace, and the lock is not free before it is gone."""
    pids, log, script = tmp_path / "pids", tmp_path / "log", tmp_path / "stubborn.sh"
    script.write_text(f"trap '' TERM; {probe(log, tmp_path / 'never')}\n")
    cmd = f"sh {script} & echo $! > {pids}; wait"
    lock = lockdir / "job.lock"
    result = run("-l", str(lock), "--timeout", "0.3", "--kill-after", "0.5", "-c", cmd)
    assert result.returncode == 124
    assert not alive(int(pids.read_text()))
    assert not lock.exists()


def test_processes_the_command_leaves_holding_the_lock_keep_it(
    lockdir: Path, tmp_path: Path, procs
):
    """A background process that kept the lock's descriptor keeps the lock."""
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    first = run("-l", str(lock), "-c", f"({probe(log, go, 'left')}) >/dev/null 2>&1 &")
    assert first.returncode == 0
    assert "still hold" in first.stderr
    assert lock.exists()
    assert run("-l", str(lock), "-c", probe(log, None, "next")).returncode == 75
    go.touch()
    wait_for(lambda: "end left" in log.read_text(), "the background process to end")
    later = run("-v", "-l", str(lock), "-c", probe(log, None, "later"))
    assert later.returncode == 0
    # Its run ended normally and warned then; the takeover is news, not a warning.
    assert "warning" not in later.stderr
    assert "which processes left by the command" in later.stderr
    assert log.read_text().split() == [
        "start",
        "left",
        "end",
        "left",
        "start",
        "later",
        "end",
        "later",
    ]


def test_timeout_zero_means_no_limit(lockdir: Path):
    assert (
        run("-l", str(lockdir / "job.lock"), "--timeout", "0", "--", "sleep", "0.3").returncode == 0
    )


def test_signal_before_the_lock_is_taken_stops_a_waiter(lockdir: Path, tmp_path: Path, procs):
    lock, go, ran = lockdir / "job.lock", tmp_path / "go", tmp_path / "ran"
    holder = hold(lock, go)
    procs.append(holder)
    waiter = start("-l", str(lock), "--wait", "60", "-c", f"touch {ran}")
    procs.append(waiter)
    wait_for(lambda: blocked_in_flock(waiter.pid), "the waiter to wait for the lock")
    waiter.send_signal(signal.SIGTERM)
    assert finish(waiter)[0] == 143
    go.touch()
    assert finish(holder)[0] == 0
    assert not ran.exists()


def test_signals_ignored_at_start_stay_ignored(lockdir: Path, tmp_path: Path, procs):
    """Under nohup, HUP is ignored: not passed on, and the command inherits the ignoring."""
    got, ready = tmp_path / "got", tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        f"inherited = signal.getsignal(signal.SIGHUP)\n"
        f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(got)!r}).touch())\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(1)\n"
        "sys.exit(0 if inherited == signal.SIG_IGN else 9)\n"
    )
    proc = start(
        "-l",
        str(lockdir / "job.lock"),
        "--",
        sys.executable,
        "-c",
        child,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    procs.append(proc)
    wait_for(ready.exists, "the command")
    proc.send_signal(signal.SIGHUP)
    assert finish(proc)[0] == 0
    assert not got.exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_signal_just_before_the_command_starts_stops_the_run(lockdir: Path, tmp_path: Path):
    """TERM arrives when the lock is taken but the command not yet started (injected at
    taskrunner's look for a terminal, just before the start): the command must not run."""
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", "/dev/tty", "-e", "trace=openat",
         "-e", "inject=openat:signal=SIGTERM", *TASKRUNNER, "-v", "-l", str(lock), "-c", f"touch {ran}"],
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == 143
    assert "not run: signal 15 arrived first" in result.stderr
    assert not ran.exists()
    assert list(lockdir.iterdir()) == []
