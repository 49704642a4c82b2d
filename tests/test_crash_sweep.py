"""A crash, or an error, at every system call taskrunner makes on its lock and counter.

Each scenario is first traced as it runs normally, to find the system calls made once the
lock's directory is first opened (what Python does to start is not taskrunner's). Then, for
each such call in turn, the run is repeated with strace killing the runner with SIGKILL at
that call (``inject=SYSCALL:signal=SIGKILL:when=N``), or making the call fail with an errno.
After every crash or error: the counter holds the old value or the new one; the next run
neither overlaps a command still running nor stays blocked once it has ended; and once that
run is done no temp file remains. A failed call gives the documented status with one line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taskrunner.counter import parse

from conftest import HANG, TASKRUNNER, finish, hold, leave_stale, overlaps, probe, run, wait_for

pytestmark = [
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace"),
    pytest.mark.sweep,
]

KILLED = ["openat", "newfstatat", "close", "flock", "pread64", "pwrite64", "ftruncate",
          "fdatasync", "fsync", "linkat", "unlinkat", "renameat", "clone3", "clone", "wait4",
          "rt_sigtimedwait"]  # fmt: skip
FAILED = {
    "ENOSPC": ["openat", "pwrite64", "ftruncate", "fdatasync", "fsync", "linkat", "renameat"],
    # Not close: an injected error skips the call and leaves the descriptor open, which no
    # kernel does (Linux frees it whatever close returns).
    "EIO": ["pread64", "pwrite64", "fdatasync", "fsync", "linkat", "renameat", "newfstatat"],
    "EROFS": ["openat", "linkat", "unlinkat", "renameat", "ftruncate", "pwrite64"],
    "EACCES": ["openat", "linkat", "unlinkat", "renameat"],
    "EINTR": ["openat", "flock", "pwrite64", "fdatasync", "fsync", "wait4", "rt_sigtimedwait"],
    "EMFILE": ["openat"],
}
# The first thing taskrunner does on the lock's or counter's path: open the root to walk down.
MARKER = 'openat(AT_FDCWD, "/", O_RDONLY|O_CLOEXEC|O_DIRECTORY)'
# Scenario: the counter before, the values it may hold after the run, the status of a run
# that goes through.
SCENARIOS = {
    "take": (5, {5, 0}, 0),  # a free lock: taken, count reset
    "refuse": (5, {5, 6}, 75),  # a held lock: refused, counted
    "report": (9, {9, 0}, 76),  # a held lock, the count past the threshold: reported, reset
    "stale": (5, {5, 0}, 0),  # a dead holder's lock: removed, taken, count reset
}


class Scene:
    """One scenario's files and processes."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / "locks"
        self.dir.mkdir(parents=True)
        self.lock, self.counter = self.dir / "job.lock", self.dir / "count"
        self.log, self.go, self.go_holder = root / "log", root / "go", root / "go-holder"
        self.counter.write_text(f"{SCENARIOS[name][0]}\n")
        self.holder: subprocess.Popen[str] | None = None
        if name in ("refuse", "report"):
            self.holder = hold(self.lock, self.go_holder)
        elif name == "stale":
            leave_stale(self.lock)

    def args(self, tag: str, go: Path | None = None) -> list[str]:
        return ["-l", str(self.lock), "-t", "9", "-f", str(self.counter), "-c",
                probe(self.log, go, tag)]  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def traced(strace: list[str], scene: Scene) -> subprocess.Popen[str]:
    return start_raw([*strace, *TASKRUNNER, *scene.args("first", scene.go)])


def start_raw(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def left_in_session(sid: int) -> bool:
    """Whether a live process is in session ``sid``. A traced run is started as a session of
    its own (strace leads it): once strace and the run are gone, what is left there is the
    command the run spawned, in a process group of its own but still in that session."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            return True
    return False


def calls_to_sweep(tmp_path: Path, name: str, syscalls: list[str]) -> list[tuple[str, int]]:
    """(syscall, N) for each call taskrunner makes on its paths in scenario ``name``."""
    scene = Scene(tmp_path / "reference", name)
    out = tmp_path / "reference.trace"
    traced_calls = ",".join(sorted({"openat", *syscalls}))  # openat: for the marker
    proc = traced(["strace", "-qq", "-o", str(out), "-e", f"trace={traced_calls}"], scene)
    settle(scene, proc)
    lines = out.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    counts: dict[str, int] = {}
    points = []
    for i, line in enumerate(lines):
        match = re.match(r"(\w+)\(", line)
        if not match:
            continue
        call = match.group(1)
        counts[call] = counts.get(call, 0) + 1
        if i >= start and call in syscalls:
            points.append((call, counts[call]))
    return points


def settle(scene: Scene, proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Let a traced run and everything it left end; its status and stderr."""
    wait_for(lambda: proc.poll() is not None or "start first" in scene.log_text(), "the run")
    scene.go.touch()
    _, err = proc.communicate(timeout=HANG)
    if "start first" in scene.log_text():
        wait_for(lambda: "end first" in scene.log_text(), "the first command to end")
    if scene.holder is not None:
        scene.go_holder.touch()
        finish(scene.holder)
        scene.holder = None
    return proc.returncode, err


def check_point(tmp_path: Path, name: str, call: str, n: int, fault: str) -> list[str]:
    """Run scenario ``name`` with ``fault`` at the ``n``-th ``call``; what went wrong."""
    scene = Scene(tmp_path / f"{name}-{call}-{n}-{fault}", name)
    _, allowed, goes_through = SCENARIOS[name]
    action = "signal=SIGKILL" if fault == "kill" else f"error={fault}"
    strace = ["strace", "-qq", "-o", "/dev/null", "-e", f"trace={call}",
              "-e", f"inject={call}:{action}:when={n}"]  # fmt: skip
    proc = traced(strace, scene)
    wait_for(lambda: proc.poll() is not None or "start first" in scene.log_text(), "the run")
    problems = []
    count = parse(scene.counter.read_bytes()) if scene.counter.exists() else 0
    if count not in allowed:
        problems.append(f"count {count!r} after the run, not one of {sorted(allowed)}")
    # The next run: refused while the first command or the holder still runs, else it runs.
    # A command spawned just before the kill logs its start a moment later, and holds the
    # lock meanwhile: where the run left one (it outlives the run, in the run's session),
    # wait for its start line. Where it left none, no command was spawned: no wait.
    wait_for(
        lambda: "start first" in scene.log_text() or not left_in_session(proc.pid),
        "the command the run left to log its start",
    )
    busy = "start first" in scene.log_text() or scene.holder is not None
    second = run(*scene.args("second"))
    if second.returncode != (75 if busy else 0) and not (busy and second.returncode == 76):
        problems.append(f"next run exited {second.returncode}: {second.stderr.strip()}")
    status, err = settle(scene, proc)
    if fault != "kill":
        if status not in (goes_through, 71):
            problems.append(f"status {status}, not {goes_through} or 71: {err.strip()}")
        # One line says what failed (a stale lock removed on the way gets its own warning).
        if "Traceback" in err or (status == 71 and err.count("taskrunner: error: ") != 1):
            problems.append(f"not one clear line: {err.strip()!r}")
    third = run(*scene.args("third"))
    if third.returncode != 0:
        problems.append(f"the run after stays blocked: {third.returncode} {third.stderr.strip()}")
    if overlaps(scene.log):
        problems.append(f"overlap: {overlaps(scene.log)}")
    left = sorted(p.name for p in scene.dir.iterdir() if p.name != "count")
    if left:
        problems.append(f"left behind: {left}")
    return [f"{name}: {fault} at {call} #{n}: {p}" for p in problems]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_at_every_call(tmp_path: Path, name: str):
    points = calls_to_sweep(tmp_path, name, KILLED)
    assert len(points) > 20, points
    problems = [p for call, n in points for p in check_point(tmp_path, name, call, n, "kill")]
    assert problems == []


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("error", list(FAILED))
def test_error_at_every_call(tmp_path: Path, name: str, error: str):
    points = calls_to_sweep(tmp_path, name, FAILED[error])
    problems = [p for call, n in points for p in check_point(tmp_path, name, call, n, error)]
    assert problems == []


def test_the_sweep_sees_a_crash(tmp_path: Path):
    """The negative control: with the counter written in place (truncate, then write), a
    kill between the two leaves an empty counter, and the sweep must say so."""
    counter = tmp_path / "count"
    counter.write_text("5\n")
    broken = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "os.ftruncate(fd, 0)\n"
        "os.pwrite(fd, b'6\\n', 0)\n"
    )
    strace = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
              "-e", "inject=pwrite64:signal=SIGKILL:when=1"]  # fmt: skip
    subprocess.run([*strace, sys.executable, "-c", broken, str(counter)], timeout=HANG)
    assert counter.read_bytes() == b"", "the in-place write was caught half done"
    assert parse(counter.read_bytes()) not in SCENARIOS["refuse"][1], "and the check sees it"
