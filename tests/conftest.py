"""Shared fixtures and helpers: every test about locks runs real taskrunner processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

_BIN = Path(sys.executable).parent / "taskrunner"
#: The installed command; ``python -m taskrunner`` where no script was installed.
TASKRUNNER = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "taskrunner"]
#: A guard against hangs, not a speed claim: every run here takes well under a second.
HANG = 60


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run taskrunner to completion, capturing its output. Like cron, in a session of its
    own, without a controlling terminal."""
    kw.setdefault("start_new_session", True)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*TASKRUNNER, *args], capture_output=True, text=True, timeout=HANG, **kw
    )


def start(*args: str, **kw: object) -> subprocess.Popen[str]:
    """Start taskrunner in the background (in a session of its own, as :func:`run`). Its
    output goes to files, not pipes, so that a command that outlives a killed runner does not
    keep the test waiting for the end of a pipe; :func:`finish` reads them."""
    kw.setdefault("start_new_session", True)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen([*TASKRUNNER, *args], stdout=out, stderr=err, **kw)  # type: ignore[call-overload]
    proc.outputs = (out, err)
    return proc  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it never does."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for a taskrunner from :func:`start`; its status, stdout and stderr."""
    status = proc.wait(timeout=HANG)
    texts = []
    for f in proc.outputs:  # type: ignore[attr-defined]
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
    return status, texts[0], texts[1]


def until(go: Path) -> str:
    """A shell command that waits until ``go`` exists."""
    return f"while [ ! -e {go} ]; do sleep 0.01; done"


def hold(lock: Path, go: Path, *options: str) -> subprocess.Popen[str]:
    """Start a run that holds ``lock`` until ``go`` exists; return once the lock is taken."""
    proc = start("-l", str(lock), *options, "--", "sh", "-c", until(go))
    wait_for(lock.exists, "the holder to take the lock")
    return proc


def settled(lock: Path, go: Path) -> subprocess.Popen[str]:
    """A run holding ``lock`` until ``go`` exists, once its record names its command."""
    proc = hold(lock, go)
    wait_for(lambda: b"\ncommand_pid " in lock.read_bytes(), "the command's pid in the record")
    return proc


def leave_stale(lock: Path) -> int:
    """Make ``lock`` stale as kill -9 of a run and its command does; the dead run's pid."""
    proc = start("-l", str(lock), "--", "sleep", "60")
    wait_for(lambda: children(proc.pid), "the command")
    (command,) = children(proc.pid)
    proc.kill()
    kill_group(command)
    proc.wait()
    wait_for(lambda: not alive(command), "the command to die")
    assert lock.exists(), "kill -9 leaves the lock file behind"
    return proc.pid


def probe(log: Path, go: Path | None = None, tag: str = "$$") -> str:
    """A shell command that appends ``start TAG`` and ``end TAG`` to ``log`` (O_APPEND:
    each line lands whole), waiting between the two until ``go`` exists."""
    wait = f"{until(go)}; " if go is not None else ""
    return f'echo "start {tag}" >> "{log}"; {wait}echo "end {tag}" >> "{log}"'


def overlaps(log: Path) -> list[str]:
    """Where runs recorded by :func:`probe` overlapped: a start inside another run."""
    problems, running = [], None
    for line in log.read_text().splitlines() if log.exists() else []:
        what, _, tag = line.partition(" ")
        if what == "start":
            if running is not None:
                problems.append(f"{tag} started while {running} ran")
            running = tag
        elif what == "end":
            if running != tag:
                problems.append(f"{tag} ended while {running} ran")
            running = None
    return problems


def starts(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("start "))


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def flocked(path: Path) -> bool:
    """Whether some other open file holds a flock of ``path``."""
    with path.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def blocked_in_flock(pid: int) -> bool:
    """Whether ``pid`` is waiting for a flock."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "locks_lock_inode_wait"
    except OSError:
        return False


def kill_group(pgid: int) -> None:
    """SIGKILL to process group ``pgid`` and to process ``pgid`` itself: a command just
    started may not have made its own group yet."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


#: nobody's uid and gid: the other user that tests plant files as.
NOBODY = 65534
#: The start of a command line that runs the rest as nobody, without any groups.
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
#: What another user can plant at ``{path}``, as shell commands for :func:`as_nobody`:
#: ``{victim}`` is a file of root's, ``{ghost}`` a path where nothing is.
PLANTS = {
    "symlink to root's file": "ln -s {victim} {path}",
    "dangling symlink": "ln -s {ghost} {path}",
    "fifo": "mkfifo {path}",
    "directory": "mkdir {path}",
    "nobody's file": "echo 1 > {path}",
    "hard link to root's file": "ln {victim} {path}",
}
#: The kernel's protections against such plants in sticky directories (fs.protected_*).
PROTECTIONS = ("protected_symlinks", "protected_hardlinks", "protected_fifos", "protected_regular")


def as_nobody(script: str) -> None:
    """Run the shell ``script`` as nobody; it must succeed."""
    subprocess.run([*AS_NOBODY, "sh", "-c", script], check=True, timeout=HANG)


def plant(kind: str, path: Path, victim: Path, ghost: Path) -> None:
    """As nobody, put a ``kind`` of thing (one of :data:`PLANTS`) at ``path``."""
    as_nobody(PLANTS[kind].format(victim=victim, ghost=ghost, path=path))


def nobodys_file(path: Path) -> None:
    """An empty file at ``path`` that belongs to nobody: made by root and given away, so
    that nobody need not reach its directory."""
    path.write_text("")
    os.chown(path, NOBODY, NOBODY)


@pytest.fixture
def shared() -> object:
    """A world-writable sticky directory like /tmp, for nobody to plant files in, with the
    fs.protected_* sysctls off for the test (restored after): the worst case, as on
    machines that do not turn them on."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to plant files as another user")
    saved = {}
    try:
        for name in PROTECTIONS:
            path = Path("/proc/sys/fs") / name
            try:
                saved[path] = path.read_text()
                path.write_text("0\n")
            except OSError:
                pytest.skip(f"cannot turn {name} off here")
        d = Path(tempfile.mkdtemp(prefix="taskrunner-hostile-", dir="/tmp"))
        d.chmod(0o1777)
        yield d
        shutil.rmtree(d)
    finally:
        for path, value in saved.items():
            path.write_text(value)


@pytest.fixture
def lockdir(tmp_path: Path) -> Path:
    """An empty directory for lock files, separate from logs and markers."""
    d = tmp_path / "locks"
    d.mkdir()
    return d


@pytest.fixture
def procs() -> object:
    """Processes a test started; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        for command in children(p.pid):
            kill_group(command)  # without a terminal, the command leads a group of its own
        if p.poll() is None:
            p.kill()
            p.wait()
