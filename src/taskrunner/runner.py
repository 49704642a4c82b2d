"""One run: take the lock or refuse and count, run the command, release.

Exit statuses (see the README's table): the command's own, 71 for a lock or counter that
cannot be used, 75 busy, 76 busy and reported as stuck, 124 time limit, 126/127 cannot run.
"""

from __future__ import annotations

import os
import time

from taskrunner.errors import CannotRun, Interrupted, LockBusy, LockUnusable, Unusable
from taskrunner.fsutil import reason
from taskrunner.holder import Holder, format_age
from taskrunner.process import Child, has_terminal
from taskrunner.report import DEBUG, Reporter
from taskrunner.signals import SignalWatch, signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from taskrunner.backend import LockBackend
    from taskrunner.counter import Counter

# How long processes the command started get to let go of the lock after it ends: enough for
# those dying with it (a signal to its group reaches them a moment after it), not more.
_GRACE = 1.0
UNUSABLE = 71
BUSY = 75
STUCK = 76


class Job:
    """What to run and how, as plain values (the command line fills it in)."""

    def __init__(
        self,
        lockfile: str,
        argv: list[str],
        *,
        shell: bool,
        name: str,
        threshold: int = 0,
        counter_file: str | None = None,
        cumulative: bool = False,
        wait: float = 0.0,
        timeout: float = 0.0,
        kill_after: float = 10.0,
    ) -> None:
        self.lockfile = lockfile
        self.argv = argv
        """``[CMD]`` for a shell command, else the program and its arguments."""
        self.shell = shell
        self.name = name
        self.threshold = threshold
        self.counter_file = counter_file if threshold > 0 else None
        self.cumulative = cumulative
        self.wait = wait
        self.timeout = timeout
        self.kill_after = kill_after

    @property
    def command_text(self) -> str:
        """The command as a person would type it."""
        return self.argv[0] if self.shell else " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    safe = "-_./=:,+@%^"
    if arg and all(c.isalnum() or c in safe for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


class Result:
    """What a run came to."""

    __slots__ = ("status", "terminal_signal")

    def __init__(self, status: int, terminal_signal: int | None = None) -> None:
        #: taskrunner's exit status.
        self.status = status
        #: The terminal's Ctrl-C (SIGINT) or Ctrl-\\ (SIGQUIT) that ended the command, if one
        #: did: a command-line caller should then die of it too, so that a calling shell
        #: script stops as it would had it run the command itself.
        self.terminal_signal = terminal_signal


def run(job: Job, lock: LockBackend, reporter: Reporter) -> Result:
    """Run ``job`` under ``lock``."""
    if not hasattr(signal, "sigtimedwait"):
        reporter.error(
            "unsupported",
            f"{job.name}: not run: this system lacks sigtimedwait(2), which taskrunner needs "
            "to watch the command (Linux and FreeBSD have it; macOS does not)",
        )
        return Result(UNUSABLE)
    watch = SignalWatch()
    watch.install()
    counter = None
    if job.counter_file:
        from taskrunner.counter import Counter

        counter = Counter(job.counter_file, watch)
    try:
        try:
            try:
                where = os.path.abspath(job.lockfile)
            except OSError as exc:  # a relative path, and the current directory is gone
                raise LockUnusable(job.lockfile, reason(exc)) from None
            _acquire(job, where, lock, counter, watch, reporter)
        except LockBusy as busy:
            return Result(_refuse(job, lock, busy, counter, reporter))
        return _execute(job, where, lock, watch, reporter)
    except Unusable as exc:
        reporter.error("unusable", f"{job.name}: not run: {exc.path}: {exc.reason}")
        return Result(UNUSABLE)
    except CannotRun as exc:
        reporter.error("cannot-run", f"{job.name}: {exc.program}: {exc.reason}")
        return Result(exc.status)
    except Interrupted as exc:
        reporter.info("interrupted", f"{job.name}: not run: signal {exc.signum} arrived first")
        # Ctrl-C on a terminal while waiting for the lock ends the job, calling script too.
        from_terminal = exc.signum in (signal.SIGINT, signal.SIGQUIT) and has_terminal()
        return Result(128 + exc.signum, exc.signum if from_terminal else None)
    finally:
        try:
            lock.close()
        except Unusable as exc:
            reporter.warning("release", f"{exc.path}: {exc.reason}")
        if counter is not None:
            counter.close()
        watch.restore()


def _acquire(
    job: Job,
    where: str,
    lock: LockBackend,
    counter: Counter | None,
    watch: SignalWatch,
    reporter: Reporter,
) -> None:
    holder = Holder.current(job.command_text, where)
    deadline = time.monotonic() + job.wait

    def attempt() -> None:
        lock.try_acquire(holder)

    if counter is not None and job.cumulative:
        counter.check()
    while True:
        watch.check()
        try:
            if counter is not None and not job.cumulative:
                counter.reset_around(attempt)
            else:
                attempt()
            if lock.caveat:
                reporter.info("caveat", f"{job.name}: {lock.caveat}")
            return
        except LockBusy as busy:
            if busy.manual or time.monotonic() >= deadline:
                raise
            if not lock.wait_for_change(deadline, watch):
                raise
        finally:
            dead = lock.recovered
            if dead is not None:
                lock.recovered = None
                _report_takeover(job, lock, dead, reporter)


def _report_takeover(job: Job, lock: LockBackend, dead: Holder, reporter: Reporter) -> None:
    fields: dict[str, object] = {"holder_pid": dead.pid, "holder_host": dead.host}
    if dead.ended is not None:
        # Its run ended normally and said so; what the command left behind is gone now.
        reporter.info(
            "stale",
            f"{job.name}: removed {lock.description}, which processes left by the command "
            f"of {dead.describe()} held after it ended; they are gone",
            **fields,
        )
        return
    reporter.warning(
        "stale",
        f"{job.name}: removed the stale lock {lock.description} of "
        f"{dead.describe(f'started {dead.age()} ago')}, which is gone",
        **fields,
    )


def _refuse(
    job: Job, lock: LockBackend, busy: LockBusy, counter: Counter | None, reporter: Reporter
) -> int:
    if busy.holder is not None:
        held = f"held by {busy.holder.describe(f'for {busy.holder.age()}')}"
    else:
        since = "" if busy.since is None else f" for {format_age(time.time() - busy.since)}"
        held = f"held by hand{since} (a file taskrunner did not write)"
    fields: dict[str, object] = {"lockfile": lock.description}
    if busy.holder is not None:
        fields.update(holder_pid=busy.holder.pid, holder_host=busy.holder.host)
    if counter is None:
        reporter.warning("busy", f"{job.name}: not run: {lock.description} is {held}", **fields)
        return BUSY
    count, fired = counter.increment(job.threshold)
    if counter.garbage is not None:
        reporter.warning(
            "counter", f"{counter.path}: held {counter.garbage[:20]!r}, not a count; read as 0"
        )
    in_a_row = "" if job.cumulative else " in a row"
    if fired:
        reporter.error(
            "stuck",
            f"{job.name} looks stuck: {lock.description} is {held}; refused {count} times"
            f"{in_a_row} (threshold {job.threshold})",
            count=count,
            **fields,
        )
        return STUCK
    reporter.info(
        "busy",
        f"{job.name}: not run: {lock.description} is {held}; refused {count} times{in_a_row} "
        f"(threshold {job.threshold})",
        count=count,
        **fields,
    )
    return BUSY


def _execute(
    job: Job, where: str, lock: LockBackend, watch: SignalWatch, reporter: Reporter
) -> Result:
    env = dict(os.environb)  # bytes: no decoding and encoding back of every variable
    env[b"TASKRUNNER_LOCKFILE"] = os.fsencode(where)
    env[b"TASKRUNNER_NAME"] = os.fsencode(job.name)
    child = Child(
        ["sh", "-c", job.argv[0]] if job.shell else job.argv,
        env,
        path="/bin/sh" if job.shell else None,
        pass_fds=lock.inheritable_fds(),
        ignored=frozenset(watch.ignored),
    )
    child.block()
    try:
        watch.check()  # whatever came before the block; what comes after waits for the child
    except Interrupted:
        child.unblock()
        raise
    started = time.monotonic()
    child.start()
    lock.note_command(child.pid)
    if reporter.wants(DEBUG):
        reporter.debug("start", f"started {job.command_text!r} as pid {child.pid}")
    outcome = child.wait(job.timeout, job.kill_after, watch.pending)
    took = f"{time.monotonic() - started:.3f}s"
    if outcome.timed_out:
        reporter.error(
            "timeout",
            f"{job.name}: stopped after its time limit of {job.timeout:g}s "
            f"(status {outcome.status})",
            status=outcome.status,
        )
    elif outcome.signal is not None:
        reporter.info("finished", f"{job.name}: killed by signal {outcome.signal} after {took}")
    else:
        reporter.info("finished", f"{job.name}: exited with status {outcome.status} after {took}")
    try:
        if not lock.release(_GRACE):
            reporter.warning(
                "left-holding",
                f"{job.name}: the command ended but processes it started still hold "
                f"{lock.description}; it stays held until they end",
            )
    except Unusable as exc:
        reporter.warning("release", f"{exc.path}: {exc.reason}")
    interrupted = outcome.from_terminal and outcome.signal in (signal.SIGINT, signal.SIGQUIT)
    return Result(outcome.exit_status, outcome.signal if interrupted else None)
