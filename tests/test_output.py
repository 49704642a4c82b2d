"""What the command and taskrunner print, the command's environment, and the logs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import TASKRUNNER, finish, hold, run, start, wait_for


def test_command_output_passes_through_untouched(lockdir: Path):
    every_byte = bytes(range(256)) * 64
    script = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d); sys.stderr.buffer.write(d[::-1])"
    result = subprocess.run(
        [*TASKRUNNER, "-l", str(lockdir / "job.lock"), "--", "python3", "-c", script],
        input=every_byte,
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    assert result.returncode == 0
    assert result.stdout == every_byte
    assert result.stderr == every_byte[::-1]


def test_command_environment(lockdir: Path, tmp_path: Path):
    env_out = tmp_path / "env"
    run("-l", str(lockdir / "job.lock"), "-c", f"env > {env_out}", cwd=str(lockdir))
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines() if "=" in line)
    assert env["TASKRUNNER_LOCKFILE"] == str(lockdir / "job.lock")
    assert env["TASKRUNNER_NAME"] == "job.lock"
    run("-l", "job.lock", "--name", "nightly-backup", "-c", f"env > {env_out}", cwd=str(lockdir))
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines() if "=" in line)
    assert env["TASKRUNNER_LOCKFILE"] == str(lockdir / "job.lock")
    assert env["TASKRUNNER_NAME"] == "nightly-backup"


def test_quiet_when_fine_and_own_lines_are_prefixed(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    ok = run("-l", str(lock), "-c", "echo out; echo err >&2")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "out\n", "err\n")
    holder = hold(lock, go)
    procs.append(holder)
    busy = run("-l", str(lock), "-c", "true")
    (line,) = busy.stderr.splitlines()
    assert re.fullmatch(
        rf"taskrunner: warning: job\.lock: not run: {re.escape(str(lock))} is held by pid "
        rf"{holder.pid} on {re.escape(socket.gethostname())} for \d+s \(command .sh -c .*.\)",
        line,
    ), line
    assert run("-q", "-l", str(lock), "-c", "true").stderr == ""
    verbose = run("-v", "-l", str(lock), "-t", "9", "-f", str(tmp_path / "c"), "-c", "true")
    assert "refused once in a row (threshold 9)" in verbose.stderr
    go.touch()
    finish(holder)
    assert "exited with status 0" in run("-v", "-l", str(lock), "-c", "true").stderr
    assert "started 'true' as pid" in run("-vv", "-l", str(lock), "--", "true").stderr


def test_report_names_lock_holder_age_command_and_count(lockdir: Path, tmp_path: Path, procs):
    lock, go, counter = lockdir / "job.lock", tmp_path / "go", tmp_path / "count"
    holder = start(
        "-l",
        str(lock),
        "--name",
        "backup",
        "-c",
        f"while [ ! -e {go} ]; do sleep 0.01; done # backup.sh",
    )
    procs.append(holder)
    wait_for(lock.exists, "the holder")
    counter.write_text("1\n")
    report = run("-l", str(lock), "--name", "backup", "-t", "1", "-f", str(counter), "-c", "true")
    assert report.returncode == 76
    (line,) = report.stderr.splitlines()
    assert line.startswith("taskrunner: error: backup looks stuck: ")
    for part in (
        str(lock),
        f"pid {holder.pid}",
        f"on {socket.gethostname()}",
        "backup.sh",
        "refused 2 times",
    ):
        assert part in line
    assert re.search(r" for \d+s ", line)
    go.touch()
    finish(holder)


def test_log_file_text_and_json(lockdir: Path, tmp_path: Path):
    lock, text_log, json_log = lockdir / "job.lock", tmp_path / "text.log", tmp_path / "json.log"
    assert run("-l", str(lock), "--log-file", str(text_log), "-c", "exit 3").returncode == 3
    (line,) = text_log.read_text().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d taskrunner\[\d+\]: info: job\.lock: exited with status 3 after .*",
        line,
    ), line
    proc = start(
        "-l",
        str(lock),
        "--log-file",
        str(json_log),
        "--log-format",
        "json",
        "--name",
        "nightly",
        "-c",
        "exit 0",
    )
    assert finish(proc)[0] == 0
    (record,) = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert record["event"] == "finished"
    assert record["level"] == "info"
    assert record["name"] == "nightly"
    assert record["pid"] == proc.pid
    assert "exited with status 0" in record["message"]


def test_log_file_that_cannot_be_opened_is_a_warning_not_a_failure(lockdir: Path, tmp_path: Path):
    result = run(
        "-l",
        str(lockdir / "job.lock"),
        "--log-file",
        str(tmp_path / "no" / "x.log"),
        "-c",
        "exit 4",
    )
    assert result.returncode == 4
    assert result.stderr.startswith("taskrunner: warning: cannot open log file")


def test_syslog(lockdir: Path, tmp_path: Path, procs):
    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    lock = lockdir / "job.lock"
    env = {**os.environ, "TASKRUNNER_SYSLOG_SOCKET": path}
    assert run("-l", str(lock), "--syslog", "-c", "exit 5", env=env).returncode == 5
    message = sock.recv(4096).decode()
    assert re.fullmatch(
        r"<14>\w{3} [ \d]\d \d\d:\d\d:\d\d taskrunner\[\d+\]: info: job\.lock: exited with status 5 after .*",
        message,
    ), message
    assert (
        run("-l", str(lock), "--syslog", "--log-format", "json", "-c", "true", env=env).returncode
        == 0
    )
    message = sock.recv(4096).decode()
    assert json.loads(message.split(": ", 1)[1])["event"] == "finished"
    sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")
@pytest.mark.parametrize("kind", ["another user's file", "hard link", "symlink", "fifo"])
def test_log_file_that_is_not_ours_is_not_written(lockdir: Path, tmp_path: Path, kind: str):
    log, victim = tmp_path / "job.log", tmp_path / "victim"
    victim.write_text("precious\n")
    if kind == "another user's file":
        log.write_text("theirs\n")
        os.chown(log, 65534, 65534)
    elif kind == "hard link":
        os.link(victim, log)
    elif kind == "symlink":
        log.symlink_to(victim)
    else:
        os.mkfifo(log)
    result = run("-l", str(lockdir / "job.lock"), "--log-file", str(log), "-c", "exit 3")
    assert result.returncode == 3
    (line,) = result.stderr.splitlines()
    assert line.startswith("taskrunner: warning: cannot ")
    assert victim.read_text() == "precious\n"
    if kind == "another user's file":
        assert log.read_text() == "theirs\n"
