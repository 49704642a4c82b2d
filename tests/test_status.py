"""``taskrunner status``: each lock's state, holder and age, for people and for programs,
and never a change to the lock, nor a flock that would make a run refuse."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from taskrunner.holder import Holder, boot_id

from conftest import (
    NOBODY,
    TASKRUNNER,
    alive,
    children,
    finish,
    leave_stale,
    nobodys_file,
    probe,
    run,
    settled,
    start,
    until,
    wait_for,
)

HOST = socket.gethostname()
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
STRACE = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def status(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run("status", *args, **kw)


def as_json(*paths: Path | str, code: int = 0) -> list[dict[str, object]]:
    result = status("--json", *map(str, paths))
    assert result.returncode == code, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def the(*paths: Path | str) -> dict[str, object]:
    (one,) = as_json(*paths)
    return one


def rows(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The table's rows (without the heading), as words, up to the blank line before notes."""
    table = result.stdout.split("\n\n")[0].splitlines()
    assert table[0].split() == ["STATE", "LOCK", "PID", "HOST", "AGE", "COMMAND"]
    return [line.split() for line in table[1:]]


def notes(result: subprocess.CompletedProcess[str]) -> list[str]:
    _, _, after = result.stdout.partition("\n\n")
    return after.splitlines()


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode


def record(lock: Path, **fields: str) -> None:
    """Write a taskrunner record with ``fields`` (a dead pid of this boot by default)."""
    values = {"pid": "999999", "host": HOST, "boot_id": boot_id() or "", "proc_start": "1",
              "started": "1700000000", "command": "old job"}  # fmt: skip
    values.update(fields)
    lock.write_text("taskrunner-lock 1\n" + "".join(f"{k} {v}\n" for k, v in values.items()))
    lock.chmod(0o600)


def flocked(path: Path) -> int:
    """A descriptor of ``path`` with a shared flock, as a command that outlived its runner."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def since(value: object) -> datetime:
    assert isinstance(value, str)
    when = datetime.fromisoformat(value)
    assert when.utcoffset() is not None, "ISO 8601 with the offset"
    return when


def test_a_free_lock(lockdir: Path):
    lock = lockdir / "job.lock"
    result = status(str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    assert rows(result) == [["free", str(lock), "-", "-", "-", "-"]]
    assert the(lock) == {"lockfile": str(lock), "state": "free", "holder": None, "since": None,
                         "age": None}  # fmt: skip
    assert not lock.exists()


def test_a_held_lock(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    proc = settled(lock, go)
    procs.append(proc)
    (command,) = children(proc.pid)
    rec = Holder.decode(lock.read_bytes())
    assert rec is not None
    result = status(str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    (row,) = rows(result)
    assert row[:4] == ["held", str(lock), str(proc.pid), HOST]
    assert notes(result) == []
    found = the(lock)
    holder = found["holder"]
    assert isinstance(holder, dict)
    assert found["state"] == "held"
    assert holder["pid"] == proc.pid and isinstance(holder["pid"], int)
    assert holder["host"] == HOST
    assert holder["command"] == f"sh -c '{until(go)}'"
    assert holder["command_pid"] == command
    assert holder["runner_running"] is True
    assert abs(since(holder["since"]).timestamp() - rec.started) < 0.001
    assert found["since"] == holder["since"]
    assert isinstance(found["age"], (int, float)) and 0 <= found["age"] < 60
    assert "error" not in found and "count" not in found
    go.touch()
    assert finish(proc)[0] == 0


def test_a_stale_lock(lockdir: Path):
    lock = lockdir / "job.lock"
    dead = leave_stale(lock)
    result = status(str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    (row,) = rows(result)
    assert row[:4] + row[5:] == ["stale", str(lock), str(dead), HOST, "sleep", "60"]
    found = the(lock)
    assert found["state"] == "stale"
    rec = Holder.decode(lock.read_bytes())
    assert rec is not None
    assert found["holder"] == {"pid": dead, "host": HOST, "since": found["since"],
                               "command": "sleep 60", "command_pid": rec.command_pid,
                               "runner_running": False}  # fmt: skip
    assert abs(since(found["since"]).timestamp() - rec.started) < 0.001


def test_a_manual_hold(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.write_text("paused by ops\n")
    os.utime(lock, (1_700_000_000, 1_700_000_000))
    result = status(str(lock))
    assert (result.returncode, result.stderr) == (0, "")
    (row,) = rows(result)
    assert row[:4] == ["manual", str(lock), "-", "-"]
    assert row[4].endswith("h") and row[5] == "-", "aged by its mtime"
    found = the(lock)
    assert (found["state"], found["holder"]) == ("manual", None)
    assert since(found["since"]).timestamp() == 1_700_000_000
    assert isinstance(found["age"], float) and found["age"] > 86400


def test_a_runner_killed_while_its_command_runs(lockdir: Path, tmp_path: Path, procs):
    lock, log, go = lockdir / "job.lock", tmp_path / "log", tmp_path / "go"
    proc = start("-l", str(lock), "-c", probe(log, go))
    procs.append(proc)
    wait_for(log.exists, "the command")
    proc.kill()
    proc.wait()
    result = status(str(lock))
    assert result.returncode == 0
    assert rows(result)[0][:3] == ["held", str(lock), str(proc.pid)]
    assert notes(result) == [
        f"{lock}: its runner, pid {proc.pid}, is gone; its command, or processes the command "
        "started, still hold the lock"
    ]
    found = the(lock)
    assert found["state"] == "held"
    assert found["holder"]["runner_running"] is False  # type: ignore[index]
    go.touch()


def test_processes_the_command_left_behind_hold_the_lock(lockdir: Path, tmp_path: Path):
    """The run has ended, its command too; what the command started in the background keeps
    the descriptor, and so the lock: held, though no process the record names lives."""
    lock, go = lockdir / "job.lock", tmp_path / "go"
    try:
        left = run("-l", str(lock), "-c", f"{until(go)} >/dev/null 2>&1 &")
        assert left.returncode == 0
        rec = Holder.decode(lock.read_bytes())
        assert rec is not None and rec.ended is not None
        assert rec.is_alive() is False
        found = the(lock)
        assert found["state"] == "held"
        assert found["holder"]["runner_running"] is False  # type: ignore[index]
        assert "is gone" in notes(status(str(lock)))[0]
    finally:
        go.touch()
    wait_for(lambda: the(lock)["state"] == "stale", "the lock to be let go")


def test_a_record_of_this_boot_flocked_by_another_process_is_held(lockdir: Path):
    lock = lockdir / "job.lock"
    record(lock)
    fd = flocked(lock)
    try:
        found = the(lock)
        assert found["state"] == "held"
        assert found["holder"]["runner_running"] is False  # type: ignore[index]
    finally:
        os.close(fd)
    assert the(lock)["state"] == "stale"


@pytest.mark.parametrize("flock", [False, True], ids=["unflocked", "flocked"])
def test_a_record_from_another_host(lockdir: Path, flock: bool):
    """Liveness cannot be told from here (a network file system): only the flock can say."""
    lock = lockdir / "job.lock"
    record(lock, host="elsewhere", boot_id="another-boot")
    fd = flocked(lock) if flock else None
    try:
        found = the(lock)
    finally:
        if fd is not None:
            os.close(fd)
    assert found["state"] == ("held" if flock else "stale")
    assert found["holder"]["host"] == "elsewhere"  # type: ignore[index]
    assert found["holder"]["runner_running"] is flock, "not called gone on a guess"  # type: ignore[index]


@ROOT
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_in_another_pid_namespace_a_hidden_flock_still_counts(lockdir: Path):
    """There /proc/locks leaves out the flocks of processes outside the namespace."""
    lock = lockdir / "job.lock"
    record(lock)
    fd = flocked(lock)
    try:
        result = subprocess.run(
            ["unshare", "-p", "-f", "--mount-proc", *TASKRUNNER, "status", "--json", str(lock)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["state"] == "held"


def test_several_locks_in_the_order_given(lockdir: Path, tmp_path: Path, procs):
    held, stale, manual, free = (lockdir / f"{n}.lock" for n in ("a", "b", "c", "d"))
    procs.append(settled(held, tmp_path / "go"))
    leave_stale(stale)
    manual.write_text("")
    order = [manual, free, held, stale, free]
    found = as_json(*order)
    assert [f["lockfile"] for f in found] == [str(p) for p in order]
    assert [f["state"] for f in found] == ["manual", "free", "held", "stale", "free"]
    result = status(*map(str, order))
    assert [row[:2] for row in rows(result)] == [[f["state"], f["lockfile"]] for f in found]
    (tmp_path / "go").touch()


def test_a_relative_path_is_shown_as_given(lockdir: Path):
    (lockdir / "job.lock").write_text("")
    result = status("--json", "job.lock", "../locks/job.lock", cwd=lockdir)
    found = json.loads(result.stdout)
    assert [f["lockfile"] for f in found] == ["job.lock", "../locks/job.lock"]
    assert [f["state"] for f in found] == ["manual", "manual"]


def test_the_count_of_refusals(lockdir: Path, tmp_path: Path, procs):
    lock, counter = lockdir / "job.lock", tmp_path / "count"
    assert the_count(lock, counter) == 0, "absent means 0"
    procs.append(settled(lock, tmp_path / "go"))
    for _ in range(3):
        assert run("-l", str(lock), "-t", "9", "-f", str(counter), "-c", "true").returncode == 75
    before = snapshot(counter)
    assert the_count(lock, counter) == 3
    result = status("-f", str(counter), str(lock))
    heading, row = result.stdout.splitlines()
    assert heading.split() == ["STATE", "LOCK", "PID", "HOST", "AGE", "COUNT", "COMMAND"]
    words = row.split()
    assert (words[0], words[5]) == ("held", "3")
    assert snapshot(counter) == before, "read, not changed"
    assert status(f"--counter-file={counter}", "--json", str(lock)).returncode == 0
    counter.write_text("garbage\n")
    assert the_count(lock, counter) == 0, "read as a run reads it"
    (tmp_path / "go").touch()


def the_count(lock: Path, counter: Path) -> object:
    result = status("--json", "-f", str(counter), str(lock))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["count"]


def test_a_counter_path_that_cannot_be_used(lockdir: Path, tmp_path: Path):
    lock, counter = lockdir / "job.lock", tmp_path / "count"
    counter.symlink_to(tmp_path / "elsewhere")
    result = status("--json", "-f", str(counter), str(lock))
    assert result.returncode == 71
    (found,) = json.loads(result.stdout)
    assert (found["state"], found["count"]) == ("free", None)
    assert found["count_error"] == "is a symbolic link"
    table = status("-f", str(counter), str(lock))
    assert table.returncode == 71
    assert table.stdout.splitlines()[-1] == f"{counter}: is a symbolic link"
    assert not (tmp_path / "elsewhere").exists()


def test_the_table_fits_80_columns(lockdir: Path, tmp_path: Path, procs):
    go = tmp_path / "go"
    long = f"{until(go)}; " + "echo " + "x" * 200
    procs.append(start("-l", "job.lock", "-c", long, cwd=lockdir))
    wait_for((lockdir / "job.lock").exists, "the lock")
    leave_stale(lockdir / "other.lock")
    result = status("job.lock", "other.lock", cwd=lockdir)
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith("held ") and lines[1].endswith("...")
    assert len(lines[1]) == 80
    assert "while [ ! -e" in lines[1]
    assert lines[2].split()[-2:] == ["sleep", "60"]
    go.touch()


def test_a_long_lock_path_is_never_cut(lockdir: Path):
    deep = lockdir / ("d" * 100)
    deep.mkdir()
    lock = deep / "job.lock"
    leave_stale(lock)
    (row,) = rows(status(str(lock)))
    assert row[1] == str(lock)


def test_a_command_with_a_newline_stays_on_its_row(lockdir: Path):
    lock = lockdir / "job.lock"
    record(lock, command="first\\nsecond")
    result = status("job.lock", cwd=lockdir)
    assert len(result.stdout.splitlines()) == 2
    assert result.stdout.splitlines()[1].endswith("first\\nsecond")
    assert the(lock)["holder"]["command"] == "first\nsecond"  # type: ignore[index]


def test_unusable_paths_are_reported_and_the_others_still_read(lockdir: Path, tmp_path: Path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    good, link, fifo, missing = (lockdir / "good.lock", lockdir / "link.lock",
                                 lockdir / "fifo.lock", tmp_path / "nope" / "job.lock")  # fmt: skip
    directory, linked = lockdir / "dir.lock", lockdir / "linked.lock"
    leave_stale(good)
    link.symlink_to(target)
    os.mkfifo(fifo)
    directory.mkdir()
    manual = lockdir / "manual"
    manual.write_text("paused\n")
    os.link(manual, linked)
    order = [link, good, fifo, missing, directory, linked]
    found = as_json(*order, code=71)
    assert [f["state"] for f in found] == ["unusable", "stale", "unusable", "unusable",
                                           "unusable", "unusable"]  # fmt: skip
    assert [f.get("error") for f in found] == [
        "is a symbolic link", None, "is a FIFO",
        f"directory {missing.parent}: no such file or directory", "is a directory",
        "has 2 hard links",
    ]  # fmt: skip
    assert found[0] == {"lockfile": str(link), "state": "unusable", "holder": None, "since": None,
                        "age": None, "error": "is a symbolic link"}  # fmt: skip
    result = status(*map(str, order))
    assert result.returncode == 71
    assert [row[0] for row in rows(result)] == [f["state"] for f in found]
    assert notes(result) == [f"{f['lockfile']}: {f['error']}" for f in found if "error" in f]
    assert target.read_text() == "precious\n"
    assert link.is_symlink() and fifo.exists() and not missing.parent.exists()


@ROOT
def test_another_users_file_is_unusable(lockdir: Path, tmp_path: Path, procs):
    theirs, held = lockdir / "theirs.lock", lockdir / "held.lock"
    nobodys_file(theirs)
    procs.append(settled(held, tmp_path / "go"))
    found = as_json(theirs, held, code=71)
    assert found[0]["error"] == f"belongs to uid {NOBODY}, not to uid {os.geteuid()}"
    assert found[1]["state"] == "held"
    (tmp_path / "go").touch()


def test_status_changes_nothing(lockdir: Path, tmp_path: Path, procs):
    held, stale, manual = lockdir / "held.lock", lockdir / "stale.lock", lockdir / "manual.lock"
    proc = settled(held, tmp_path / "go")
    procs.append(proc)
    leave_stale(stale)
    manual.write_text("paused\n")
    before = {p: snapshot(p) for p in (held, stale, manual)}
    for args in (["--json"], [], ["-f", str(tmp_path / "count")]):
        paths = [held] if args[:1] == ["-f"] else [held, stale, manual]
        assert status(*args, *map(str, paths)).returncode == 0
    assert {p: snapshot(p) for p in before} == before
    assert sorted(p.name for p in lockdir.iterdir()) == ["held.lock", "manual.lock", "stale.lock"]
    assert not (tmp_path / "count").exists()
    assert proc.poll() is None and alive(proc.pid)
    assert run("-l", str(held), "-c", "true").returncode == 75, "still held"
    taken = run("-l", str(stale), "-c", "true")
    assert taken.returncode == 0 and "removed the stale lock" in taken.stderr, "still stale"
    (tmp_path / "go").touch()
    assert finish(proc)[0] == 0


@STRACE
def test_status_takes_no_flock_where_proc_locks_can_tell(lockdir: Path, tmp_path: Path, procs):
    """A run trying the lock at that moment would be refused by an exclusive flock."""
    held, stale, left = lockdir / "held.lock", lockdir / "stale.lock", lockdir / "left.lock"
    procs.append(settled(held, tmp_path / "go"))
    leave_stale(stale)
    record(left)
    fd = flocked(left)
    trace = tmp_path / "trace"
    try:
        result = subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=flock", "-o", str(trace), *TASKRUNNER,
             "status", str(held), str(stale), str(left)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in rows(result)] == ["held", "stale", "held"]
    assert trace.read_text() == ""
    (tmp_path / "go").touch()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "no lock file given"),
        (["--bogus", "x.lock"], "unknown option --bogus"),
        (["--force", "x.lock"], "unknown option --force"),
        (["-f"], "-f needs a value (COUNTERFILE)"),
        (["-f", "count", "a.lock", "b.lock"], "-f/--counter-file goes with exactly one lock file"),
        (["-f", "c1", "-f", "c2", "a.lock"], "-f/--counter-file given more than once"),
        (["--counter-files", "x", "a.lock"], "unknown option --counter-files"),
        ([""], "a path is empty"),
        (["--json"], "no lock file given"),
    ],
    ids=str,
)
def test_usage_errors(args: list[str], says: str):
    result = status(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    usage, error = result.stderr.splitlines()
    assert usage == "usage: taskrunner status [--json] [-f COUNTERFILE] LOCKFILE..."
    assert error.startswith("taskrunner: error: ") and says in error


def test_help_and_a_path_that_looks_like_an_option(lockdir: Path):
    shown = status("--help")
    assert shown.returncode == 0 and "usage: taskrunner status" in shown.stdout
    result = status("--json", "--", "-job.lock", cwd=lockdir)
    assert result.returncode == 0
    assert json.loads(result.stdout)[0]["lockfile"] == "-job.lock"
    assert status("--json", "--json", "x.lock", cwd=lockdir).returncode == 0
