"""The counter file: how many runs in a row were refused.

The file holds an ASCII decimal and a newline; absent means 0. Whoever holds the flock of the
file currently at the path may change it, and changes it only by replacing it (a temp file,
fsynced, renamed over) or removing it, so a crash leaves the old value or the new one. A run
that wins the flock checks that the path still names that file, since the last holder may
just have replaced it; that is what makes concurrent increments exact. Only that holder ever
writes the temp file, so it has one fixed name, ``COUNTER.tmp``, and a crash's leftover is
removed by the next holder.
"""

from __future__ import annotations

import fcntl
import os
import time

from taskrunner.errors import CounterUnusable
from taskrunner.fsutil import (
    OPEN_FLAGS,
    check_ours,
    close,
    open_parent,
    reason,
    still_named,
    write_all,
)
from taskrunner.signals import SignalWatch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable
_READ_LIMIT = 64
_MAX_DIGITS = 18
_MAX_ATTEMPTS = 10000
# A holder keeps the counter's flock for a moment (an fsync's worth); one that keeps it this
# long is stopped or stuck on a dead disk, and the run says so rather than wait for ever.
_FLOCK_PATIENCE = 30.0


def parse(data: bytes) -> int | None:
    """The count in a counter file's content; None if it is not a count. Empty is 0."""
    text = data.strip()
    if not text:
        return 0
    if len(data) < _READ_LIMIT and len(text) <= _MAX_DIGITS and text.isdigit():
        return int(text)
    return None


class Counter:
    """The counter file at ``path``."""

    def __init__(self, path: str, watch: SignalWatch) -> None:
        self.path = path
        self._name = os.path.basename(path)
        self._tempname = self._name + ".tmp"
        self._watch = watch
        self._dirfd: int | None = None
        #: The content found instead of a count by the last increment, if any.
        self.garbage: bytes | None = None

    def increment(self, threshold: int) -> tuple[int, bool]:
        """Count one refusal. Returns the count, this refusal included, and whether it
        exceeded ``threshold``; if it did, the count is reset to 0."""
        fd = self._hold(create=True)
        assert fd is not None
        try:
            try:
                data = os.pread(fd, _READ_LIMIT, 0)
            except OSError as exc:
                raise CounterUnusable(self.path, reason(exc)) from None
            old = parse(data)
            self.garbage = data if old is None else None
            count = (old or 0) + 1
            if count > threshold:
                self._remove()
                return count, True
            self._replace(count)
            return count, False
        finally:
            close(fd)

    def reset_around(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (taking the lock) and, if it succeeds, reset the count, holding
        the counter's flock across both: a refusal counted once the lock is taken is never
        wiped by this reset."""
        fd = self._hold(create=False)
        try:
            attempt()
            if fd is not None:
                self._remove()
                self._discard_temp()
        finally:
            if fd is not None:
                close(fd)

    def check(self) -> None:
        """Raise :class:`CounterUnusable` if the counter path cannot be used."""
        fd = self._open_existing(self._open_dir())
        if fd is not None:
            close(fd)

    def close(self) -> None:
        if self._dirfd is not None:
            close(self._dirfd)
            self._dirfd = None

    def _hold(self, create: bool) -> int | None:
        """The flocked counter file now at the path; None if absent and not ``create``."""
        dirfd = self._open_dir()
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open_existing(dirfd)
            if fd is None:
                if not create:
                    return None
                try:
                    fd = os.open(
                        self._name,
                        os.O_RDONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS,
                        0o600,
                        dir_fd=dirfd,
                    )
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise CounterUnusable(self.path, reason(exc)) from None
            try:
                self._flock(fd)
                if still_named(dirfd, self._name, os.fstat(fd)):
                    return fd
            except OSError as exc:
                close(fd)
                raise CounterUnusable(self.path, reason(exc)) from None
            except BaseException:
                close(fd)
                raise
            close(fd)
        raise CounterUnusable(self.path, "the counter file keeps changing")

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        deadline = time.monotonic() + _FLOCK_PATIENCE
        if self._watch.call_until(lambda: fcntl.flock(fd, fcntl.LOCK_EX), deadline):
            return
        try:  # the deadline may have cut in just as the flock was granted
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CounterUnusable(
                self.path, "another process has kept it locked too long"
            ) from None

    def _open_existing(self, dirfd: int) -> int | None:
        try:
            fd = os.open(self._name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CounterUnusable(self.path, reason(exc)) from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            close(fd)
            raise CounterUnusable(self.path, reason(exc)) from None
        why = check_ours(st) or (f"has {st.st_nlink} hard links" if st.st_nlink > 1 else None)
        if why:
            close(fd)
            raise CounterUnusable(self.path, why)
        return fd

    def _replace(self, count: int) -> None:
        """Replace the counter file by one holding ``count``. Caller holds the flock."""
        dirfd = self._open_dir()
        fd = self._create_temp(dirfd)
        try:
            try:
                write_all(fd, b"%d\n" % count)
                os.fsync(fd)
            finally:
                close(fd)
            os.rename(self._tempname, self._name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as exc:
            try:
                os.unlink(self._tempname, dir_fd=dirfd)
            except OSError:
                pass
            raise CounterUnusable(self.path, reason(exc)) from None

    def _create_temp(self, dirfd: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS
        for _ in range(2):
            try:
                return os.open(self._tempname, flags, 0o600, dir_fd=dirfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise CounterUnusable(self.path, reason(exc)) from None
            # Only the flock holder writes the temp file, so one already there was left by a
            # holder that crashed. Remove it if it is ours; anything else is someone's trap.
            try:
                st = os.stat(self._tempname, dir_fd=dirfd, follow_symlinks=False)
                why = check_ours(st)
                if why:
                    raise CounterUnusable(self.path, f"{self._tempname} {why}")
                os.unlink(self._tempname, dir_fd=dirfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CounterUnusable(self.path, f"{self._tempname}: {reason(exc)}") from None
        raise CounterUnusable(self.path, f"{self._tempname} keeps reappearing")

    def _discard_temp(self) -> None:
        """Remove a temp file a crashed holder left (only the flock holder may)."""
        dirfd = self._open_dir()
        try:
            if check_ours(os.stat(self._tempname, dir_fd=dirfd, follow_symlinks=False)) is None:
                os.unlink(self._tempname, dir_fd=dirfd)
        except OSError:
            pass

    def _remove(self) -> None:
        """Reset to 0 by removing the file (absent means 0). Caller holds the flock."""
        try:
            os.unlink(self._name, dir_fd=self._open_dir())
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CounterUnusable(self.path, reason(exc)) from None

    def _open_dir(self) -> int:
        if self._dirfd is None:
            self._dirfd, self._name = open_parent(self.path, CounterUnusable)
        return self._dirfd
