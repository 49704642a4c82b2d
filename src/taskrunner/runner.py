"""One run: take the lock or refuse and count, run the command, release.

Exit statuses (see the README's table): the command's own, 71 for a lock or counter that
cannot be used, 75 busy, 76 busy and reported as stuck, 124 time limit, 126/127 cannot run.
"""

from __future__ import annotations

import os
import time

from taskrunner.errors import (
    CannotRun,
    Interrupted,
    LockBusy,
    LockUnusable,
    TaskrunnerError,
    Unusable,
)
from taskrunner.fsutil import reason
from taskrunner.holder import Holder, command_text, format_age
from taskrunner.process import Child, has_terminal
from taskrunner.report import DEBUG, Reporter
from taskrunner.signals import SignalWatch, signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

    from taskrunner.backend import LockBackend, Tally

# How long processes the command started get to let go of the lock after it ends: enough for
# those dying with it (a signal to its group reaches them a moment after it), not more.
_GRACE = 1.0
# Less free space than this where the output is held, and it may have been cut short.
_ROOM = 1 << 16
# How often a library caller's run looks for its command without a SIGCHLD (see run()).
_REAP_EVERY = 0.1
UNUSABLE = 71
BUSY = 75
STUCK = 76


def same_file(files: list[tuple[str, str | None]]) -> tuple[str, str] | None:
    """No two of taskrunner's files may be one: each would clobber the other. Given them as
    (what, path) pairs (a path None where there is none), the first that is one of the
    earlier ones, and which: (what, what it also is); None if all differ."""
    seen: dict[str, str] = {}
    for what, path in files:
        if path is not None:
            where = os.path.abspath(path)
            if where in seen:
                return what, seen[where]
            seen[where] = what
    return None


def metrics_lock(metrics_file: str | None) -> str | None:
    """The sidecar that serialises updates of ``metrics_file``: ``NAME.lock`` (for a name
    too long for that, replaced.temp_name shortens it)."""
    return None if metrics_file is None else metrics_file + ".lock"


class Job:
    """What to run and how, as plain values (the command line fills it in)."""

    def __init__(
        self,
        lockfile: str | None,
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
        stuck_after: float = 0.0,
        on_stuck: str | None = None,
        on_recover: str | None = None,
        notify_url: str | None = None,
        hook_timeout: float = 30.0,
        metrics_file: str | None = None,
        quiet_success: bool = False,
        lock_url: str | None = None,
        key: str | None = None,
    ) -> None:
        self.lockfile = lockfile
        """The lock file; None in fleet mode, where the lock is ``key`` at ``lock_url``."""
        self.lock_url = lock_url
        self.key = key
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
        self.stuck_after = stuck_after
        """Report a refusal as stuck when the hold is older than this (0: never)."""
        self.on_stuck = on_stuck
        self.on_recover = on_recover
        self.notify_url = notify_url
        self.hook_timeout = hook_timeout
        self.metrics_file = metrics_file
        self.quiet_success = quiet_success
        """Hold the command's output on disk; show it only if the command fails."""

    @property
    def command_text(self) -> str:
        """The command as a person would type it."""
        return self.argv[0] if self.shell else command_text(self.argv)


class Result:
    """What a run came to."""

    __slots__ = ("duration", "error", "held", "reported", "started", "status", "terminal_signal")

    def __init__(self, status: int, terminal_signal: int | None = None) -> None:
        #: taskrunner's exit status: the command's own, or one of the statuses the README
        #: lists (75 busy, 76 reported as stuck, 124 time limit, ...).
        self.status = status
        #: The terminal's Ctrl-C (SIGINT) or Ctrl-\\ (SIGQUIT) that ended the command, if one
        #: did: a command-line caller should then die of it too, so that a calling shell
        #: script stops as it would had it run the command itself.
        self.terminal_signal = terminal_signal
        #: When the command started (Unix time) and how long it ran, if it ran.
        self.started: float | None = None
        self.duration: float | None = None
        #: Whether the lock is still held as the run ends: by another run, after a refusal,
        #: or by processes the command left behind.
        self.held = False
        #: Whether this refusal reported the job as stuck.
        self.reported = False
        #: What went wrong when the command did not run for a reason other than a busy lock
        #: (the status is then 71, 126, 127 or 128+N): the command line has already said
        #: it; the library raises it.
        self.error: TaskrunnerError | None = None

    @property
    def ran(self) -> bool:
        """Whether the command ran (whatever it then did)."""
        return self.started is not None

    @property
    def refused(self) -> bool:
        """Whether the lock was busy, so the command did not run."""
        return self.status in (BUSY, STUCK) and self.started is None


def run(job: Job, lock: LockBackend, reporter: Reporter, *, library: bool = False) -> Result:
    """Run ``job`` under ``lock``. For a ``library`` caller, whose process goes on and may
    have threads of its own: the termination signals that came while it ran and were not
    passed on to the command are raised again once the caller's handlers are back, so that
    they act as they would have; and the command is also looked for every ``_REAP_EVERY``
    seconds, since another thread can take the SIGCHLD that says it ended."""
    if not hasattr(signal, "sigtimedwait"):
        message = (
            f"{job.name}: not run: this system lacks sigtimedwait(2), which taskrunner needs "
            "to watch the command (Linux and FreeBSD have it; macOS does not)"
        )
        reporter.error("unsupported", message)
        return _failed(UNUSABLE, TaskrunnerError(message))
    watch = SignalWatch()
    watch.install()
    try:
        result = _run(job, lock, watch, reporter, library)
        if job.metrics_file is not None:
            _record_metrics(job, job.metrics_file, result, watch, reporter)
        return result
    finally:
        watch.restore()
        if library:
            for sig in dict.fromkeys(watch.pending):
                signal.raise_signal(sig)


def _run(
    job: Job, lock: LockBackend, watch: SignalWatch, reporter: Reporter, library: bool
) -> Result:
    counter: Tally | None = None
    if job.counter_file:
        from taskrunner.counter import Counter

        counter = Counter(job.counter_file, watch)
    elif job.threshold > 0 and lock.tally is not None:
        counter = lock.tally  # fleet mode: the count lives with the lock
    try:
        try:
            try:
                where = lock.description if job.lockfile is None else os.path.abspath(job.lockfile)
            except OSError as exc:  # a relative path, and the current directory is gone
                raise LockUnusable(lock.description, reason(exc)) from None
            _acquire(job, where, lock, counter, watch, reporter)
        except LockBusy as busy:
            return _refuse(job, where, lock, busy, counter, watch, reporter)
        return _execute(job, where, lock, watch, reporter, library)
    except Unusable as exc:
        reporter.error("unusable", f"{job.name}: not run: {exc.path}: {exc.reason}")
        return _failed(UNUSABLE, exc)
    except CannotRun as exc:
        reporter.error("cannot-run", f"{job.name}: {exc.program}: {exc.reason}")
        return _failed(exc.status, exc)
    except Interrupted as exc:
        reporter.info("interrupted", f"{job.name}: not run: signal {exc.signum} arrived first")
        # Ctrl-C on a terminal while waiting for the lock ends the job, calling script too.
        from_terminal = exc.signum in (signal.SIGINT, signal.SIGQUIT) and has_terminal()
        return _failed(128 + exc.signum, exc, exc.signum if from_terminal else None)
    finally:
        try:
            lock.close()
        except Unusable as exc:
            reporter.warning("release", f"{exc.path}: {exc.reason}")
        if counter is not None:
            counter.close()


def _failed(status: int, error: TaskrunnerError, terminal_signal: int | None = None) -> Result:
    result = Result(status, terminal_signal)
    result.error = error
    return result


def _record_metrics(
    job: Job, path: str, result: Result, watch: SignalWatch, reporter: Reporter
) -> None:
    from taskrunner.metrics import Invocation, record

    invocation = Invocation(
        ended=time.time(),
        status=result.status,
        started=result.started,
        duration=result.duration,
        refused=result.refused,
        reported=result.reported,
        held=result.held,
    )
    try:
        record(path, job.name, invocation, watch)
    except Unusable as exc:
        reporter.warning("metrics", f"{job.name}: metrics not written: {exc.path}: {exc.reason}")
    except Interrupted as exc:
        reporter.warning("metrics", f"{job.name}: metrics not written: signal {exc.signum}")


def _acquire(
    job: Job,
    where: str,
    lock: LockBackend,
    counter: Tally | None,
    watch: SignalWatch,
    reporter: Reporter,
) -> None:
    holder = Holder.current(job.command_text, None if job.lockfile is None else where)
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
                _report_takeover(job, where, lock, dead, watch, reporter)


def _report_takeover(
    job: Job, where: str, lock: LockBackend, dead: Holder, watch: SignalWatch, reporter: Reporter
) -> None:
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
    message = (
        f"{job.name}: removed the stale lock {lock.description} of "
        f"{dead.describe(f'started {dead.age()} ago')}, which is gone"
    )
    reporter.warning("stale", message, **fields)
    _tell(job, where, "stale", job.on_recover, 0, dead, dead.started, message, watch, reporter)


def _seconds(value: float) -> str:
    """A duration as it was given: ``0.5s``, ``90s``, ``1h00m``."""
    return f"{value:g}s" if value < 60 else format_age(value)


def _tell(
    job: Job,
    where: str,
    kind: str,
    hook: str | None,
    count: int,
    holder: Holder | None,
    since: float | None,
    message: str,
    watch: SignalWatch,
    reporter: Reporter,
) -> None:
    """Run the hook and post to the URL the job has for this event, if any. A termination
    signal meanwhile raises :class:`Interrupted`."""
    if hook is None and job.notify_url is None:
        return
    from taskrunner.hooks import Event, deliver

    event = Event(
        kind,
        name=job.name,
        lockfile=where,
        count=count,
        holder=holder,
        since=since,
        message=message,
    )
    deliver(event, hook, job.notify_url, job.hook_timeout, reporter, watch)


def _refuse(
    job: Job,
    where: str,
    lock: LockBackend,
    busy: LockBusy,
    counter: Tally | None,
    watch: SignalWatch,
    reporter: Reporter,
) -> Result:
    if busy.holder is not None:
        held = f"held by {busy.holder.describe(f'for {busy.holder.age()}')}"
    else:
        since = "" if busy.since is None else f" for {format_age(time.time() - busy.since)}"
        held = f"held by hand{since} (a file taskrunner did not write)"
    fields: dict[str, object] = {"lockfile": lock.description}
    if busy.holder is not None:
        fields.update(holder_pid=busy.holder.pid, holder_host=busy.holder.host)
    # Stuck by age: the hold is older than --stuck-after, whatever the count says.
    aged = (
        job.stuck_after > 0
        and busy.since is not None
        and time.time() - busy.since > job.stuck_after
    )
    result = Result(BUSY)
    result.held = True
    count, fired, counted = 0, False, ""
    if counter is not None:
        count, fired = counter.increment(job.threshold)
        if counter.garbage is not None:
            reporter.warning(
                "counter", f"{counter.path}: held {counter.garbage[:20]!r}, not a count; read as 0"
            )
        in_a_row = "" if job.cumulative else " in a row"
        times = "once" if count == 1 else f"{count} times"
        counted = f"; refused {times}{in_a_row} (threshold {job.threshold})"
        fields["count"] = count
    if fired or aged:
        longer = f", longer than --stuck-after {_seconds(job.stuck_after)}" if aged else ""
        message = f"{job.name} looks stuck: {lock.description} is {held}{longer}{counted}"
        reporter.error("stuck", message, **fields)
        _tell(job, where, "stuck", job.on_stuck, count, busy.holder, busy.since, message, watch,
              reporter)  # fmt: skip
        result.status, result.reported = STUCK, True
    elif counter is None:
        reporter.warning("busy", f"{job.name}: not run: {lock.description} is {held}", **fields)
    else:
        reporter.info("busy", f"{job.name}: not run: {lock.description} is {held}{counted}",
                      **fields)  # fmt: skip
    return result


def _execute(
    job: Job, where: str, lock: LockBackend, watch: SignalWatch, reporter: Reporter,
    library: bool,
) -> Result:  # fmt: skip
    env = dict(os.environb)  # bytes: no decoding and encoding back of every variable
    if job.lockfile is not None:
        env[b"TASKRUNNER_LOCKFILE"] = os.fsencode(where)
    env[b"TASKRUNNER_NAME"] = os.fsencode(job.name)
    if lock.fencing_token is not None:
        env[b"TASKRUNNER_FENCING_TOKEN"] = b"%d" % lock.fencing_token
    output = _hold_output() if job.quiet_success else None
    try:
        return _supervise(job, env, output, lock, watch, reporter, library)
    finally:
        for f in output or ():
            f.close()


def _supervise(
    job: Job,
    env: dict[bytes, bytes],
    output: tuple[BinaryIO, BinaryIO] | None,
    lock: LockBackend,
    watch: SignalWatch,
    reporter: Reporter,
    library: bool,
) -> Result:
    child = Child(
        ["sh", "-c", job.argv[0]] if job.shell else job.argv,
        env,
        path="/bin/sh" if job.shell else None,
        pass_fds=lock.inheritable_fds(),
        ignored=frozenset(watch.ignored),
        output=None if output is None else (output[0].fileno(), output[1].fileno()),
    )
    child.block()
    try:
        watch.check()  # whatever came before the block; what comes after waits for the child
        started, wall = time.monotonic(), time.time()
        try:
            child.start()
            lock.note_command(child.pid)
            if reporter.wants(DEBUG):
                reporter.debug("start", f"started {job.command_text!r} as pid {child.pid}")
            outcome = child.wait(job.timeout, job.kill_after, watch.pending, lock.heartbeat(),
                                 reap_every=_REAP_EVERY if library else None)  # fmt: skip
        except BaseException:
            # Cut short by something of a library caller's (an exception from its own signal
            # handler): the command must not run on unwatched, holding the lock.
            child.stop()
            raise
    finally:
        child.unblock()
    result = Result(outcome.exit_status)
    result.started, result.duration = wall, time.monotonic() - started
    took = f"{result.duration:.3f}s"
    if outcome.lost:
        reporter.error(
            "lost",
            f"{job.name}: lost {lock.description} while the command ran (the session ended, "
            f"or the server stopped answering); stopped the command (status {outcome.status})",
            status=outcome.status,
        )
    elif outcome.timed_out:
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
            result.held = True
            reporter.warning(
                "left-holding",
                f"{job.name}: the command ended but processes it started still hold "
                f"{lock.description}; it stays held until they end",
            )
    except Unusable as exc:
        reporter.warning("release", f"{exc.path}: {exc.reason}")
    if output is not None:
        full = _out_of_space(output[0])
        if full:
            # The command's writes may have failed, and so may the command, for that alone.
            reporter.warning(
                "output",
                f"{job.name}: {full} is full: the command's output held there may be cut "
                "short; here is what there is",
            )
        if outcome.exit_status != 0 or full:
            _show_output(output)
    if outcome.from_terminal and outcome.signal in (signal.SIGINT, signal.SIGQUIT):
        result.terminal_signal = outcome.signal
    return result


def _hold_output() -> tuple[BinaryIO, BinaryIO]:
    """Two unnamed files, for the command's stdout and stderr, kept apart so that each is
    shown on its own stream. On disk, not in memory: the output may be of any size."""
    import tempfile

    files: list[BinaryIO] = []
    try:
        while len(files) < 2:
            files.append(tempfile.TemporaryFile())  # noqa: SIM115 (closed by the caller)
    except OSError as exc:
        for f in files:
            f.close()
        raise Unusable(tempfile.gettempdir(), f"cannot hold the output: {reason(exc)}") from None
    return files[0], files[1]


def _out_of_space(held: BinaryIO) -> str | None:
    """The directory of the held output if its file system is (nearly) full, else None."""
    try:
        st = os.fstatvfs(held.fileno())
    except OSError:
        return None
    if st.f_bavail * st.f_frsize >= _ROOM:
        return None
    import tempfile

    return tempfile.gettempdir()


def _show_output(held: tuple[BinaryIO, BinaryIO]) -> None:
    """Copy the held output to taskrunner's own stdout and stderr, a block at a time."""
    for source, target in zip(held, (1, 2)):
        offset = 0
        try:
            while True:
                block = os.pread(source.fileno(), 1 << 16, offset)
                if not block:
                    break
                offset += len(block)
                while block:
                    block = block[os.write(target, block) :]
        except OSError:
            pass  # the reader went away (EPIPE) or the stream is closed: nothing left to do
