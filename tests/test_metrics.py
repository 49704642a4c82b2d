"""The metrics file: Prometheus text format for node_exporter's textfile collector.

Every update is made by a real process calling ``taskrunner.metrics.record``, and every file
is read with the official client's parser.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskrunner.metrics import SERIES, escape, parse, render

from conftest import AS_NOBODY, HANG, PLANTS, blocked_in_flock, flocked, plant, wait_for

# argv: PATH NAME INVOCATION-JSON [TIMES [GO-FILE]]; exit 71 and one line if unusable.
RECORD = """\
import json, os, sys, time
from taskrunner.errors import MetricsUnusable
from taskrunner.metrics import Invocation, record
from taskrunner.signals import SignalWatch
path, name, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
times = int(sys.argv[4]) if len(sys.argv) > 4 else 1
go = sys.argv[5] if len(sys.argv) > 5 else None
while go and not os.path.exists(go):
    time.sleep(0.001)
watch = SignalWatch()
try:
    for _ in range(times):
        record(path, name, Invocation(**kwargs), watch)
except MetricsUnusable as exc:
    print(f"unusable: {exc.path}: {exc.reason}")
    sys.exit(71)
"""

T0 = 1_700_000_000.25  # exactly representable, as the file's six decimals are
RUN = {"ended": T0 + 2.5, "status": 0, "started": T0, "duration": 2.5}
REFUSAL = {"ended": T0 + 10, "status": 75, "refused": True, "held": True}
REPORT = {"ended": T0 + 20, "status": 76, "refused": True, "reported": True, "held": True}
NAMES = [series for series, _, _, _ in SERIES]
ALWAYS = NAMES[3:]  # present from the first invocation on; the first three need a run


def argv(path: Path, name: str | bytes, inv: dict[str, object], *more: str) -> list[object]:
    return [sys.executable, "-c", RECORD, str(path), name, json.dumps(inv), *more]


def record(path: Path, name: str | bytes = "job", **inv: object) -> None:
    result = subprocess.run(argv(path, name, inv), capture_output=True, text=True, timeout=HANG)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def refused_record(path: Path, name: str = "job", **inv: object) -> str:
    """Record ``inv`` where it must be refused; the one line saying why."""
    result = subprocess.run(argv(path, name, inv), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 71, (result.stdout, result.stderr)
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()
    return line


def samples(text: str) -> dict[str, dict[str, float]]:
    """Job name -> sample name -> value, by the official parser; no sample twice."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) == {"name"}, sample
            job = found.setdefault(sample.labels["name"], {})
            assert sample.name not in job, f"{sample.name} twice"
            job[sample.name] = sample.value
    return found


def values(path: Path, name: str = "job") -> dict[str, float]:
    return samples(path.read_text())[name]


def types(path: Path) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(path.read_text())}


def test_a_run_then_refusals_then_a_report_then_a_run(tmp_path: Path):
    prom = tmp_path / "job.prom"
    record(prom, **RUN)
    assert values(prom) == {
        "taskrunner_last_start_timestamp_seconds": T0,
        "taskrunner_last_duration_seconds": 2.5,
        "taskrunner_last_exit_status": 0,
        "taskrunner_last_invocation_timestamp_seconds": T0 + 2.5,
        "taskrunner_last_invocation_status": 0,
        "taskrunner_consecutive_refusals": 0,
        "taskrunner_runs_total": 1,
        "taskrunner_refusals_total": 0,
        "taskrunner_reports_total": 0,
        "taskrunner_lock_held": 0,
    }
    record(prom, **REFUSAL)
    record(prom, **REFUSAL)
    record(prom, **REPORT)
    assert values(prom) == {
        "taskrunner_last_start_timestamp_seconds": T0,  # kept across refusals
        "taskrunner_last_duration_seconds": 2.5,
        "taskrunner_last_exit_status": 0,
        "taskrunner_last_invocation_timestamp_seconds": T0 + 20,
        "taskrunner_last_invocation_status": 76,
        "taskrunner_consecutive_refusals": 3,
        "taskrunner_runs_total": 1,
        "taskrunner_refusals_total": 3,
        "taskrunner_reports_total": 1,
        "taskrunner_lock_held": 1,
    }
    record(prom, ended=T0 + 100.5, status=124, started=T0 + 40, duration=60.5)
    assert values(prom) == {
        "taskrunner_last_start_timestamp_seconds": T0 + 40,
        "taskrunner_last_duration_seconds": 60.5,
        "taskrunner_last_exit_status": 124,
        "taskrunner_last_invocation_timestamp_seconds": T0 + 100.5,
        "taskrunner_last_invocation_status": 124,
        "taskrunner_consecutive_refusals": 0,
        "taskrunner_runs_total": 2,
        "taskrunner_refusals_total": 3,
        "taskrunner_reports_total": 1,
        "taskrunner_lock_held": 0,
    }
    assert types(prom) == {
        "taskrunner_last_start_timestamp_seconds": "gauge",
        "taskrunner_last_duration_seconds": "gauge",
        "taskrunner_last_exit_status": "gauge",
        "taskrunner_last_invocation_timestamp_seconds": "gauge",
        "taskrunner_last_invocation_status": "gauge",
        "taskrunner_consecutive_refusals": "gauge",
        "taskrunner_runs": "counter",  # the parser names a counter's family without _total
        "taskrunner_refusals": "counter",
        "taskrunner_reports": "counter",
        "taskrunner_lock_held": "gauge",
    }
    text = prom.read_text()
    for series in NAMES:
        assert text.count(f"# HELP {series} ") == 1
        assert text.count(f"# TYPE {series} ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.prom", "job.prom.lock"], (
        "no temp file is left"
    )


def test_before_the_command_ever_ran_its_series_are_left_out(tmp_path: Path):
    prom = tmp_path / "job.prom"
    record(prom, **REFUSAL)
    assert set(values(prom)) == set(ALWAYS)
    assert "taskrunner_last_start" not in prom.read_text()
    assert values(prom)["taskrunner_consecutive_refusals"] == 1
    record(prom, ended=T0 + 11, status=71)  # neither a run nor a refusal: an unusable lock
    assert values(prom) == {
        "taskrunner_last_invocation_timestamp_seconds": T0 + 11,
        "taskrunner_last_invocation_status": 71,
        "taskrunner_consecutive_refusals": 1,
        "taskrunner_runs_total": 0,
        "taskrunner_refusals_total": 1,
        "taskrunner_reports_total": 0,
        "taskrunner_lock_held": 0,
    }


def test_the_file_is_mode_0644_whatever_the_umask(tmp_path: Path):
    prom = tmp_path / "job.prom"
    for umask in (0o077, 0o022, 0o027):
        result = subprocess.run(argv(prom, "job", RUN), umask=umask, timeout=HANG)
        assert result.returncode == 0
        st = prom.stat()
        assert stat.S_IMODE(st.st_mode) == 0o644, oct(st.st_mode)
        assert st.st_uid == os.geteuid()


def test_fifty_refusals_at_once_and_a_run_are_all_counted(tmp_path: Path):
    prom, go = tmp_path / "job.prom", tmp_path / "go"
    procs = [subprocess.Popen(argv(prom, "job", REFUSAL, "1", str(go))) for _ in range(50)]
    procs.append(subprocess.Popen(argv(prom, "job", RUN, "1", str(go))))
    time.sleep(0.3)  # let them all start and wait for the go
    go.touch()
    assert [p.wait(timeout=HANG) for p in procs] == [0] * 51
    got = values(prom)
    assert got["taskrunner_refusals_total"] == 50
    assert got["taskrunner_runs_total"] == 1
    assert got["taskrunner_last_start_timestamp_seconds"] == T0
    assert 0 <= got["taskrunner_consecutive_refusals"] <= 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "job.prom", "job.prom.lock"]


def test_a_reader_never_sees_a_partial_file(tmp_path: Path):
    prom, go = tmp_path / "job.prom", tmp_path / "go"
    record(prom, **RUN)
    writers = [
        subprocess.Popen(argv(prom, "job", REFUSAL if i % 2 else RUN, "25", str(go)))
        for i in range(8)
    ]
    go.touch()
    reads, seen = 0, set()
    while any(w.poll() is None for w in writers):
        text = prom.read_text()
        assert text.endswith("\n")
        got = samples(text)["job"]
        assert set(got) == set(NAMES)
        assert got["taskrunner_runs_total"] + got["taskrunner_refusals_total"] <= 201
        seen.add(got["taskrunner_refusals_total"])
        reads += 1
    assert [w.wait(timeout=HANG) for w in writers] == [0] * 8
    got = values(prom)
    assert (got["taskrunner_runs_total"], got["taskrunner_refusals_total"]) == (101, 100)
    assert reads > 10 and len(seen) > 1, (reads, seen)


def test_writers_killed_at_random_moments_leave_a_whole_file(tmp_path: Path):
    """kill -9 anywhere in an update: the file stays whole, holds no count above the updates
    that began nor below those that finished, and the next update removes the temp file."""
    prom, go = tmp_path / "job.prom", tmp_path / "go"
    rng = random.Random(1234)
    procs = [subprocess.Popen(argv(prom, "job", REFUSAL, "5", str(go))) for _ in range(30)]
    time.sleep(0.3)  # let them all start and wait for the go
    go.touch()
    for proc in rng.sample(procs, 15):
        time.sleep(rng.uniform(0, 0.02))
        proc.kill()
    statuses = [p.wait(timeout=HANG) for p in procs]
    assert set(statuses) <= {0, -9}
    record(prom, **REFUSAL)
    total = values(prom)["taskrunner_refusals_total"]
    assert 5 * statuses.count(0) + 1 <= total <= 5 * len(procs) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "job.prom", "job.prom.lock"]


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b"banana\n" * 1000,
        b"# HELP other_metric Another exporter's.\n# TYPE other_metric gauge\nother_metric 3\n",
        b'taskrunner_refusals_total{name="job"} -3\n',
        b'taskrunner_refusals_total{name="job"} 1.5\n',
        b'taskrunner_refusals_total{name="job"} NaN\n',
        b'taskrunner_refusals_total{name="job"} 7 1700000000000\n',
        b'taskrunner_refusals_total{name="job",host="a"} 7\n',
        b'taskrunner_refusals_total{name="job\\q"} 7\n',
        b'taskrunner_refusals_total{name="job"} \xd9\xa3\n',
        b'taskrunner_lock_held{name="job"} 2\n',
        b'taskrunner_last_start_timestamp_seconds{name="job"} inf\n',
        b'taskrunner_refusals_total{name="job"} 7\n' + b"x" * (4 << 20),
    ],
    ids=["binary", "words", "foreign", "negative", "fraction", "nan", "timestamp",
         "other-label", "bad-escape", "arabic-digit", "flag-2", "infinite", "too-large"],
)  # fmt: skip
def test_content_not_ours_is_started_over(tmp_path: Path, content: bytes):
    prom = tmp_path / "job.prom"
    prom.write_bytes(content)
    record(prom, **REFUSAL)
    got = values(prom)
    assert got["taskrunner_refusals_total"] == 1
    assert got["taskrunner_lock_held"] == 1
    assert "taskrunner_last_start_timestamp_seconds" not in got
    assert set(samples(prom.read_text())) == {"job"}


def test_our_lines_among_garbage_are_kept(tmp_path: Path):
    prom = tmp_path / "job.prom"
    prom.write_bytes(
        b"junk\x00\xff\n"
        b'taskrunner_refusals_total{name="job"} 7\n'
        b"# a comment\n"
        b'taskrunner_last_start_timestamp_seconds{name="job"} 1700000000.25\n'
        b'taskrunner_unknown_total{name="job"} 5\n'
    )
    record(prom, **REFUSAL)
    got = values(prom)
    assert got["taskrunner_refusals_total"] == 8
    assert got["taskrunner_last_start_timestamp_seconds"] == T0
    assert got["taskrunner_runs_total"] == 0
    assert "junk" not in prom.read_text() and "unknown" not in prom.read_text()


def test_an_empty_file_is_a_start(tmp_path: Path):
    prom = tmp_path / "job.prom"
    prom.touch()
    record(prom, **RUN)
    assert values(prom)["taskrunner_runs_total"] == 1


def test_a_temp_file_left_by_a_crash_is_replaced(tmp_path: Path):
    prom, temp = tmp_path / "job.prom", tmp_path / "job.prom.tmp"
    record(prom, **RUN)
    temp.write_text("half a file")
    record(prom, **REFUSAL)
    assert values(prom)["taskrunner_refusals_total"] == 1
    assert not temp.exists()


def put(kind: str, path: Path, target: Path, ghost: Path) -> None:
    """As root, put at ``path`` a symlink to ``target`` or to the missing ``ghost``, a FIFO,
    a directory, or a hard link to ``target``."""
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "dangling symlink":
        path.symlink_to(ghost)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.link(target, path)


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "directory", "hard link"])
def test_an_unusable_path_is_refused_and_left_alone(tmp_path: Path, kind: str):
    prom, target, ghost = tmp_path / "job.prom", tmp_path / "target", tmp_path / "ghost"
    target.write_text("precious\n")
    before = target.read_text(), target.stat().st_mtime_ns
    put(kind, prom, target, ghost)
    line = refused_record(prom, **REFUSAL)
    assert line.startswith(f"unusable: {prom}: ")
    assert (target.read_text(), target.stat().st_mtime_ns) == before
    assert not ghost.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.prom", "target"]


def test_a_symlink_at_the_temp_name_is_refused(tmp_path: Path):
    prom, target = tmp_path / "job.prom", tmp_path / "target"
    target.write_text("precious\n")
    record(prom, **RUN)
    before = prom.read_bytes()
    (tmp_path / "job.prom.tmp").symlink_to(target)
    line = refused_record(prom, **REFUSAL)
    assert line == f"unusable: {prom}: job.prom.tmp is a symbolic link"
    assert target.read_text() == "precious\n"
    assert prom.read_bytes() == before


def test_a_missing_directory_is_refused(tmp_path: Path):
    line = refused_record(tmp_path / "no" / "job.prom", **REFUSAL)
    assert "no such file or directory" in line
    assert not (tmp_path / "no").exists()


def test_label_escaping_round_trips(tmp_path: Path):
    prom = tmp_path / "job.prom"
    name = 'a "quoted" back\\slash\nand a new line, \\n not one'
    record(prom, name, **REFUSAL)
    record(prom, name, **REFUSAL)
    assert list(samples(prom.read_text())) == [name]
    assert values(prom, name)["taskrunner_refusals_total"] == 2, "read back under its name"
    assert prom.read_text().count("\n") == 3 * len(ALWAYS), "HELP, TYPE and one sample each"
    assert escape(name) == 'a \\"quoted\\" back\\\\slash\\nand a new line, \\\\n not one'


def test_a_name_not_in_utf8_is_written_as_utf8(tmp_path: Path):
    prom = tmp_path / "job.prom"
    record(prom, b"caf\xe9", **REFUSAL)  # latin-1, as a file name may be
    record(prom, b"caf\xe9", **REFUSAL)
    assert values(prom, "caf\ufffd")["taskrunner_refusals_total"] == 2


def test_two_jobs_in_two_files(tmp_path: Path):
    one, two = tmp_path / "one.prom", tmp_path / "two.prom"
    record(one, "one", **RUN)
    record(two, "two", **REFUSAL)
    record(one, "one", **REFUSAL)
    assert list(samples(one.read_text())) == ["one"]
    assert list(samples(two.read_text())) == ["two"]
    assert values(one, "one")["taskrunner_runs_total"] == 1
    assert values(one, "one")["taskrunner_refusals_total"] == 1
    assert values(two, "two")["taskrunner_runs_total"] == 0
    assert values(two, "two")["taskrunner_refusals_total"] == 1


def test_two_jobs_sharing_one_file_keep_each_others_series(tmp_path: Path):
    prom = tmp_path / "all.prom"
    record(prom, "backup", **RUN)
    record(prom, "report", **REFUSAL)
    record(prom, "backup", **REFUSAL)
    got = samples(prom.read_text())
    assert list(got) == ["backup", "report"]
    assert got["backup"]["taskrunner_runs_total"] == 1
    assert got["backup"]["taskrunner_refusals_total"] == 1
    assert got["report"]["taskrunner_refusals_total"] == 1
    assert "taskrunner_last_start_timestamp_seconds" not in got["report"]
    # Each family once, its lines together, as the text format requires.
    assert prom.read_text().count("# TYPE taskrunner_refusals_total counter") == 1


def test_parse_and_render_round_trip():
    jobs = {
        "b": {series: 1 for series in NAMES},
        'a"\\\n': {"taskrunner_last_invocation_timestamp_seconds": T0, "taskrunner_lock_held": 0},
    }
    jobs["b"]["taskrunner_last_duration_seconds"] = 0.000125
    jobs["b"]["taskrunner_last_invocation_status"] = -1
    text = render(jobs)
    assert parse(text) == jobs
    assert render(parse(text)) == text
    assert parse(b"") == {}


# Files planted by another user in a shared directory, as in test_hostile.py.
@pytest.mark.parametrize("where", ["job.prom", "job.prom.tmp", "job.prom.lock"])
@pytest.mark.parametrize("kind", list(PLANTS))
def test_a_file_planted_by_another_user_is_refused(shared: Path, kind: str, where: str):
    victim, ghost, prom = shared / "victim", shared / "ghost", shared / "job.prom"
    victim.write_text("precious\n")
    before = victim.read_bytes(), victim.stat().st_mode, victim.stat().st_mtime_ns
    if where != "job.prom":
        record(prom, **RUN)
    if where == "job.prom.lock":  # planted before the sidecar was made
        (shared / where).unlink()
    content = prom.read_bytes() if prom.exists() else None
    plant(kind, shared / where, victim, ghost)
    line = refused_record(prom, **REFUSAL)
    assert line.startswith(f"unusable: {prom}: ")
    assert (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_mtime_ns) == before
    assert not ghost.exists(), "nothing is created through a link"
    if content is not None:
        assert prom.read_bytes() == content
    made = {"job.prom", "job.prom.lock"} if content is not None else set()
    assert {p.name for p in shared.iterdir()} == {"victim", where} | made


def test_a_writer_that_waits_for_the_sidecar_reads_the_file_its_holder_left(tmp_path: Path):
    """A writer blocked on the flock of the sidecar reads the file only once it has that
    flock: the holder's update, made meanwhile, is not lost."""
    prom, go = tmp_path / "job.prom", tmp_path / "go"
    record(prom, **RUN)
    with (tmp_path / "job.prom.lock").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = subprocess.Popen(argv(prom, "job", REFUSAL, "1", str(go)))
        go.touch()
        wait_for(lambda: blocked_in_flock(waiter.pid), "the writer to wait for the flock")
        # As a writer holding the flock would: replace the file, then let go.
        text = prom.read_text().replace(
            'taskrunner_refusals_total{name="job"} 0', 'taskrunner_refusals_total{name="job"} 41'
        )
        tmp = tmp_path / "job.prom.tmp"
        tmp.write_text(text)
        tmp.rename(prom)
    assert waiter.wait(timeout=HANG) == 0
    assert values(prom)["taskrunner_refusals_total"] == 42


def test_the_sidecar_is_mode_0600_and_stays(tmp_path: Path):
    prom, lock = tmp_path / "job.prom", tmp_path / "job.prom.lock"
    for umask in (0o000, 0o022, 0o077):
        lock.unlink(missing_ok=True)
        result = subprocess.run(argv(prom, "job", RUN), umask=umask, timeout=HANG)
        assert result.returncode == 0
        st = lock.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o600, os.geteuid(), 1)
        assert st.st_size == 0
        record(prom, **REFUSAL)
        assert lock.stat().st_ino == st.st_ino, "never replaced, so never removed"


def test_a_flock_on_the_file_itself_holds_no_update_up(tmp_path: Path):
    """Any reader of the file can flock it; updates wait only for the sidecar's flock."""
    prom = tmp_path / "job.prom"
    record(prom, **RUN)
    with prom.open("rb") as reader:
        fcntl.flock(reader, fcntl.LOCK_EX)
        record(prom, **REFUSAL)
        record(prom, **REFUSAL)
    assert values(prom)["taskrunner_refusals_total"] == 2


@pytest.fixture
def public():
    """A directory in /tmp that others may read, as node_exporter's textfile directory."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    d = Path(tempfile.mkdtemp(prefix="taskrunner-public-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_another_user_flocking_the_file_holds_no_update_up(public: Path, procs):
    """nobody can read the 0644 file, and so flock it; the update goes ahead at once (the
    patience for a flock is 30 s: a run that waited for nobody's would outlast the sleep)."""
    prom = public / "job.prom"
    record(prom, **RUN)
    holder = subprocess.Popen(
        [*AS_NOBODY, "flock", "-x", str(prom), "sleep", "40"], start_new_session=True, text=True
    )
    procs.append(holder)
    wait_for(lambda: holder.poll() is None and flocked(prom), "nobody to flock the file")
    record(prom, **REFUSAL)
    assert holder.poll() is None, "still holding the flock when the update was done"
    assert values(prom)["taskrunner_refusals_total"] == 1
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("kind", "why"),
    [("symlink", "is a symbolic link"), ("dangling symlink", "is a symbolic link"),
     ("fifo", "is a FIFO"), ("directory", "is a directory"), ("hard link", "has 2 hard links")],
)  # fmt: skip
def test_an_unusable_sidecar_is_refused_and_left_alone(tmp_path: Path, kind: str, why: str):
    prom, lock = tmp_path / "job.prom", tmp_path / "job.prom.lock"
    target, ghost = tmp_path / "target", tmp_path / "ghost"
    record(prom, **RUN)
    lock.unlink()
    content = prom.read_bytes()
    target.write_text("precious\n")
    before = target.read_text(), target.stat().st_mtime_ns
    put(kind, lock, target, ghost)
    line = refused_record(prom, **REFUSAL)
    assert line == f"unusable: {prom}: job.prom.lock {why}"
    assert prom.read_bytes() == content
    assert (target.read_text(), target.stat().st_mtime_ns) == before
    assert not ghost.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.prom", "job.prom.lock", "target"]


def test_a_name_too_long_for_its_sidecar_gets_a_shortened_one(tmp_path: Path):
    prom = tmp_path / ("m" * 246 + ".prom")  # room for .tmp, not for .lock
    record(prom, **REFUSAL)
    record(prom, **REFUSAL)
    assert values(prom)["taskrunner_refusals_total"] == 2
    (lock,) = (p for p in tmp_path.iterdir() if p != prom)
    assert lock.name.startswith("m" * 200) and lock.name.endswith(".lock")
    assert len(lock.name) < 255
