"""Run from a terminal, the command behaves as if started directly: it reads the terminal,
and Ctrl-C, Ctrl-Z and fg act on it. Driven through a real pseudo-terminal and bash."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from taskrunner.holder import Holder

from conftest import TASKRUNNER, blocked_in_flock, children, hold, run, wait_for

TR = " ".join(TASKRUNNER)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wchan(pid: int) -> str:
    return Path(f"/proc/{pid}/wchan").read_text()


class Terminal:
    """An interactive bash on a pseudo-terminal."""

    def __init__(self) -> None:
        env = {**os.environ, "PS1": "$ ", "TERM": "dumb", "HISTFILE": "/dev/null"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.seen = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, text: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"never saw {text!r}; saw {self.seen.decode(errors='replace')!r}"
                )
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    break

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def term():
    t = Terminal()
    t.expect("$ ")
    yield t
    t.close()


def test_command_reads_the_terminal(term: Terminal, lockdir: Path):
    term.send(f"{TR} -l {lockdir}/job.lock -- sh -c 'read x; echo \"got:$x\"'; echo rc=$?\n")
    wait_for((lockdir / "job.lock").exists, "the lock")
    term.send("hello\n")
    term.expect("got:hello")
    term.expect("rc=0")
    assert list(lockdir.iterdir()) == []


def test_ctrl_c_stops_the_command(term: Terminal, lockdir: Path):
    term.send(f"{TR} -l {lockdir}/job.lock -- sleep 60; echo not-reached\n")
    wait_for((lockdir / "job.lock").exists, "the lock")
    term.send("\x03")
    term.expect("^C")
    term.send("echo rc=$?\n")
    term.expect("rc=130")
    # bash ends the whole command line, as it does when a command it ran itself dies of ^C
    assert term.seen.count(b"not-reached") == 1  # the echo of the typed line only
    assert list(lockdir.iterdir()) == []


def test_ctrl_c_stops_a_calling_script(term: Terminal, lockdir: Path, tmp_path: Path):
    script = tmp_path / "loop.sh"
    script.write_text(
        f'for i in 1 2 3; do {TR} -l {lockdir}/job.lock -- sleep 60; echo "iter $i rc=$?"; done\n'
    )
    term.send(f"bash {script}\n")
    wait_for((lockdir / "job.lock").exists, "the lock")
    term.send("\x03")
    term.expect("^C")
    term.send("echo script-rc=$?\n")
    term.expect("script-rc=130")
    assert b"iter 1" not in term.seen
    wait_for(lambda: not (lockdir / "job.lock").exists(), "the lock to go")


def test_ctrl_z_stops_the_job_and_fg_resumes_it(term: Terminal, lockdir: Path):
    lock = lockdir / "job.lock"
    term.send(f"{TR} -l {lock} -- sh -c 'read x; echo \"got:$x\"'\n")
    wait_for(lock.exists, "the lock")
    term.send("\x1a")
    term.expect("Stopped")
    term.expect("$ ")
    assert run("-l", str(lock), "-c", "true").returncode == 75, "a stopped job still holds its lock"
    runner = Holder.decode(lock.read_bytes()).pid  # type: ignore[union-attr]
    assert state(runner) == "T"
    # (The Ctrl-Z may have come before the command was started: then it starts after fg.)
    assert all(state(command) == "T" for command in children(runner))
    term.send("fg\n")
    wait_for(
        lambda: any(state(c) == "S" and wchan(c) == "wait_woken" for c in children(runner)),
        "the command to read the terminal",
    )
    term.send("again\n")
    term.expect("got:again")
    term.send("echo rc=$?\n")
    term.expect("rc=0")
    assert list(lockdir.iterdir()) == []


def test_time_limit_reaches_a_pipeline_started_from_a_terminal(term: Terminal, lockdir: Path):
    lock = lockdir / "job.lock"
    term.send(f"{TR} -l {lock} --timeout 0.5 -c 'sleep 37.5 | sleep 37.5'; echo rc=$?\n")
    term.expect("rc=124")
    assert not lock.exists()
    assert subprocess.run(["pgrep", "-f", "sleep 37.5"], capture_output=True).returncode == 1


def test_ctrl_c_while_waiting_for_the_lock_stops_a_calling_script(
    term: Terminal, lockdir: Path, tmp_path: Path, procs
):
    lock = lockdir / "job.lock"
    holder = hold(lock, tmp_path / "go")
    procs.append(holder)
    script = tmp_path / "loop.sh"
    script.write_text(
        f'for i in 1 2 3; do {TR} -l {lock} --wait 60 -- true; echo "iter $i rc=$?"; done\n'
    )
    term.send(f"bash {script}\n")
    wait_for(lambda: any(blocked_in_flock(p) for p in _pids_of(script)), "the waiter")
    term.send("\x03")
    term.expect("^C")
    term.send("echo script-rc=$?\n")
    term.expect("script-rc=130")
    assert b"iter 1" not in term.seen


def _pids_of(script: Path) -> list[int]:
    """The processes running ``script`` and their children."""
    found = subprocess.run(
        ["pgrep", "-f", str(script)], capture_output=True, text=True
    ).stdout.split()
    return [child for pid in found for child in children(int(pid))]
