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
    discard,
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
_NAME_MAX = 255
_MAX_DIGITS = 18
_MAX_ATTEMPTS = 10000
# A holder keeps the counter's flock for a moment (an fsync's worth); one that keeps it this
# long is stopped or stuck on a dead disk, and the run says so rather than wait for ever.
_FLOCK_PATIENCE = 30.0


def _temp_name(name: str) -> str:
    """``NAME.tmp``; for a name too long for that, a shortened one with a checksum."""
    raw = os.fsencode(name)
    if len(raw) + 4 <= _NAME_MAX:
        return name + ".tmp"
    import zlib

    return os.fsdecode(raw[:200]) + f".{zlib.crc32(raw):08x}.tmp"


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
        self._tempname = _temp_name(self._name)
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
            discard(self._tempname, dirfd)
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
            why = self._remove_leftover(dirfd)
            if why:
                raise CounterUnusable(self.path, f"{self._tempname} {why}")
        raise CounterUnusable(self.path, f"{self._tempname} keeps reappearing")

    def _remove_leftover(self, dirfd: int) -> str | None:
        """Remove the temp file a crashed holder left (only the flock holder writes it, so
        one there now is a leftover); None once it is gone, else why it is not ours to
        remove: someone's trap, or a file of another job that happens to have that name."""
        try:
            fd = os.open(self._tempname, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return reason(exc)
        try:
            st = os.fstat(fd)
            why = check_ours(st)
            if why is None and (st.st_nlink != 1 or st.st_size > _READ_LIMIT):
                why = "is not a counter's temp file"
            if why is None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return "is in use by another process"
                if still_named(dirfd, self._tempname, st):
                    os.unlink(self._tempname, dir_fd=dirfd)
            return why
        except OSError as exc:
            return reason(exc)
        finally:
            close(fd)

    def _discard_temp(self) -> None:
        """After a reset: remove a temp file a crashed holder left, if there is one of ours
        (anything else there is for the next update to refuse)."""
        self._remove_leftover(self._open_dir())

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
