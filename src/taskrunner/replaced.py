"""A small file that is only ever changed by replacing it: the counter, the metrics file.

Whoever holds the flock of the file currently at the path may change it, and changes it only
by replacing it (a temp file, fsynced, renamed over) or removing it, so a crash leaves the
old content or the new one and a reader never sees a partial file. A process that wins the
flock checks that the path still names that file, since the last holder may just have
replaced it; that is what makes concurrent read-modify-write updates exact. Only that holder
ever writes the temp file, so it has one fixed name, ``NAME.tmp``, and a crash's leftover is
removed by the next holder.

A file that others may read (the metrics file) is one they may flock too, and so hold up
every update: such a file is serialised instead on the flock of a sidecar, ``NAME.lock``,
mode 0600 so that only its owner can open it, and never removed (so never replaced under a
waiter).

The file, its temp file, the sidecar and the directories on the way are held to the same
rules as the lock: no symlinks, FIFOs, devices or directories in their place, no other
user's file, no hard links (see :mod:`taskrunner.fsutil`).
"""

from __future__ import annotations

import fcntl
import os
import time

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
    from taskrunner.errors import Unusable

_NAME_MAX = 255
_MAX_ATTEMPTS = 10000
# A holder keeps the flock for a moment (an fsync's worth); one that keeps it this long is
# stopped or stuck on a dead disk, and the run says so rather than wait for ever.
_FLOCK_PATIENCE = 30.0


def temp_name(name: str, suffix: str = ".tmp") -> str:
    """``NAME.tmp`` (or NAME and another suffix); for a name too long for that, a shortened
    one with a checksum."""
    raw = os.fsencode(name)
    if len(raw) + len(suffix) <= _NAME_MAX:
        return name + suffix
    import zlib

    return os.fsdecode(raw[:200]) + f".{zlib.crc32(raw):08x}{suffix}"


class Replaced:
    """The file at ``path``, replaced whole under its flock.

    ``error`` is the :class:`~taskrunner.errors.Unusable` subclass raised for anything that
    keeps the file from being used; ``mode`` the mode new files get (set whatever the umask
    when it lets others in, since then they are meant to read it); ``read_limit`` the most
    that :meth:`read` returns, and the largest a crash's leftover temp file can be; ``noun``
    and ``temp_noun`` name the file and its temp file in messages ("the counter file keeps
    changing", "count.tmp is not a counter's temp file"). With ``sidecar``, updates are
    serialised on the flock of ``NAME.lock`` rather than of the file itself, and the file
    is not flocked at all: for a file others may read, and so flock.
    """

    def __init__(
        self,
        path: str,
        watch: SignalWatch,
        *,
        error: type[Unusable],
        mode: int,
        read_limit: int,
        noun: str,
        temp_noun: str,
        sidecar: bool = False,
    ) -> None:
        self.path = path
        self._name = os.path.basename(path)
        self._tempname = temp_name(self._name)
        self._lockname = temp_name(self._name, ".lock") if sidecar else None
        self._watch = watch
        self._error = error
        self._mode = mode
        self._read_limit = read_limit
        self._noun = noun
        self._temp_noun = temp_noun
        self._dirfd: int | None = None

    def hold(self, create: bool) -> int | None:
        """The flocked file now at the path, read-only; None if absent and not ``create``
        (with ``create``, an empty file is made). With ``sidecar``, the flocked sidecar
        instead, made if absent (the file is checked first, so that a path that cannot be
        used leaves no sidecar). The caller closes it, which lets go."""
        dirfd = self._open_dir()
        name, mode = self._name, self._mode
        if self._lockname is not None:
            self.check()
            name, mode, create = self._lockname, 0o600, True
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open_existing(dirfd, name)
            if fd is None:
                if not create:
                    return None
                try:
                    fd = os.open(
                        name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, mode, dir_fd=dirfd
                    )
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise self._refusal(name, reason(exc)) from None
            try:
                self._flock(fd)
                if still_named(dirfd, name, os.fstat(fd)):
                    return fd
            except OSError as exc:
                close(fd)
                raise self._refusal(name, reason(exc)) from None
            except BaseException:
                close(fd)
                raise
            close(fd)
        raise self._error(self.path, f"{self._noun} keeps changing")

    def read(self, fd: int) -> bytes:
        """The start of the file, ``fd`` being what :meth:`hold` returned, up to the read
        limit: content of that length or more was cut, and is not one this module wrote.
        With ``sidecar``, the file now at the path is read, empty if there is none."""
        if self._lockname is None:
            return self._pread(fd)
        file = self._open_existing(self._open_dir(), self._name)
        if file is None:
            return b""
        try:
            return self._pread(file)
        finally:
            close(file)

    def _pread(self, fd: int) -> bytes:
        try:
            return os.pread(fd, self._read_limit, 0)
        except OSError as exc:
            raise self._error(self.path, reason(exc)) from None

    def replace(self, data: bytes) -> None:
        """Replace the file by one holding ``data``. Caller holds the flock."""
        dirfd = self._open_dir()
        fd = self._create_temp(dirfd)
        try:
            try:
                if self._mode & 0o077:
                    os.fchmod(fd, self._mode)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                close(fd)
            os.rename(self._tempname, self._name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as exc:
            discard(self._tempname, dirfd)
            raise self._error(self.path, reason(exc)) from None

    def remove(self) -> None:
        """Remove the file. Caller holds the flock."""
        try:
            os.unlink(self._name, dir_fd=self._open_dir())
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(self.path, reason(exc)) from None

    def discard_temp(self) -> None:
        """Remove a temp file a crashed holder left, if there is one of ours (anything else
        there is for the next update to refuse). Caller holds the flock."""
        self._remove_leftover(self._open_dir())

    def check(self) -> None:
        """Raise ``error`` if the path cannot be used."""
        fd = self._open_existing(self._open_dir(), self._name)
        if fd is not None:
            close(fd)

    def close(self) -> None:
        if self._dirfd is not None:
            close(self._dirfd)
            self._dirfd = None

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
            raise self._error(self.path, "another process has kept it locked too long") from None

    def _open_existing(self, dirfd: int, name: str) -> int | None:
        """``name`` (the file or its sidecar) opened read-only; None if there is none."""
        try:
            fd = os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._refusal(name, reason(exc)) from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            close(fd)
            raise self._refusal(name, reason(exc)) from None
        why = check_ours(st) or (f"has {st.st_nlink} hard links" if st.st_nlink > 1 else None)
        if why:
            close(fd)
            raise self._refusal(name, why)
        return fd

    def _refusal(self, name: str, why: str) -> Unusable:
        """The error for ``name``, the file or its sidecar, that cannot be used: ``why``,
        after the sidecar's name if it is the sidecar."""
        return self._error(self.path, why if name == self._name else f"{name} {why}")

    def _create_temp(self, dirfd: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS
        for _ in range(2):
            try:
                return os.open(self._tempname, flags, self._mode, dir_fd=dirfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._error(self.path, reason(exc)) from None
            why = self._remove_leftover(dirfd)
            if why:
                raise self._error(self.path, f"{self._tempname} {why}")
        raise self._error(self.path, f"{self._tempname} keeps reappearing")

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
            if why is None and (st.st_nlink != 1 or st.st_size > self._read_limit):
                why = f"is not {self._temp_noun}"
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

    def _open_dir(self) -> int:
        if self._dirfd is None:
            self._dirfd, self._name = open_parent(self.path, self._error)
        return self._dirfd
