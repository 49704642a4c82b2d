"""Files planted by another user where root's lock and counter go, in a shared directory.

The planting is done as nobody (setpriv), with the kernel's fs.protected_* protections off:
the worst case, as on machines that do not turn them on. For each plant: the target is left
untouched, nothing is created through a link, nothing hangs, one line names the reason, and
taskrunner exits 71 without running the command.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import NOBODY, PLANTS, as_nobody, finish, hold, plant, run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to plant files as another user",
)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mode, st.st_uid, st.st_mtime_ns


@pytest.mark.parametrize("where", ["lock", "counter"])
@pytest.mark.parametrize("kind", list(PLANTS))
def test_a_planted_file_is_refused_and_left_alone(
    shared: Path, tmp_path: Path, kind: str, where: str
):
    victim, ghost, ran = shared / "victim", shared / "ghost", tmp_path / "ran"
    victim.write_text("precious\n")
    before = snapshot(victim)
    lock, counter = shared / "job.lock", shared / "count"
    plant(kind, lock if where == "lock" else counter, victim, ghost)
    result = run("-l", str(lock), "-t", "3", "-f", str(counter), "-c", f"touch {ran}")
    assert result.returncode == 71, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("taskrunner: error: ")
    assert str(lock if where == "lock" else counter) in line
    assert not ran.exists()
    assert snapshot(victim) == before
    assert not ghost.exists(), "nothing is created through a link"
    leftovers = {p.name for p in shared.iterdir()} - {"victim", "job.lock", "count"}
    assert leftovers == set()


def test_a_planted_counter_temp_file_is_refused(shared: Path, tmp_path: Path):
    """count.tmp is the counter's one temp name: a symlink there must not be written through."""
    victim, lock, counter = shared / "victim", shared / "job.lock", shared / "count"
    victim.write_text("precious\n")
    before = snapshot(victim)
    counter.write_text("2\n")
    lock.write_text("paused\n")  # root's manual hold: the run is refused, and counts
    as_nobody(f"ln -s {victim} {shared}/count.tmp")
    result = run("-l", str(lock), "-t", "9", "-f", str(counter), "-c", "true")
    assert result.returncode == 71
    assert "count.tmp is a symbolic link" in result.stderr
    assert snapshot(victim) == before
    assert counter.read_text() == "2\n"


@pytest.mark.parametrize("where", ["lock", "counter"])
def test_a_directory_another_user_controls_is_refused(shared: Path, tmp_path: Path, where: str):
    theirs, ran = shared / "theirs", tmp_path / "ran"
    as_nobody(f"mkdir -m 755 {theirs}")
    lock = theirs / "job.lock" if where == "lock" else shared / "job.lock"
    counter = theirs / "count" if where == "counter" else shared / "count"
    result = run("-l", str(lock), "-t", "3", "-f", str(counter), "-c", f"touch {ran}")
    assert result.returncode == 71
    assert f"directory {theirs} belongs to uid {NOBODY}" in result.stderr
    assert not ran.exists()
    assert list(theirs.iterdir()) == []


def test_a_directory_anyone_may_write_that_is_not_sticky_is_refused(shared: Path, tmp_path: Path):
    open_dir = shared / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    result = run("-l", str(open_dir / "job.lock"), "-c", f"touch {tmp_path / 'ran'}")
    assert result.returncode == 71
    assert "may be written by others and is not sticky" in result.stderr
    assert not (tmp_path / "ran").exists()
    assert list(open_dir.iterdir()) == []


def test_root_in_a_sticky_shared_directory_works(shared: Path, tmp_path: Path):
    lock, counter = shared / "job.lock", shared / "count"
    assert run("-l", str(lock), "-t", "3", "-f", str(counter), "-c", "true").returncode == 0
    assert list(shared.iterdir()) == []


def test_a_hard_link_to_another_jobs_live_lock_is_refused(shared: Path, tmp_path: Path, procs):
    """Linking a held lock of another job to this job's lock path must not make this job
    refuse and count as if busy (and report it stuck): it is not this job's lock."""
    other, lock = shared / "other.lock", shared / "job.lock"
    holder = hold(other, tmp_path / "go")
    procs.append(holder)
    as_nobody(f"ln {other} {lock}")
    result = run("-l", str(lock), "-t", "1", "-f", str(shared / "count"), "-c", "true")
    assert result.returncode == 71
    assert "has 2 hard links" in result.stderr
    (tmp_path / "go").touch()
    assert finish(holder)[0] == 0


def test_a_log_file_through_another_users_symlink_is_not_written(shared: Path, tmp_path: Path):
    secret = shared / "secret"
    secret.mkdir(mode=0o700)
    as_nobody(f"ln -s {secret} {shared}/logs")
    result = run("-l", str(shared / "job.lock"), "--log-file", str(shared / "logs" / "job.log"),
                 "-c", "exit 3")  # fmt: skip
    assert result.returncode == 3
    assert f"symlink, logs, that belongs to uid {NOBODY}" in result.stderr
    assert list(secret.iterdir()) == []


def test_a_hard_link_to_roots_symlink_is_not_followed(shared: Path, tmp_path: Path):
    """With fs.protected_hardlinks off, another user can link root's symlink (to a directory
    of root's) into /tmp: it belongs to root, but root did not put it there."""
    secret = shared / "secret"
    secret.mkdir(mode=0o700)
    (secret / "count").write_text("precious\n")
    rootlink = shared / "rootlink"
    rootlink.symlink_to(secret)
    as_nobody(f"ln {rootlink} {shared}/app")
    result = run("-l", str(shared / "app" / "job.lock"), "-t", "3",
                 "-f", str(shared / "app" / "count"), "-c", "true")  # fmt: skip
    assert result.returncode == 71
    assert "symlink, app, with 2 links" in result.stderr
    assert sorted(p.name for p in secret.iterdir()) == ["count"]
    assert (secret / "count").read_text() == "precious\n"
