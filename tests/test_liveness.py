"""A lock nobody flocks is stale only if its runner and its command are gone.

The command usually keeps the lock through the descriptor it inherits; these are the cases
where it does not (it closed its descriptors) and the runner is killed, and the records that
must never wedge a job or crash taskrunner.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from taskrunner.holder import Holder, boot_id, process_start

from conftest import HANG, TASKRUNNER, alive, overlaps, probe, run, wait_for

CLOSES_ITS_FDS = """
import os, pathlib, sys, time
os.closerange(3, 4096)
log, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with log.open("a") as f: f.write("start closer\\n")
while not go.exists(): time.sleep(0.01)
with log.open("a") as f: f.write("end closer\\n")
"""
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
STRACE = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def closer(lock: Path, log: Path, go: Path, *wrap: str) -> list[str]:
    """A taskrunner command line whose command closes every descriptor it inherited."""
    script = log.with_name("closerange.py")
    script.write_text(CLOSES_ITS_FDS)
    return [*wrap, *TASKRUNNER, "-l", str(lock), "--", sys.executable, str(script), str(log),
            str(go)]  # fmt: skip


def the_command(log: Path) -> int:
    """The pid of the closer that writes ``log``, found by its command line."""
    wait_for(log.exists, "the command")
    script = os.fsencode(log.with_name("closerange.py"))
    mine = [p for p in _all_pids() if _cmdline(p).split(b"\0")[1:2] == [script]]
    assert len(mine) == 1, mine
    return mine[0]


def runs_alone(lock: Path, log: Path, go: Path, command: int) -> None:
    """While the closer runs, the lock is busy; once it ends, the next run takes over."""
    busy = run("-l", str(lock), "-c", probe(log, None, "second"))
    assert busy.returncode == 75, busy.stderr
    go.touch()
    wait_for(lambda: not alive(command), "the command to end")
    later = run("-l", str(lock), "-c", probe(log, None, "third"))
    assert later.returncode == 0, later.stderr
    assert overlaps(log) == []
    assert "second" not in log.read_text()


def test_runner_killed_while_its_command_runs_without_the_lock_descriptor(
    lockdir: Path, tmp_path: Path
):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    proc = subprocess.Popen(closer(lock, log, go), start_new_session=True)
    try:
        command = the_command(log)
        assert Holder.decode(lock.read_bytes()).command_pid == command  # type: ignore[union-attr]
        proc.kill()
        proc.wait()
        runs_alone(lock, log, go, command)
    finally:
        go.touch()
        proc.kill()
        proc.wait()


@STRACE
def test_runner_killed_before_it_could_record_its_command(lockdir: Path, tmp_path: Path):
    """kill -9 between starting the command and writing its pid into the record (the second
    pwrite): the command is found by the path it was given."""
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    strace = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
              "-e", "inject=pwrite64:signal=SIGKILL:when=2"]  # fmt: skip
    traced = subprocess.Popen(closer(lock, log, go, *strace), start_new_session=True)
    try:
        command = the_command(log)
        record = Holder.decode(lock.read_bytes())
        assert record is not None
        assert record.command_pid is None, "the runner died before recording its command"
        wait_for(lambda: not alive(record.pid), "the runner to be killed")
        runs_alone(lock, log, go, command)
    finally:
        go.touch()
        traced.wait(timeout=HANG)


@ROOT
def test_a_runner_under_another_host_name_on_this_machine(lockdir: Path, tmp_path: Path, procs):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    script = f"hostname renamed-host && exec {' '.join(closer(lock, log, go))}"
    proc = subprocess.Popen(["unshare", "-u", "sh", "-c", script], start_new_session=True)
    procs.append(proc)
    command = the_command(log)
    assert Holder.decode(lock.read_bytes()).host == "renamed-host"  # type: ignore[union-attr]
    proc.kill()
    proc.wait()
    runs_alone(lock, log, go, command)


@ROOT
def test_a_runner_in_another_pid_namespace(lockdir: Path, tmp_path: Path):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    # The namespace's first process must outlive the runner: when it ends, so does all in it.
    script = " ".join(closer(lock, log, go)) + " & wait; while :; do sleep 1; done"
    ns = subprocess.Popen(
        ["unshare", "-p", "-f", "--kill-child", "--mount-proc", "sh", "-c", script],
        start_new_session=True,
    )
    try:
        command = the_command(log)
        record = Holder.decode(lock.read_bytes())
        assert record is not None
        assert record.pid < 10, "the pids recorded are the namespace's own"
        runner = int(Path(f"/proc/{command}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert _ns(runner) != _ns(os.getpid())
        os.kill(runner, 9)
        runs_alone(lock, log, go, command)
    finally:
        ns.kill()
        ns.wait()


@pytest.mark.parametrize(
    "fields",
    [
        {"pid": "0", "command_pid": "-1"},
        {"pid": "99999999999999999999", "command_pid": "0"},
        {"pid": "1"},  # a live pid, but no start time to prove it is the same process
        {"started": "nan"},
        {"started": "1e400"},
        {"started": "-1e400", "ended": "nan"},
        {"proc_start": "x", "command_start": "-5"},
    ],
    ids=str,
)
def test_a_record_that_proves_nothing_neither_wedges_nor_crashes(
    lockdir: Path, fields: dict[str, str]
):
    lock = lockdir / "job.lock"
    record = {"pid": "999999", "host": socket.gethostname(), "boot_id": boot_id() or "",
              "proc_start": "1", "started": "1700000000", "command": "old"}  # fmt: skip
    if fields.get("pid") == "1":
        record.pop("proc_start")
    record.update(fields)
    lock.write_text("taskrunner-lock 1\n" + "".join(f"{k} {v}\n" for k, v in record.items()))
    lock.chmod(0o600)
    result = run("-l", str(lock), "-c", "true")
    assert result.returncode == 0, result.stderr
    assert "removed the stale lock" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_record_whose_runner_lives_keeps_the_lock(lockdir: Path):
    """A taskrunner record nobody flocks, naming a live process with its true start time,
    is not stale: that is a runner between two flocks as it lets go."""
    lock = lockdir / "job.lock"
    me = Holder.current("pytest", str(lock))
    lock.write_bytes(me.encode())
    lock.chmod(0o600)
    result = run("-l", str(lock), "--wait", "0.3", "-c", "true")
    assert result.returncode == 75
    assert f"pid {os.getpid()}" in result.stderr
    assert me.proc_start == process_start(os.getpid())


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ns(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


# An interpreter nobody may run (the test's own may sit under root's home).
SYSTEM_PYTHON = "/usr/bin/python3"


@ROOT
@STRACE
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")
def test_another_users_process_cannot_pose_as_the_command(lockdir: Path, tmp_path: Path):
    """A runner killed before it recorded its command leaves a record whose command is
    looked for by its environment: nobody's process with the same variable does not count."""
    lock, log = lockdir / "job.lock", tmp_path / "log"
    strace = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
              "-e", "inject=pwrite64:signal=SIGKILL:when=2"]  # fmt: skip
    subprocess.run([*strace, *TASKRUNNER, "-l", str(lock), "--", "true"], timeout=HANG,
                   start_new_session=True)  # fmt: skip
    record = Holder.decode(lock.read_bytes())
    assert record is not None
    assert record.command_pid is None
    # Started after the runner, as its command would have been, with the same variable, and
    # undumpable, so that its /proc files belong to root.
    undumpable = "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); time.sleep(60)"
    impostor = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "env", f"TASKRUNNER_LOCKFILE={lock}", SYSTEM_PYTHON, "-c", undumpable],
    )  # fmt: skip
    try:

        def posing() -> bool:
            proc = Path(f"/proc/{impostor.pid}")
            return (
                b"prctl" in _cmdline(impostor.pid)
                and "Uid:\t65534" in (proc / "status").read_text()
                and (proc / "environ").stat().st_uid == 0
                and f"TASKRUNNER_LOCKFILE={lock}".encode() in (proc / "environ").read_bytes()
            )

        wait_for(posing, "the impostor to pose")
        later = run("-l", str(lock), "-c", probe(log, None, "next"))
        assert later.returncode == 0, later.stderr
        assert "removed the stale lock" in later.stderr
    finally:
        impostor.kill()
        impostor.wait()
