"""Bad input of every kind: the documented status and one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import HANG, TASKRUNNER

# (id, arguments, setup, status, what the one line says; None: nothing on stderr at all)
# Arguments may use {d} for a scratch directory; a manual hold at {d}/held.lock makes a run
# refused, so that the counter is read and written.
CASES = [
    ("negative threshold", ["-l", "{d}/L", "-t", "-1", "-f", "{d}/C", "-c", "true"], None, 2, "-t/--threshold"),
    ("word threshold", ["-l", "{d}/L", "-t", "ten", "-f", "{d}/C", "-c", "true"], None, 2, "not a whole number"),
    ("decimal threshold", ["-l", "{d}/L", "-t", "1.5", "-f", "{d}/C", "-c", "true"], None, 2, "not a whole number"),
    ("huge threshold", ["-l", "{d}/L", "-t", "9" * 30, "-f", "{d}/C", "-c", "true"], None, 2, "not a whole number"),
    ("negative wait", ["-l", "{d}/L", "--wait", "-1", "-c", "true"], None, 2, "not a duration"),
    ("unknown unit", ["-l", "{d}/L", "--wait", "5x", "-c", "true"], None, 2, "not a duration"),
    ("empty duration", ["-l", "{d}/L", "--timeout", "", "-c", "true"], None, 2, "not a duration"),
    ("nan duration", ["-l", "{d}/L", "--timeout", "nan", "-c", "true"], None, 2, "not a duration"),
    ("exponent duration", ["-l", "{d}/L", "--timeout", "1e3", "-c", "true"], None, 2, "not a duration"),
    ("two dots", ["-l", "{d}/L", "--kill-after", "1..2", "-c", "true"], None, 2, "not a duration"),
    ("centuries", ["-l", "{d}/L", "--timeout", "99999d", "-c", "true"], None, 2, "too long"),
    ("empty lock", ["-l", "", "-c", "true"], None, 2, "--lockfile is empty"),
    ("empty command", ["-l", "{d}/L", "-c", ""], None, 2, "--command is empty"),
    ("empty name", ["-l", "{d}/L", "--name", "", "-c", "true"], None, 2, "--name is empty"),
    ("empty counter", ["-l", "{d}/L", "-t", "1", "-f", "", "-c", "true"], None, 2, "--counter-file is empty"),
    ("empty program", ["-l", "{d}/L", "--", ""], None, 2, "program after -- is empty"),
    ("no lock", ["-c", "true"], None, 2, "lock file is required"),
    ("no command", ["-l", "{d}/L"], None, 2, "no command"),
    ("nothing after --", ["-l", "{d}/L", "--"], None, 2, "no program after --"),
    ("lock twice", ["-l", "{d}/L", "-l", "{d}/M", "-c", "true"], None, 2, "given more than once"),
    ("both forms", ["-l", "{d}/L", "-c", "true", "--", "true"], None, 2, "not both"),
    ("threshold alone", ["-l", "{d}/L", "-t", "3", "-c", "true"], None, 2, "go together"),
    ("counter alone", ["-l", "{d}/L", "-f", "{d}/C", "-c", "true"], None, 2, "go together"),
    ("cumulative alone", ["-l", "{d}/L", "--cumulative", "-c", "true"], None, 2, "--cumulative needs"),
    ("quiet and verbose", ["-l", "{d}/L", "-q", "-v", "-c", "true"], None, 2, "contradict"),
    ("counter is the lock", ["-l", "{d}/L", "-t", "1", "-f", "{d}/L", "-c", "true"], None, 2, "must not be the lock"),
    ("unknown option", ["-l", "{d}/L", "--frobnicate", "-c", "true"], None, 2, "unknown option --frobnicate"),
    ("stray argument", ["-l", "{d}/L", "-c", "true", "extra"], None, 2, "unexpected argument"),
    ("log format", ["-l", "{d}/L", "--log-format", "xml", "-c", "true"], None, 2, "not text or json"),
    ("no such program", ["-l", "{d}/L", "--", "no-such-program-anywhere"], None, 127, "command not found"),
    ("no such path", ["-l", "{d}/L", "--", "/no/such/program"], None, 127, "command not found"),
    ("not executable", ["-l", "{d}/L", "--", "{d}/plain.txt"], "plain", 126, "permission denied"),
    ("a directory", ["-l", "{d}/L", "--", "{d}"], None, 126, "permission denied"),
    ("lock in no directory", ["-l", "{d}/no/L", "-c", "true"], None, 71, "no such file or directory"),
    ("counter in no directory", ["-l", "{d}/L", "-t", "1", "-f", "{d}/no/C", "-c", "true"], None, 71, "no such file or directory"),
    # Walked one directory at a time, an over-long path fails at its first missing part.
    ("over-long path", ["-l", "{d}/" + "d/" * 2100 + "L", "-c", "true"], None, 71, "no such file or directory"),
    ("over-long name", ["-l", "{d}/" + "n" * 300, "-c", "true"], None, 71, "file name too long"),
    ("garbage count", ["-l", "{d}/held.lock", "-t", "9", "-f", "{d}/C", "-c", "true"], b"banana\n", 75, "not a count"),
    ("negative count", ["-l", "{d}/held.lock", "-t", "9", "-f", "{d}/C", "-c", "true"], b"-4\n", 75, "not a count"),
    ("huge count file", ["-l", "{d}/held.lock", "-t", "9", "-f", "{d}/C", "-c", "true"], b"7" * (1 << 20), 75, "not a count"),
    ("empty count", ["-l", "{d}/held.lock", "-t", "9", "-f", "{d}/C", "-c", "true"], b"", 75, None),
    ("binary count", ["-l", "{d}/held.lock", "-t", "9", "-f", "{d}/C", "-c", "true"], b"\xff\x00\xfe", 75, "not a count"),
]  # fmt: skip
NON_UTF8 = [
    ("non-UTF-8 lock path", [b"-l", b"{d}/\xff\xfe.lock", b"-c", b"exit 4"], 4),
    ("non-UTF-8 command", [b"-l", b"{d}/L", b"-c", b"echo \xff > /dev/null; exit 5"], 5),
    ("non-UTF-8 program argument", [b"-l", b"{d}/L", b"--", b"sh", b"-c", b"exit 6", b"\xff"], 6),
    ("non-UTF-8 name", [b"-l", b"{d}/L", b"--name", b"\xc3\x28", b"-c", b"exit 7"], 7),
    ("non-UTF-8 missing directory", [b"-l", b"{d}/\xff/L", b"-c", b"true"], 71),
]


def taskrunner(args: list[bytes], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*map(os.fsencode, TASKRUNNER), *args],
        capture_output=True, timeout=HANG, cwd=cwd, start_new_session=True,
    )  # fmt: skip


def own_lines(stderr: bytes) -> list[bytes]:
    return [line for line in stderr.splitlines() if line.startswith(b"taskrunner: ")]


@pytest.mark.parametrize(
    ("args", "setup", "status", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(tmp_path: Path, args: list[str], setup: object, status: int, says: str | None):
    d = tmp_path / "d"
    d.mkdir()
    if setup == "plain":
        (d / "plain.txt").write_text("echo hi\n")
    elif isinstance(setup, bytes):
        (d / "held.lock").write_text("paused by hand\n")
        (d / "C").write_bytes(setup)
    result = taskrunner([os.fsencode(a.replace("{d}", str(d))) for a in args], tmp_path)
    assert result.returncode == status, result.stderr
    assert b"Traceback" not in result.stderr
    lines = own_lines(result.stderr)
    if says is None:
        assert result.stderr == b""
    else:
        assert len(lines) == 1, result.stderr
        assert says.encode() in lines[0]
    if status != 75:
        assert sorted(p.name for p in d.iterdir()) in ([], ["plain.txt"]), "nothing left behind"


@pytest.mark.parametrize(
    ("args", "status"), [c[1:] for c in NON_UTF8], ids=[c[0] for c in NON_UTF8]
)
def test_bytes_that_are_not_utf8(tmp_path: Path, args: list[bytes], status: int):
    d = tmp_path / "d"
    d.mkdir()
    result = taskrunner([a.replace(b"{d}", os.fsencode(d)) for a in args], tmp_path)
    assert result.returncode == status, result.stderr
    assert b"Traceback" not in result.stderr
    assert len(own_lines(result.stderr)) == (1 if status == 71 else 0)
    assert list(d.iterdir()) == []
