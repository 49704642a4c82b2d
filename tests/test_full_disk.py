"""Real full and read-only file systems: a tiny tmpfs in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import HANG, TASKRUNNER

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a private tmpfs",
)
TR = " ".join(TASKRUNNER)


def in_namespace(d: Path, setup: str, command: str) -> tuple[int, str, list[str], dict[str, str]]:
    """Mount a 64 KiB tmpfs on ``d`` in a mount namespace of its own, run ``setup`` there,
    then taskrunner's ``command``; its status, stderr, what is left in ``d``, and the content
    of the small files there."""
    script = f"""
set -e
mount -t tmpfs -o size=64k,nr_inodes=64 tmpfs {d}
cd {d}
{setup}
set +e
{command} 2> {d}.stderr
echo $? > {d}.status
ls -A {d} > {d}.left
for f in C held.lock; do [ -f {d}/$f ] && head -c 100 {d}/$f > {d}.$f || true; done
"""
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                   check=True, timeout=HANG)  # fmt: skip
    files = {
        f: Path(f"{d}.{f}").read_text() for f in ("C", "held.lock") if Path(f"{d}.{f}").exists()
    }
    return (int(Path(f"{d}.status").read_text()), Path(f"{d}.stderr").read_text(),
            Path(f"{d}.left").read_text().split(), files)  # fmt: skip


FILL = "dd if=/dev/zero of=fill bs=4k 2>/dev/null || true"


def test_a_refusal_on_a_full_disk_keeps_the_old_count(tmp_path: Path):
    d = tmp_path / "mnt"
    d.mkdir()
    status, err, left, files = in_namespace(
        d,
        f"echo paused > held.lock; echo 5 > C; {FILL}",
        f"{TR} -l {d}/held.lock -t 9 -f {d}/C -c true",
    )
    assert status == 71
    assert "no space left on device" in err
    assert err.count("\n") == 1
    assert files["C"] == "5\n"
    assert sorted(left) == ["C", "fill", "held.lock"], "no temp file is left"


def test_a_lock_that_cannot_be_made_on_a_full_disk_runs_nothing(tmp_path: Path):
    d = tmp_path / "mnt"
    d.mkdir()
    status, err, left, _ = in_namespace(d, FILL, f"{TR} -l {d}/L -c 'touch {tmp_path}/ran'")
    assert status == 71
    assert "no space left on device" in err
    assert not (tmp_path / "ran").exists()
    assert left == ["fill"]


def test_a_read_only_file_system(tmp_path: Path):
    d = tmp_path / "mnt"
    d.mkdir()
    ro = f"echo paused > held.lock; echo 5 > C; mount -o remount,ro {d}"
    status, err, left, files = in_namespace(
        d, ro, f"{TR} -l {d}/L -t 9 -f {d}/C -c 'touch {tmp_path}/ran'"
    )
    assert (status, err.count("\n")) == (71, 1)
    assert "read-only file system" in err
    assert not (tmp_path / "ran").exists()
    status, err, left, files = in_namespace(d, ro, f"{TR} -l {d}/held.lock -t 9 -f {d}/C -c true")
    assert (status, err.count("\n")) == (71, 1)
    assert "read-only file system" in err
    assert files["C"] == "5\n"
    assert sorted(left) == ["C", "held.lock"]


def test_taking_the_lock_on_a_full_disk_fails_and_keeps_the_count(tmp_path: Path):
    """Taking the lock on a full disk fails (its record cannot be written): the count of
    refusals before stays as it was, since the job did not run."""
    d = tmp_path / "mnt"
    d.mkdir()
    status, err, left, files = in_namespace(
        d, f"echo 3 > C; {FILL}", f"{TR} -l {d}/L -t 9 -f {d}/C -c true"
    )
    assert status == 71
    assert "no space left on device" in err
    assert files["C"] == "3\n"
    assert sorted(left) == ["C", "fill"]


def test_quiet_success_with_its_output_cut_short_says_so(tmp_path: Path):
    """--quiet-success holds the output in $TMPDIR: when that fills up, the command's writes
    fail. taskrunner says so and shows what there is, whatever the command's status."""
    d, locks = tmp_path / "mnt", tmp_path / "locks"
    d.mkdir()
    locks.mkdir()
    out = tmp_path / "out"
    status, stderr, _, _ = in_namespace(
        d, "", f"TMPDIR={d} {TR} -l {locks}/job.lock --quiet-success -c 'seq 1 100000' > {out}"
    )
    assert status == 1, "seq itself fails: it could not write its output"
    assert f"job.lock: {d} is full: the command's output held there may be cut short" in stderr
    shown = out.read_text()
    assert shown.startswith("1\n2\n3\n")
    assert 0 < len(shown) < len("".join(f"{i}\n" for i in range(1, 100001)))
