"""The command line: options, usage errors, help, version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from taskrunner import __version__
from taskrunner.cli import OPTIONS, duration, main, main_parser, parse

from conftest import TASKRUNNER, run


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-c", "true"],
        ["-l", "L"],
        ["-l", "L", "-c", "true", "--", "true"],
        ["-l", "L", "--"],
        ["-l", "L", "--", ""],
        ["-l", "L", "-c", ""],
        ["-l", "", "-c", "true"],
        ["-l", "L", "-c"],
        ["-l", "L", "-l", "M", "-c", "true"],
        ["-l", "L", "-t", "3", "-c", "true"],
        ["-l", "L", "-f", "C", "-c", "true"],
        ["-l", "L", "-t", "-1", "-f", "C", "-c", "true"],
        ["-l", "L", "-t", "x", "-f", "C", "-c", "true"],
        ["-l", "L", "-t", "1.5", "-f", "C", "-c", "true"],
        ["-l", "L", "-t", "3", "-f", "L", "-c", "true"],
        ["-l", "L", "--cumulative", "-c", "true"],
        ["-l", "L", "--wait", "-1", "-c", "true"],
        ["-l", "L", "--wait", "soon", "-c", "true"],
        ["-l", "L", "--wait", "5x", "-c", "true"],
        ["-l", "L", "--wait", "", "-c", "true"],
        ["-l", "L", "--timeout", "nan", "-c", "true"],
        ["-l", "L", "--timeout", "inf", "-c", "true"],
        ["-l", "L", "--timeout", "99999999999", "-c", "true"],
        ["-l", "L", "--kill-after", "1..2", "-c", "true"],
        ["-l", "L", "-q", "-v", "-c", "true"],
        ["-l", "L", "--log-format", "xml", "-c", "true"],
        ["-l", "L", "--name", "", "-c", "true"],
        ["-l", "L", "--bogus", "-c", "true"],
        ["-l", "L", "--cumulative=yes", "-c", "true"],
        ["-l", "L", "-c", "true", "stray"],
        ["-l", "L", "--lock", "M", "-c", "true"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], lockdir: Path):
    result = run(*args, cwd=str(lockdir))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("usage: taskrunner ")
    errors = [line for line in lines if line.startswith("taskrunner: error: ")]
    assert len(errors) == 1, lines
    assert "Traceback" not in result.stderr
    assert list(lockdir.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("0", 0.0),
        (".5", 0.5),
        ("2.", 2.0),
    ],
)
def test_durations(text: str, seconds: float):
    assert duration(text) == seconds


def test_option_spellings():
    assert parse(["-lL", "-cecho hi", "-t3", "-fC"]) == {
        "lockfile": "L",
        "command": "echo hi",
        "threshold": 3,
        "counter_file": "C",
    }
    assert parse(["--lockfile=L", "--wait=5m", "-vv"]) == {
        "lockfile": "L",
        "wait": 300.0,
        "verbose": 2,
    }
    assert parse(["-l", "-weird-name"]) == {"lockfile": "-weird-name"}


def test_help_lists_every_option_and_the_exit_statuses():
    result = run("--help")
    assert result.returncode == 0
    for opt in OPTIONS:
        for flag in opt.flags:
            assert flag in result.stdout
    for status in ("71", "75", "76", "124", "126, 127"):
        assert f"\n  {status} " in result.stdout
    assert main_parser().format_help() == result.stdout


def test_version():
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"taskrunner {__version__}\n")
    module = subprocess.run(
        [sys.executable, "-m", "taskrunner", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert module.stdout == result.stdout


def test_main_returns_the_status(lockdir: Path, capsys):
    assert main(["-l", str(lockdir / "x"), "--bogus"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert main(["--version"]) == 0


def test_python_m_runs_a_job(lockdir: Path):
    result = subprocess.run(
        [sys.executable, "-m", "taskrunner", "-l", str(lockdir / "x"), "--", "sh", "-c", "exit 9"],
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    assert result.returncode == 9


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--", "/nonexistent/program"], 127, "command not found"),
        (["--", "no-such-program-anywhere"], 127, "command not found"),
        (["--", "/etc/passwd"], 126, "permission denied"),
        (["--", "/"], 126, "permission denied"),
        (["-c", "no-such-program-anywhere"], 127, "not found"),
        (["-c", "/etc/passwd"], 126, "ermission denied"),
    ],
)
def test_programs_that_cannot_run(lockdir: Path, args: list[str], status: int, message: str):
    result = run("-l", str(lockdir / "job.lock"), *args)
    assert result.returncode == status
    assert message in result.stderr
    assert list(lockdir.iterdir()) == []


def shell(line: str) -> subprocess.CompletedProcess[str]:
    """taskrunner run by ``sh -c`` (for redirections); ``TR`` in ``line`` stands for it."""
    return subprocess.run(
        line.replace("TR", " ".join(TASKRUNNER)), shell=True, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_closed_stdout_and_stderr(lockdir: Path):
    for closed in (">&-", "2>&-", ">&- 2>&-"):
        result = shell(f"TR -l {lockdir}/x -- sh -c 'exit 3' {closed}")
        assert result.returncode == 3, (closed, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_system_without_sigtimedwait_is_told_so(lockdir: Path, monkeypatch, capsys):
    from taskrunner import signals

    monkeypatch.delattr(signals.signal, "sigtimedwait")
    assert main(["-l", str(lockdir / "job.lock"), "-c", "true"]) == 71
    (line,) = capsys.readouterr().err.splitlines()
    assert "lacks sigtimedwait" in line
    assert list(lockdir.iterdir()) == []


def test_a_script_without_a_shebang_runs_through_sh(lockdir: Path, tmp_path: Path):
    script = tmp_path / "plain"
    script.write_text('echo "ran with $1"\n')
    script.chmod(0o755)
    result = run("-l", str(lockdir / "job.lock"), "--", str(script), "arg")
    assert (result.returncode, result.stdout) == (0, "ran with arg\n")
    on_path = run(
        "-l",
        str(lockdir / "job.lock"),
        "--",
        "plain",
        "x",
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert (on_path.returncode, on_path.stdout) == (0, "ran with x\n")


def test_the_command_gets_the_signal_state_taskrunner_was_started_with(lockdir: Path):
    """A blocked SIGUSR1 stays blocked and an ignored SIGALRM stays ignored; SIGPIPE, which
    Python ignores for itself, is back to its default."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGALRM, signal.SIG_IGN)

    result = run(
        "-l", str(lockdir / "job.lock"), "--", "grep", "^Sig", "/proc/self/status", preexec_fn=setup
    )
    assert result.returncode == 0
    fields = dict(line.split(":\t") for line in result.stdout.splitlines())
    blocked, ignored = int(fields["SigBlk"], 16), int(fields["SigIgn"], 16)
    assert blocked & (1 << (signal.SIGUSR1 - 1))
    assert ignored & (1 << (signal.SIGALRM - 1))
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not blocked & (1 << (signal.SIGTERM - 1))


@pytest.mark.parametrize("args", [[], ["-c", "true"], ["-l", "L"]])
def test_a_missing_lock_or_command_shows_the_whole_help(args: list[str], lockdir: Path):
    result = run(*args, cwd=str(lockdir))
    assert result.returncode == 2
    assert "exit status:" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("taskrunner: error: ")
    assert sum(line.startswith("taskrunner: error: ") for line in result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_with_stdout_closed(args: list[str]):
    result = shell(f"TR {args[0]} >&-")
    assert (result.returncode, result.stderr) == (0, "")


def test_the_command_gets_dev_null_for_closed_standard_descriptors(lockdir: Path, tmp_path: Path):
    out = tmp_path / "fds"
    result = shell(f"TR -l {lockdir}/x -c 'readlink /proc/self/fd/0 > {out}' <&-")
    assert result.returncode == 0
    assert out.read_text() == "/dev/null\n"
