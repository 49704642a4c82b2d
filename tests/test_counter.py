"""The counter file: refusals in a row, the report past the threshold, the resets."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from taskrunner.counter import parse

from conftest import TASKRUNNER, finish, hold, run, start


@pytest.fixture
def held(lockdir: Path, tmp_path: Path, procs):
    """A lock held by a run that ends when the returned function is called."""
    lock, go = lockdir / "job.lock", tmp_path / "go"
    proc = hold(lock, go)
    procs.append(proc)

    def release() -> None:
        go.touch()
        assert finish(proc)[0] == 0

    release.lock = lock  # type: ignore[attr-defined]
    return release


def refuse(lock: Path, counter: Path, *extra: str):
    return run("-l", str(lock), "-t", "3", "-f", str(counter), *extra, "-c", "true")


def test_threshold_three_reports_on_the_fourth_refusal_then_counts_again(held, tmp_path: Path):
    counter = tmp_path / "count"
    for n in (1, 2, 3):
        result = refuse(held.lock, counter)
        assert (result.returncode, result.stderr) == (75, ""), n
        assert counter.read_text() == f"{n}\n"
    report = refuse(held.lock, counter)
    assert report.returncode == 76
    (line,) = report.stderr.splitlines()
    assert line.startswith("taskrunner: error: ")
    assert str(held.lock) in line
    assert "refused 4 times in a row (threshold 3)" in line
    assert not counter.exists() or counter.read_text() == "0\n"
    again = refuse(held.lock, counter)
    assert (again.returncode, again.stderr) == (75, "")
    assert counter.read_text() == "1\n"


def test_a_run_that_takes_the_lock_resets_the_count(held, tmp_path: Path):
    counter = tmp_path / "count"
    refuse(held.lock, counter)
    refuse(held.lock, counter)
    assert counter.read_text() == "2\n"
    held()
    assert refuse(held.lock, counter).returncode == 0
    assert not counter.exists()


def test_cumulative_keeps_counting_across_successful_runs(held, tmp_path: Path):
    counter = tmp_path / "count"
    refuse(held.lock, counter, "--cumulative")
    refuse(held.lock, counter, "--cumulative")
    held()
    assert refuse(held.lock, counter, "--cumulative").returncode == 0
    assert counter.read_text() == "2\n"


def test_cumulative_resets_when_a_report_fires(held, tmp_path: Path):
    counter = tmp_path / "count"
    counter.write_text("3\n")
    report = refuse(held.lock, counter, "--cumulative")
    assert report.returncode == 76
    assert "refused 4 times (threshold 3)" in report.stderr
    assert refuse(held.lock, counter, "--cumulative").returncode == 75
    assert counter.read_text() == "1\n"


def test_threshold_zero_turns_counting_off_and_leaves_the_file_alone(held, tmp_path: Path):
    counter = tmp_path / "count"
    counter.write_text("7\n")
    before = counter.stat()
    result = run("-l", str(held.lock), "-t", "0", "-f", str(counter), "-c", "true")
    assert result.returncode == 75
    assert result.stderr.startswith("taskrunner: warning: ")
    assert counter.read_text() == "7\n"
    assert counter.stat().st_mtime_ns == before.st_mtime_ns
    held()
    assert run("-l", str(held.lock), "-t", "0", "-f", str(counter), "-c", "true").returncode == 0
    assert counter.read_text() == "7\n"


@pytest.mark.parametrize(
    "content",
    [b"banana\n", b"-5\n", b"1.5\n", b"12 13\n", b"\x00\xff\xfe", b"9" * 40 + b"\n", b"7" * 100000],
    ids=["word", "negative", "decimal", "two", "binary", "too-many-digits", "huge"],
)
def test_content_that_is_not_a_count_is_read_as_zero_with_a_warning(
    held, tmp_path: Path, content: bytes
):
    counter = tmp_path / "count"
    counter.write_bytes(content)
    result = refuse(held.lock, counter)
    assert result.returncode == 75
    (line,) = result.stderr.splitlines()
    assert line.startswith("taskrunner: warning: ") and "not a count" in line
    assert counter.read_text() == "1\n"


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n"])
def test_an_empty_counter_is_zero_silently(held, tmp_path: Path, content: bytes):
    counter = tmp_path / "count"
    counter.write_bytes(content)
    result = refuse(held.lock, counter)
    assert (result.returncode, result.stderr) == (75, "")
    assert counter.read_text() == "1\n"


def test_a_count_with_spaces_around_it_is_read(held, tmp_path: Path):
    counter = tmp_path / "count"
    counter.write_bytes(b" 2 \n")
    assert (refuse(held.lock, counter).returncode, counter.read_text()) == (75, "3\n")


def test_a_temp_file_left_by_a_crash_is_replaced(held, tmp_path: Path):
    counter, temp = tmp_path / "count", tmp_path / "count.tmp"
    counter.write_text("2\n")
    temp.write_text("99\n")  # what a runner killed between write and rename leaves
    assert refuse(held.lock, counter).returncode == 75
    assert counter.read_text() == "3\n"
    assert not temp.exists()


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_an_unusable_counter_path_stops_the_run(lockdir: Path, tmp_path: Path, kind: str):
    counter, target, ran = tmp_path / "count", tmp_path / "target", tmp_path / "ran"
    target.write_text("5\n")
    if kind == "directory":
        counter.mkdir()
    elif kind == "symlink":
        counter.symlink_to(target)
    else:
        os.mkfifo(counter)
    result = run(
        "-l", str(lockdir / "job.lock"), "-t", "3", "-f", str(counter), "-c", f"touch {ran}"
    )
    assert result.returncode == 71
    assert result.stderr.count("\n") == 1 and str(counter) in result.stderr
    assert not ran.exists()
    assert target.read_text() == "5\n"
    assert list(lockdir.iterdir()) == []


def test_counter_in_a_missing_directory_stops_the_run(lockdir: Path, tmp_path: Path):
    result = run("-l", str(lockdir / "job.lock"), "-t", "3", "-f", str(tmp_path / "no" / "c"),
                 "-c", "true")  # fmt: skip
    assert result.returncode == 71


def test_parse():
    assert parse(b"") == 0
    assert parse(b"42\n") == 42
    assert parse(b"0042") == 42
    assert parse(b"-1") is None
    assert parse(b"4 2") is None
    assert parse(b"\xd9\xa3") is None  # an Arabic-Indic digit is not ASCII


def test_refusals_killed_at_random_moments_leave_a_count_between_old_and_new(held, tmp_path: Path):
    """kill -9 lands anywhere in a refusal, the counter update included: the count stays a
    count, never below the refusals that finished nor above those that began."""
    counter = tmp_path / "count"
    rng = random.Random(1234)
    runners = [
        start("-l", str(held.lock), "-t", "100000", "-f", str(counter), "-c", "true")
        for _ in range(60)
    ]
    for proc in rng.sample(runners, 30):
        time.sleep(rng.uniform(0, 0.01))
        proc.kill()
    statuses = [finish(p)[0] for p in runners]
    finished = statuses.count(75)
    assert set(statuses) <= {75, -9}
    assert finished <= parse(counter.read_bytes()) <= len(runners)  # type: ignore[operator]
    before = parse(counter.read_bytes())
    once_more = run("-l", str(held.lock), "-t", "100000", "-f", str(counter), "-c", "true")
    assert once_more.returncode == 75
    assert parse(counter.read_bytes()) == before + 1  # type: ignore[operator]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("count")) == ["count"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_flock_error_on_the_counter_is_unusable_not_a_crash(held, tmp_path: Path):
    counter = tmp_path / "count"
    counter.write_text("2\n")
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=flock",
         "-e", "inject=flock:error=ENOLCK:when=3", *TASKRUNNER,
         "-l", str(held.lock), "-t", "5", "-f", str(counter), "-c", "true"],
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == 71
    assert str(counter) in result.stderr
    assert "Traceback" not in result.stderr
    assert counter.read_text() == "2\n"


def test_a_run_that_takes_the_lock_also_removes_a_leftover_temp_file(lockdir: Path, tmp_path: Path):
    counter, temp = tmp_path / "count", tmp_path / "count.tmp"
    counter.write_text("2\n")
    temp.write_text("3\n")  # a refusal killed between writing it and renaming it
    assert (
        run("-l", str(lockdir / "job.lock"), "-t", "5", "-f", str(counter), "-c", "true").returncode
        == 0
    )
    assert not counter.exists()
    assert not temp.exists()


def test_another_jobs_live_lock_at_the_temp_name_is_not_removed(held, tmp_path: Path, procs):
    """A lock of another job that happens to be named COUNTER.tmp must survive the count."""
    counter, other = tmp_path / "count", tmp_path / "count.tmp"
    holder = hold(other, tmp_path / "go-other")
    procs.append(holder)
    result = refuse(held.lock, counter)
    assert result.returncode == 71
    assert "count.tmp is not a counter's temp file" in result.stderr
    assert other.exists()
    assert run("-l", str(other), "-c", "true").returncode == 75, "the other job still holds it"
    (tmp_path / "go-other").touch()
    assert finish(holder)[0] == 0


def test_a_counter_name_too_long_for_its_temp_name(held, tmp_path: Path):
    counter = tmp_path / ("c" * 253)
    for n in (1, 2):
        result = refuse(held.lock, counter)
        assert (result.returncode, result.stderr) == (75, "")
        assert counter.read_text() == f"{n}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("c")) == [counter.name]
