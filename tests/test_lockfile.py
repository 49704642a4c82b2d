"""The lock file: exists exactly while a run holds it, records its holder, survives crashes."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskrunner.holder import Holder, boot_id, process_start

from conftest import (
    HANG,
    TASKRUNNER,
    alive,
    children,
    finish,
    hold,
    leave_stale,
    overlaps,
    probe,
    run,
    start,
    starts,
    until,
    wait_for,
)


def holder_of(lock: Path) -> Holder:
    rec = Holder.decode(lock.read_bytes())
    assert rec is not None, lock.read_bytes()
    return rec


def test_lock_exists_with_the_holder_record_while_the_command_runs(lockdir: Path, tmp_path: Path):
    lock = lockdir / "job.lock"
    seen = tmp_path / "seen"
    proc = start(
        "-l",
        str(lock),
        "-c",
        f'cat "$TASKRUNNER_LOCKFILE" > {seen}; stat -c %a "$TASKRUNNER_LOCKFILE" >> {seen}.mode',
    )
    status, _, err = finish(proc)
    assert (status, err) == (0, "")
    record = Holder.decode(seen.read_bytes())
    assert record is not None
    assert record.pid == proc.pid
    assert record.host == socket.gethostname()
    assert record.boot_id == boot_id()
    assert record.proc_start is not None
    assert "cat" in record.command
    assert Path(f"{seen}.mode").read_text().strip() == "600"
    assert not lock.exists()
    assert list(lockdir.iterdir()) == []


def test_record_names_a_live_process(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    proc = hold(lock, go)
    procs.append(proc)
    record = holder_of(lock)
    assert record.pid == proc.pid
    assert record.proc_start == process_start(proc.pid)
    assert record.is_alive() is True
    assert record.command == f"sh -c '{until(go)}'"
    go.touch()
    assert finish(proc)[0] == 0
    assert not lock.exists()


@pytest.mark.parametrize(
    ("command", "status"),
    [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143), ("kill -KILL $$", 137)],
)
def test_lock_is_removed_however_the_command_ends(lockdir: Path, command: str, status: int):
    lock = lockdir / "job.lock"
    result = run("-l", str(lock), "-c", command)
    assert result.returncode == status
    assert list(lockdir.iterdir()) == []


def test_lock_is_removed_after_a_time_limit(lockdir: Path):
    lock = lockdir / "job.lock"
    assert run("-l", str(lock), "--timeout", "0.2", "--", "sleep", "30").returncode == 124
    assert list(lockdir.iterdir()) == []


def test_manual_hold_refuses_and_is_left_alone(lockdir: Path, tmp_path: Path):
    lock, ran, counter = lockdir / "job.lock", tmp_path / "ran", tmp_path / "count"
    lock.write_text("paused by ops for maintenance\n")
    os.chmod(lock, 0o644)
    before = lock.stat()
    quiet = run("-l", str(lock), "-t", "5", "-f", str(counter), "-c", f"touch {ran}")
    assert (quiet.returncode, quiet.stderr) == (75, "")
    loud = run("-l", str(lock), "-c", f"touch {ran}")
    assert loud.returncode == 75
    assert "held by hand" in loud.stderr
    assert not ran.exists()
    assert counter.read_text() == "1\n"
    assert lock.read_text() == "paused by ops for maintenance\n"
    after = lock.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_mode,
    )
    lock.unlink()
    assert run("-l", str(lock), "-c", f"touch {ran}").returncode == 0
    assert ran.exists()


def test_empty_file_is_a_manual_hold_and_wait_does_not_wait_for_it(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.touch()
    result = run("-l", str(lock), "--wait", "1h", "-c", "true")
    assert result.returncode == 75
    assert lock.exists()


def test_stale_lock_of_a_killed_holder_and_command_is_taken_over(lockdir: Path, tmp_path: Path):
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    dead = leave_stale(lock)
    result = run("-l", str(lock), "-c", f"touch {ran}")
    assert result.returncode == 0
    assert ran.exists()
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("taskrunner: warning: ")
    assert f"stale lock {lock}" in warning
    assert f"pid {dead} on {socket.gethostname()}" in warning
    assert "sleep 60" in warning
    assert list(lockdir.iterdir()) == []


def test_killing_the_runner_alone_keeps_the_lock_until_its_command_ends(
    lockdir: Path, tmp_path: Path, procs
):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    proc = start("-l", str(lock), "-c", probe(log, go, "first"))
    procs.append(proc)
    wait_for(log.exists, "the first command")
    (command,) = children(proc.pid)
    proc.kill()
    proc.wait()
    # The runner is gone; its command still runs and must still hold the lock.
    refused = run("-l", str(lock), "-c", probe(log, None, "second"))
    assert refused.returncode == 75
    waiter = start("-l", str(lock), "--wait", "30", "-c", probe(log, None, "third"))
    procs.append(waiter)
    go.touch()
    wait_for(lambda: not alive(command), "the first command to end")
    status, _, err = finish(waiter)
    assert status == 0
    assert "removed the stale lock" in err
    assert overlaps(log) == []
    assert log.read_text().split() == [
        "start",
        "first",
        "end",
        "first",
        "start",
        "third",
        "end",
        "third",
    ]
    assert list(lockdir.iterdir()) == []


def test_many_runs_finding_one_stale_lock_take_it_over_once(lockdir: Path, tmp_path: Path, procs):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    leave_stale(lock)
    contenders = [start("-l", str(lock), "-c", probe(log, go)) for _ in range(30)]
    procs.extend(contenders)
    wait_for(lambda: sum(p.poll() is not None for p in contenders) == 29, "29 refusals")
    go.touch()
    results = [finish(p) for p in contenders]
    assert sorted(r[0] for r in results) == [0] + [75] * 29
    warnings = [line for r in results for line in r[2].splitlines() if "stale lock" in line]
    assert len(warnings) == 1, warnings
    assert starts(log) == 1
    assert overlaps(log) == []
    assert list(lockdir.iterdir()) == []


def test_lock_path_in_a_missing_directory_is_unusable(tmp_path: Path):
    result = run("-l", str(tmp_path / "nope" / "job.lock"), "-c", "true")
    assert result.returncode == 71
    assert result.stderr.count("\n") == 1
    assert "no such file or directory" in result.stderr


@pytest.mark.parametrize("kind", ["directory", "symlink", "dangling symlink", "fifo", "socket"])
def test_something_else_at_the_lock_path_is_refused(lockdir: Path, tmp_path: Path, kind: str):
    lock, ran, target = lockdir / "job.lock", tmp_path / "ran", tmp_path / "target"
    target.write_text("precious\n")
    if kind == "directory":
        lock.mkdir()
    elif kind == "symlink":
        lock.symlink_to(target)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "missing")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(lock))
        sock.close()
    result = run("-l", str(lock), "-c", f"touch {ran}")
    assert result.returncode == 71
    assert not ran.exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("taskrunner: error: ")
    assert target.read_text() == "precious\n"
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")
def test_another_users_file_at_the_lock_path_is_refused(lockdir: Path, tmp_path: Path):
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    result = run("-l", str(lock), "-c", f"touch {ran}")
    assert result.returncode == 71
    assert "belongs to uid 65534" in result.stderr
    assert not ran.exists()


HOLD_SCRIPT = """
import sys, time
from taskrunner.lockfile import FileLock
from taskrunner.holder import Holder
from taskrunner.errors import LockBusy
lock = FileLock(sys.argv[1])
lock._anonymous = False  # as on a file system without O_TMPFILE
try:
    lock.try_acquire(Holder.current("named-record test"))
except LockBusy:
    print("busy", flush=True)
    sys.exit(75)
print("held", flush=True)
sys.stdin.readline()
lock.close()
"""


def hold_named(lock: Path) -> subprocess.Popen[str]:
    """A process holding ``lock`` through a named record, until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def test_named_records_where_anonymous_files_are_unavailable(lockdir: Path):
    lock = lockdir / "job.lock"
    holder = hold_named(lock)
    assert lock.stat().st_nlink == 1
    assert [p.name for p in lockdir.iterdir()] == ["job.lock"]
    other = subprocess.run(
        [sys.executable, "-c", HOLD_SCRIPT, str(lock)],
        capture_output=True,
        text=True,
        timeout=HANG,
        stdin=subprocess.DEVNULL,
    )
    assert (other.returncode, other.stdout) == (75, "busy\n")
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=HANG) == 0
    assert list(lockdir.iterdir()) == []


def test_named_record_left_by_a_crash_is_swept(lockdir: Path):
    lock = lockdir / "job.lock"
    orphan = lockdir / ".job.lock.99999.deadbeef.tmp"
    orphan.write_bytes(Holder.current("crashed").encode())
    young = lockdir / ".job.lock.99998.cafe.tmp"  # may be another run's, just made
    young.write_bytes(b"")
    os.utime(orphan, (time.time() - 120, time.time() - 120))
    holder = hold_named(lock)
    assert not orphan.exists()
    assert young.exists()
    holder.stdin.close()
    assert holder.wait(timeout=HANG) == 0


def test_runner_holds_the_flock_the_command_inherits(lockdir: Path, tmp_path: Path):
    """The command's own descriptor keeps the lock: the lock lives as long as the command."""
    lock, out = lockdir / "job.lock", tmp_path / "fds"
    cmd = f"ls -l /proc/$$/fd > {out}"
    assert run("-l", str(lock), "-c", cmd).returncode == 0
    assert str(lock) in out.read_text()


def test_stat_of_a_held_lock_is_a_regular_file(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    proc = hold(lock, go)
    procs.append(proc)
    st = lock.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 143
    assert not lock.exists()


def test_lock_left_by_a_previous_boot_is_taken_over(lockdir: Path, tmp_path: Path):
    """After a power cut or a reboot the file is still there, but nothing holds it."""
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    before = Holder(
        pid=1234,
        host=socket.gethostname(),
        started=time.time() - 86400,
        command="backup.sh",
        boot_id="00000000-0000-0000-0000-000000000000",
        proc_start=42,
    )
    lock.write_bytes(before.encode())
    os.chmod(lock, 0o600)
    result = run("-l", str(lock), "-c", f"touch {ran}")
    assert result.returncode == 0
    assert ran.exists()
    (warning,) = result.stderr.splitlines()
    assert "removed the stale lock" in warning
    assert "pid 1234" in warning
    assert "backup.sh" in warning
    assert "started 1d00h ago" in warning
    assert before.is_alive() is False
    assert list(lockdir.iterdir()) == []


def test_a_record_of_another_version_is_still_taskrunners(lockdir: Path, tmp_path: Path):
    lock = lockdir / "job.lock"
    lock.write_bytes(b"taskrunner-lock 2\npid 77\nsomething new\n" + b"x" * 100000)
    result = run("-l", str(lock), "-c", "true")
    assert result.returncode == 0
    assert "pid 77" in result.stderr


def test_a_runner_letting_go_is_never_taken_for_dead(lockdir: Path, tmp_path: Path, procs):
    """The command ends but leaves a process that holds the lock a little longer: the next
    run waits for the runner to let go, and nobody calls the live lock stale."""
    lock = lockdir / "job.lock"
    for _ in range(5):
        holder = start("-l", str(lock), "-c", "(sleep 0.3) & exit 0")
        procs.append(holder)
        wait_for(lock.exists, "the holder")
        waiter = start("-l", str(lock), "--wait", "30", "-c", "true")
        procs.append(waiter)
        status, _, err = finish(waiter)
        assert (status, err) == (0, "")
        status, _, err = finish(holder)
        assert (status, err) == (0, "")
        assert list(lockdir.iterdir()) == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_flock_error_is_an_unusable_lock_not_a_crash(lockdir: Path):
    lock = lockdir / "job.lock"
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=flock",
         "-e", "inject=flock:error=ENOLCK", *TASKRUNNER, "-l", str(lock), "-c", "true"],
        capture_output=True, text=True, timeout=HANG, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == 71
    assert "no locks available" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(lockdir.iterdir()) == []


def test_a_symlinked_directory_of_ours_is_followed(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "up").symlink_to("link/../real")
    assert run("-l", str(tmp_path / "link" / "job.lock"), "-c", "true").returncode == 0
    assert (
        run(
            "-l",
            str(tmp_path / "up" / "job.lock"),
            "-t",
            "1",
            "-f",
            str(tmp_path / "up" / "c"),
            "-c",
            "true",
        ).returncode
        == 0
    )
    assert list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's symlink")
def test_a_symlinked_directory_planted_by_another_user_is_refused(tmp_path: Path):
    """In a world-writable sticky directory, nobody's `app -> secret` must not make root
    delete or overwrite files in `secret`."""
    shared, secret = tmp_path / "shared", tmp_path / "secret"
    shared.mkdir()
    shared.chmod(0o1777)
    secret.mkdir()
    (secret / "state").write_text("precious\n")
    (shared / "app").symlink_to(secret)
    os.lchown(shared / "app", 65534, 65534)
    for args in (
        ["-l", str(shared / "app" / "job.lock"), "-c", "true"],
        [
            "-l",
            str(shared / "job.lock"),
            "-t",
            "3",
            "-f",
            str(shared / "app" / "state"),
            "-c",
            "true",
        ],
    ):
        result = run(*args)
        assert result.returncode == 71, result.stderr
        assert "symlink, app, that belongs to uid 65534" in result.stderr
    assert (secret / "state").read_text() == "precious\n"
    assert sorted(p.name for p in secret.iterdir()) == ["state"]


def test_a_network_file_system_is_named_with_what_holds_there(lockdir: Path, monkeypatch, capsys):
    """Without O_TMPFILE (NFS, CIFS, many FUSE file systems) the record gets a name of its
    own, and the log says what a lock there can promise."""
    from taskrunner import cli, lockfile

    real_open = os.open

    def no_tmpfile(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(lockfile.os, "open", no_tmpfile)
    monkeypatch.setattr(lockfile, "filesystem", lambda fd: "nfs4")
    assert cli.main(["-v", "-l", str(lockdir / "job.lock"), "--", "true"]) == 0
    err = capsys.readouterr().err
    assert "the lock is on nfs4: flock is carried by NFS byte-range locks" in err
    assert list(lockdir.iterdir()) == []


def test_file_system_types():
    from taskrunner.fsutil import caveat, filesystem

    fd = os.open("/proc", os.O_RDONLY)
    try:
        assert filesystem(fd) == "proc"
    finally:
        os.close(fd)
    assert caveat("ext4") is None
    assert caveat("tmpfs") is None
    assert "across hosts" in caveat("nfs4")  # type: ignore[operator]
    assert "only among processes of this host" in caveat("cifs")  # type: ignore[operator]
    assert "only on this host" in caveat("fuse.sshfs")  # type: ignore[operator]
