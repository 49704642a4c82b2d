"""The command line's run as a function: :func:`run` returns a result instead of exiting.

It takes the same lock, counts and reports the same way, and runs and watches the command
the same way as ``taskrunner``. What the command line prints, it logs on the ``taskrunner``
logger; what the command line exits with is the result's ``status``.
"""

from __future__ import annotations

import math
import os
import signal
import threading

from taskrunner.errors import InvalidJob
from taskrunner.runner import Job, Result, metrics_lock, same_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Union

    from taskrunner.backend import LockBackend

    StrPath = Union[str, "os.PathLike[str]"]

__all__ = ["run"]

_MAX_SECONDS = 10 * 365 * 86400


def run(
    command: str | Sequence[str],
    lockfile: StrPath | None = None,
    *,
    threshold: int | None = None,
    counter_file: StrPath | None = None,
    cumulative: bool = False,
    lock_url: str | None = None,
    key: str | None = None,
    wait: float = 0.0,
    timeout: float = 0.0,
    kill_after: float = 10.0,
    name: str | None = None,
    quiet_success: bool = False,
    stuck_after: float = 0.0,
    on_stuck: str | None = None,
    on_recover: str | None = None,
    notify_url: str | None = None,
    hook_timeout: float = 30.0,
    metrics_file: StrPath | None = None,
) -> Result:
    """Run ``command`` unless another run holds its lock, as ``taskrunner`` would.

    ``command`` is a string, run by ``/bin/sh -c`` (``-c CMD``), or a list: a program
    and its arguments, run directly (``-- PROGRAM ARG...``). The lock is ``lockfile``, or
    in fleet mode ``key`` in the PostgreSQL database at ``lock_url``. The keyword
    arguments are the command line's options of the same names; durations are seconds.

    Returns a :class:`~taskrunner.Result`: its ``status`` is what the command line would
    exit with. A busy lock is a result (``refused``; 75, or 76 when ``reported`` as
    stuck), not an error. Raises :class:`~taskrunner.InvalidJob` for arguments the command
    line would refuse with status 2, and, when the command did not run for another
    reason, what the command line reports: :class:`~taskrunner.LockUnusable` or
    :class:`~taskrunner.CounterUnusable` (71), :class:`~taskrunner.CannotRun` (126, 127),
    :class:`~taskrunner.Interrupted` (a termination signal came first).

    Call it from the main thread: it passes termination signals on to the command, and
    Python lets only the main thread handle signals. It restores every signal handler it
    set before it returns.
    """
    job = _job(
        command, lockfile, threshold=threshold, counter_file=counter_file,
        cumulative=cumulative, lock_url=lock_url, key=key, wait=wait, timeout=timeout,
        kill_after=kill_after, name=name, quiet_success=quiet_success, stuck_after=stuck_after,
        on_stuck=on_stuck, on_recover=on_recover, notify_url=notify_url,
        hook_timeout=hook_timeout, metrics_file=metrics_file,
    )  # fmt: skip
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("taskrunner.run() must be called from the main thread")
    from taskrunner.logsink import LogReporter
    from taskrunner.runner import run as run_job

    lock: LockBackend
    if job.lockfile is not None:
        from taskrunner.lockfile import FileLock

        lock = FileLock(job.lockfile)
    else:
        from taskrunner.pglock import PgLock

        lock = PgLock(job.lock_url or "", job.key or "", cumulative=job.cumulative)
    result = run_job(job, lock, LogReporter(job.name), library=True)
    if result.terminal_signal is not None and result.ran:  # (if not, it was raised again)
        # The terminal's Ctrl-C or Ctrl-\ ended the command: as a shell running it would,
        # the caller gets it too (KeyboardInterrupt, for Ctrl-C and Python's own handler).
        signal.raise_signal(result.terminal_signal)
    if result.error is not None:
        raise result.error
    return result


def _job(
    command: str | Sequence[str],
    lockfile: StrPath | None,
    *,
    threshold: int | None,
    counter_file: StrPath | None,
    cumulative: bool,
    lock_url: str | None,
    key: str | None,
    wait: float,
    timeout: float,
    kill_after: float,
    name: str | None,
    quiet_success: bool,
    stuck_after: float,
    on_stuck: str | None,
    on_recover: str | None,
    notify_url: str | None,
    hook_timeout: float,
    metrics_file: StrPath | None,
) -> Job:
    """The job these arguments describe; raises :class:`InvalidJob` where the command line
    would exit 2, with the arguments named as the caller wrote them."""
    if isinstance(command, str):
        argv, shell = [command], True
    elif isinstance(command, (list, tuple)) and all(isinstance(a, str) for a in command):
        argv, shell = list(command), False
    else:
        raise InvalidJob("command: a string for /bin/sh, or a list of strings")
    if not argv or not argv[0]:
        raise InvalidJob("command is empty")
    for arg in argv:
        _check_text("command", arg, empty=True)
    lock_path = _path("lockfile", lockfile)
    counter = _path("counter_file", counter_file)
    metrics = _path("metrics_file", metrics_file)
    for what, text in (("lock_url", lock_url), ("key", key), ("name", name),
                       ("on_stuck", on_stuck), ("on_recover", on_recover),
                       ("notify_url", notify_url)):  # fmt: skip
        if text is not None:
            _check_text(what, text)
    for what, flag in (("cumulative", cumulative), ("quiet_success", quiet_success)):
        if not isinstance(flag, bool):
            raise InvalidJob(f"{what} must be True or False, not {flag!r}")
    fleet = lock_url is not None or key is not None
    if fleet:
        if lock_path is not None:
            raise InvalidJob("give lockfile, or lock_url and key, not both")
        if lock_url is None or key is None:
            raise InvalidJob("lock_url and key go together")
        if not lock_url.lower().startswith(("postgresql://", "postgres://")):
            raise InvalidJob(f"lock_url: not a postgresql:// URL: {lock_url!r}")
        if counter is not None:
            raise InvalidJob("counter_file is for lock files: with lock_url the count is in "
                             "the database")  # fmt: skip
    elif lock_path is None:
        raise InvalidJob("no lock: give lockfile, or lock_url and key")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0
    ):
        raise InvalidJob(f"threshold: not a whole number of 0 or more: {threshold!r}")
    if not fleet and (threshold is None) != (counter is None):
        raise InvalidJob("threshold and counter_file go together")
    if cumulative and threshold is None:
        raise InvalidJob("cumulative counts refusals: it needs a threshold")
    seconds = {
        "wait": wait, "timeout": timeout, "kill_after": kill_after,
        "stuck_after": stuck_after, "hook_timeout": hook_timeout,
    }  # fmt: skip
    for what, value in seconds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidJob(f"{what}: not a number of seconds: {value!r}")
        if not 0 <= value <= _MAX_SECONDS or math.isnan(value):
            raise InvalidJob(f"{what}: seconds from 0 to 10 years, not {value!r}")
    if hook_timeout == 0:
        raise InvalidJob("hook_timeout must be more than 0: hooks are always cut off")
    if notify_url is not None:
        from taskrunner.cli import url  # the command line's check of --notify-url

        try:
            url(notify_url)
        except (TypeError, ValueError) as exc:
            raise InvalidJob(f"notify_url: {exc}") from None
    clash = same_file([
        ("lockfile", lock_path),
        ("counter_file", counter),
        ("metrics_file", metrics),
        ("the metrics file's lock", metrics_lock(metrics)),
    ])  # fmt: skip
    if clash is not None:
        raise InvalidJob(f"{clash[0]} must not be {clash[1]}")
    return Job(
        lock_path,
        argv,
        shell=shell,
        name=name or key or os.path.basename(lock_path or "") or lock_path or "",
        threshold=threshold or 0,
        counter_file=counter,
        cumulative=cumulative,
        wait=float(wait),
        timeout=float(timeout),
        kill_after=float(kill_after),
        stuck_after=float(stuck_after),
        on_stuck=on_stuck,
        on_recover=on_recover,
        notify_url=notify_url,
        hook_timeout=float(hook_timeout),
        metrics_file=metrics,
        quiet_success=quiet_success,
        lock_url=lock_url,
        key=key,
    )


def _path(what: str, value: StrPath | None) -> str | None:
    if value is None:
        return None
    try:
        path = os.fspath(value)
    except TypeError:
        raise InvalidJob(f"{what} must be a path, not {value!r}") from None
    if not isinstance(path, str):
        raise InvalidJob(f"{what} must be a path as text, not {value!r}")
    _check_text(what, path)
    return path


def _check_text(what: str, text: object, *, empty: bool = False) -> None:
    """Raise :class:`InvalidJob` unless ``text`` is a string the system can take: no NUL,
    nothing that has no bytes (a lone surrogate), and not empty unless ``empty``."""
    if not isinstance(text, str):
        raise InvalidJob(f"{what} must be a string, not {text!r}")
    if not text and not empty:
        raise InvalidJob(f"{what} is empty")
    if "\0" in text:
        raise InvalidJob(f"{what} holds a NUL character")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise InvalidJob(f"{what} holds characters that have no bytes: {text!r}") from None
