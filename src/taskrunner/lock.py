"""The lock file as a library: what the command line takes, for a Python program to hold.

``Lock`` takes the same lock as ``taskrunner -l PATH``, by the same steps: a run of the
command line and a program holding a ``Lock`` on the same path exclude each other. It never
prints and never exits; what happened is in the exceptions it raises and in ``recovered``.
"""

from __future__ import annotations

import os
import sys
import time

from taskrunner.errors import LockBusy
from taskrunner.holder import Holder, command_text
from taskrunner.lockfile import FileLock

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Union

    StrPath = Union[str, "os.PathLike[str]"]

__all__ = ["Lock"]

_GRACE = 1.0  # seconds release() gives others' instantaneous looks at the lock to end


class Lock:
    """The lock file at ``path``; ``wait`` is how many seconds :meth:`acquire` waits for a
    busy lock (0: not at all).

    Use it as a context manager, or call :meth:`acquire` and :meth:`release`::

        with taskrunner.Lock("/run/lock/backup.lock", wait=30):
            back_up()

    While held, the file exists and holds this process's record (pid, host, boot, start,
    command line). A lock whose holder died is taken over, and the dead holder is left in
    :attr:`recovered`. A file taskrunner did not write is a manual hold: busy, whatever
    ``wait`` says. A busy lock raises :class:`~taskrunner.LockBusy`, a path that cannot be
    used :class:`~taskrunner.LockUnusable`.

    Two ``Lock`` objects on one path exclude each other, in one process too; one object is
    one hold, not re-entrant, and is not to be shared between threads without a lock of
    their own. A child forked while the lock is held does not release it: its parent does.
    """

    def __init__(self, path: StrPath, *, wait: float = 0.0) -> None:
        self.path = os.fspath(path)
        if not isinstance(self.path, str):
            raise TypeError(f"the lock's path must be text, not {type(self.path).__name__}")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)):
            raise TypeError(f"wait must be a number of seconds, not {wait!r}")
        if not wait >= 0 or wait == float("inf"):  # also refuses NaN
            raise ValueError(f"wait must be a finite number of seconds, 0 or more: {wait!r}")
        self.wait = float(wait)
        #: The record of a dead holder whose lock the last :meth:`acquire` took over, if any.
        self.recovered: Holder | None = None
        self._lock: FileLock | None = None
        self._owner = 0  # the pid that acquired it

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None and self._owner == os.getpid()

    def acquire(self) -> Lock:
        """Take the lock, waiting up to ``wait`` seconds for it; returns this object.

        Raises :class:`~taskrunner.LockBusy` (its ``holder`` says who has it; ``None`` for
        a manual hold), :class:`~taskrunner.LockUnusable` for a path that cannot be used
        (a symlink, another user's file, no such directory, a full disk), and
        ``RuntimeError`` if this object holds the lock already."""
        if self.locked:
            raise RuntimeError(f"{self.path}: already held by this Lock")
        if self._lock is not None:  # a forked child's copy of its parent's hold
            self._lock.abandon()
            self._lock = None
        self.recovered = None
        lock = FileLock(self.path, for_command=False)
        holder = Holder.current(_command_line())
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    lock.try_acquire(holder)
                    break
                except LockBusy as busy:
                    if busy.manual or time.monotonic() >= deadline:
                        raise
                    if not lock.wait_for_change(deadline, None):
                        raise
                finally:
                    if lock.recovered is not None:
                        self.recovered, lock.recovered = lock.recovered, None
                        _log_takeover(self.path, self.recovered)
        except BaseException:
            lock.close()
            raise
        self._lock, self._owner = lock, os.getpid()
        return self

    def release(self) -> None:
        """Let the lock go: its file is removed. Nothing happens if it is not held, or in a
        forked child, whose parent holds it. Raises :class:`~taskrunner.LockUnusable` if
        the file cannot be removed; the lock is let go all the same."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if self._owner != os.getpid():
            lock.abandon()
            return
        try:
            # A run trying the lock at this moment may hold its flock for an instant (see
            # FileLock._try_exclusive): give it that instant.
            lock.release(_GRACE)
        finally:
            lock.close()

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __reduce__(self) -> tuple[type[Lock], tuple[str], dict[str, float]]:
        # A copy, or one sent to another process, is the same lock, not held: a hold is
        # this object's open files, which mean nothing anywhere else.
        return type(self), (self.path,), {"wait": self.wait}

    def __repr__(self) -> str:
        state = "locked" if self.locked else "unlocked"
        return f"<taskrunner.Lock {self.path!r} {state}>"


def _command_line() -> str:
    """What the record says the holder runs: this program's command line."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return command_text([arg for arg in argv if arg])


def _log_takeover(path: str, dead: Holder) -> None:
    """Say on the ``taskrunner`` logger that a stale lock was taken over; as a library, that
    is all: whoever wants it shown configures logging."""
    from taskrunner.logsink import logger

    logger().warning(
        "removed the stale lock %s of %s, which is gone",
        path,
        dead.describe(f"started {dead.age()} ago"),
    )
