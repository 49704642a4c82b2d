"""The interface every lock backend offers the runner.

A backend holds one named lock for one run. The runner drives it: ``try_acquire`` until it
succeeds or the wait is over, ``wait_for_change`` in between, ``release`` after the command
is gone. A backend never prints, never exits, and knows nothing of the command line.
This module is for type checking only: nothing imports it at run time.
"""

from __future__ import annotations

from typing import Callable, Protocol

from taskrunner.holder import Holder
from taskrunner.process import Heartbeat
from taskrunner.signals import SignalWatch


class LockBackend(Protocol):
    """One lock, as seen by one run."""

    #: What the lock is called in messages: a path, or a key.
    description: str
    #: The record of a dead holder whose lock the last attempt cleared, if it did.
    recovered: Holder | None
    #: What the lock cannot promise where it is (a network file system), if anything.
    caveat: str | None

    #: The count of refusals, where it lives with the lock (fleet mode); else None, and a
    #: counter file keeps it.
    tally: Tally | None
    #: A number that grows with every acquisition of the lock, while it is held; None where
    #: the backend has none (a lock file).
    fencing_token: int | None

    def heartbeat(self) -> Heartbeat | None:
        """How to check, while the command runs, that the lock is still held; None where it
        cannot be lost while the runner lives (a lock file)."""
        raise NotImplementedError

    def try_acquire(self, holder: Holder) -> None:
        """Take the lock now, recording ``holder``; raise ``LockBusy`` if another run or a
        manual hold has it, ``LockUnusable`` if it cannot be used at all."""
        raise NotImplementedError

    def wait_for_change(self, deadline: float, watch: SignalWatch) -> bool:
        """After ``LockBusy``: block until the holder lets go (True, try again) or the
        ``time.monotonic()`` deadline passes (False)."""
        raise NotImplementedError

    def inheritable_fds(self) -> tuple[int, ...]:
        """Descriptors the command must inherit so that the lock lasts as long as it does,
        even if the runner is killed."""
        raise NotImplementedError

    def note_command(self, pid: int) -> None:
        """The command has started as ``pid``: record it, so that the lock stays held while
        it runs even if the runner dies and the command closes what it inherited."""
        raise NotImplementedError

    def release(self, grace: float = 0.0) -> bool:
        """Give the lock up; call once the command is gone. False if what the command
        started still holds it through an inherited descriptor (waiting up to ``grace``
        seconds for them to let go): then it stays held until they are gone too."""
        raise NotImplementedError

    def close(self) -> None:
        """Free everything; releases the lock if it is still held."""
        raise NotImplementedError


class Tally(Protocol):
    """Where refusals are counted: a counter file, or the fleet lock's row."""

    #: What it is called in messages.
    path: str
    #: What the last increment found instead of a count, if anything.
    garbage: bytes | None

    def increment(self, threshold: int) -> tuple[int, bool]:
        """Count one refusal: the count, this one included, and whether it passed
        ``threshold`` (the count is then reset)."""
        raise NotImplementedError

    def reset_around(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (taking the lock) and, if it succeeds, reset the count, so that no
        refusal counted once the lock is taken is lost to the reset."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the count cannot be used."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
