"""--quiet-success: the command's output is held on disk and shown only if it fails."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from conftest import HANG, TASKRUNNER, finish, hold, run, start, wait_for

SCRIPT = (
    "import sys; d = bytes(range(256)) * 64; "
    "sys.stdout.buffer.write(d); sys.stderr.buffer.write(d[::-1]); sys.exit(int(sys.argv[1]))"
)


def test_success_shows_nothing(lockdir: Path):
    result = run("-l", str(lockdir / "job.lock"), "--quiet-success", "--",
                 "python3", "-c", SCRIPT, "0")  # fmt: skip
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == ""


def test_failure_shows_both_streams_whole_and_apart(lockdir: Path):
    result = subprocess.run(
        [*TASKRUNNER, "-l", str(lockdir / "job.lock"), "--quiet-success", "--",
         "python3", "-c", SCRIPT, "3"],
        capture_output=True, timeout=HANG, start_new_session=True,
    )  # fmt: skip
    every_byte = bytes(range(256)) * 64
    assert result.returncode == 3
    assert result.stdout == every_byte
    assert result.stderr == every_byte[::-1]


def test_a_command_stopped_at_its_time_limit_shows_its_output(lockdir: Path):
    result = run("-l", str(lockdir / "job.lock"), "--quiet-success", "--timeout", "0.3",
                 "-c", "echo so far; sleep 30")  # fmt: skip
    assert result.returncode == 124
    assert result.stdout == "so far\n"
    assert "time limit" in result.stderr


def test_output_is_held_on_disk_not_in_memory(lockdir: Path, tmp_path: Path):
    """150 MB of output, with taskrunner's address space capped at 80 MB: holding it in
    memory, or reading it back whole, could not fit."""
    size, out = 150_000_000, tmp_path / "out"
    pattern = "yes 0123456789abcdefghijklmnopqrstuvwxyz"
    with out.open("wb") as sink:
        result = subprocess.run(
            ["prlimit", "--as=80000000", *TASKRUNNER, "-l", str(lockdir / "job.lock"),
             "--quiet-success", "-c", f"{pattern} | head -c {size}; exit 1"],
            stdout=sink, stderr=subprocess.PIPE, timeout=HANG * 3, start_new_session=True,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert out.stat().st_size == size
    expected = subprocess.run(f"{pattern} | head -c {size} | sha256sum", shell=True,
                              capture_output=True, text=True).stdout.split()[0]  # fmt: skip
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == expected


def unnamed_files(pid: int) -> list[Path]:
    """The descriptors of ``pid`` open on files with no name, as /proc shows them now (a
    descriptor may close while they are listed)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "(deleted)" in str(fd.readlink()):
                found.append(fd)
        except OSError:
            pass
    return found


def test_held_output_is_an_unnamed_file_of_ours(lockdir: Path, tmp_path: Path, procs):
    go = tmp_path / "go"
    proc = start("-l", str(lockdir / "job.lock"), "--quiet-success", "-c",
                 f"echo secret; while [ ! -e {go} ]; do sleep 0.01; done; exit 1")  # fmt: skip
    procs.append(proc)
    wait_for(lambda: len(unnamed_files(proc.pid)) == 2, "the held output's two files")
    held = unnamed_files(proc.pid)  # stdout and stderr, kept apart
    for p in held:
        assert p.stat().st_mode & 0o077 == 0, "no one else may read the output"
    go.touch()
    status, out, _ = finish(proc)
    assert (status, out) == (1, "secret\n")


def test_a_refused_run_shows_nothing_of_the_command(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(hold(lock, go))
    result = run("-l", str(lock), "--quiet-success", "-c", "echo never")
    assert result.returncode == 75
    assert result.stdout == ""
    go.touch()
