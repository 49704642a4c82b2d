"""The single-host lock: a file that exists exactly while a run holds it.

Liveness comes from ``flock``, which the kernel drops when the last holder of the file goes,
so no pid is ever guessed. Taking the lock is one exclusive ``link`` of a file that already
holds our complete record and our flock, so the path never shows a half-written record and
never shows an unlocked one. Whoever finds a file at the path and wins its flock knows that
nobody holds it: with a taskrunner record its holder died (stale: remove it and try again),
without one an operator put it there (a manual hold). Every win is checked against the path,
because a waiter may win the flock of a file that was already removed.

A holder takes *shared* flocks, through two open files: one the runner keeps, one the command
inherits. Everyone else asks for an exclusive flock, so either keeps them out; the lock lasts
as long as the runner or anything of the command's that kept the descriptor. At release the
runner converts its flock to an exclusive one: that succeeds only if nothing of the command's
still holds the lock, and only then is the file removed.

For operators, ``inspect`` tells what is at the path without taking a flock (a run trying the
lock at that moment would be refused), and ``unlock`` removes a stale lock by the same steps
as a run taking it over, so that the two can meet safely.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from taskrunner.errors import LockBusy, LockUnusable
from taskrunner.fsutil import (
    OPEN_FLAGS,
    caveat,
    check_ours,
    close,
    discard,
    filesystem,
    open_parent,
    reason,
    still_named,
    write_all,
)
from taskrunner.holder import Holder, pid_namespace, process_start, running
from taskrunner.signals import SignalWatch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from taskrunner.backend import Tally

_READ_LIMIT = 65537
_MAX_ATTEMPTS = 10000  # looks at the path before giving up (see _keeps_changing)
_ORPHAN_AGE = 60.0  # seconds after which an unflocked named record is surely abandoned
_POLL = 0.01  # seconds between looks where there is nothing to block on
_FRESH = 1.0  # seconds after which a waiter's record gets the time it took the lock
# A waiter without signal handlers polls: from a millisecond apart up to this.
_FIRST_NAP, _MAX_NAP = 0.001, 0.02
_TMPFILE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


class FileLock:
    """A lock file at ``path``, as described in the module docstring."""

    def __init__(self, path: str, *, for_command: bool = True) -> None:
        """``for_command``: whether a command will inherit the lock (the runner's case), so
        that a second open file is kept for it."""
        self.description = path
        self.path = path
        self.recovered: Holder | None = None
        self.caveat: str | None = None
        self.tally: Tally | None = None  # a counter file keeps the count
        self.fencing_token: int | None = None
        self._name = os.path.basename(path)
        self._dirfd: int | None = None
        self._fd: int | None = None  # our record: prepared, then linked at the path
        self._tempname: str | None = None  # set when the record has a name of its own
        self._ident: os.stat_result | None = None  # our file, while we hold the lock
        self._busy_fd: int | None = None  # the holder's file, kept to wait on
        self._command_fd: int | None = None  # our file again, for the command to inherit
        self._holder: Holder | None = None
        self._poll = False  # the last refusal came from a holder that holds no flock now
        self._anonymous = hasattr(os, "O_TMPFILE")
        self._for_command = for_command
        self._size = 0  # of our record as last written

    # -- acquiring ---------------------------------------------------------------------

    def try_acquire(self, holder: Holder) -> None:
        if self._ident is not None:
            raise RuntimeError("lock already held")
        self.recovered = None
        self._holder = holder
        self._drop_busy()
        dirfd = self._open_dir()
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open_existing(dirfd)
            if fd is None:
                if self._publish(dirfd, holder):
                    return
                continue
            try:
                removed = self._take_over(dirfd, fd)
            finally:
                if fd != self._busy_fd:
                    close(fd)
            if removed is not None:
                self.recovered = removed.holder
        raise self._keeps_changing()

    def _open_existing(self, dirfd: int) -> int | None:
        """The file at the path, opened to look at (None when there is none); raises
        ``LockUnusable`` for a path that cannot be opened."""
        try:
            return os.open(self._name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LockUnusable(self.path, reason(exc)) from None

    def _keeps_changing(self) -> LockUnusable:
        # Each retry means another run changed the path under us; real contention settles
        # long before.
        return LockUnusable(self.path, "the lock file keeps changing")

    def _take_over(self, dirfd: int, fd: int, force: bool = False) -> LockState | None:
        """Remove the file ``fd`` that another run or an operator left at the path if its
        holder is gone (with ``force``, a manual hold too): what was removed, or None if
        the path has changed (look again). Raises ``LockBusy`` when the lock is not ours
        to take, keeping a live holder's file in ``_busy_fd`` to wait on."""
        try:
            st = os.fstat(fd)
            why = check_ours(st)
            if why:
                raise LockUnusable(self.path, why)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._record(fd, st)
                self._busy_fd = fd
                raise LockBusy(self.path, holder, st.st_mtime) from None
            # Nobody holds this file. Is it still the one at the path?
            if not still_named(dirfd, self._name, st):
                return None
            dead = Holder.decode(os.pread(fd, _READ_LIMIT, 0))
            if dead is None:
                self._one_link(fd)
                if not force:
                    raise LockBusy(self.path, None, st.st_mtime)
            elif dead.is_alive():
                # Its runner is between two flocks as it lets go, or was killed while its
                # command, which closed the descriptor it inherited, still runs: not stale.
                self._poll = True
                raise LockBusy(self.path, dead, st.st_mtime)
            # Its holder is gone. Removing it while we hold its flock is safe, since any
            # other run that opened it will find it unnamed once it wins the flock.
            try:
                os.unlink(self._name, dir_fd=dirfd)
            except FileNotFoundError:
                return None
        except OSError as exc:
            raise LockUnusable(self.path, reason(exc)) from None
        return LockState(MANUAL, None, st.st_mtime) if dead is None else LockState(STALE, dead)

    def _publish(self, dirfd: int, holder: Holder) -> bool:
        """Link our record at the path: True if that made us the holder."""
        if self._fd is None:
            self._fd = self._prepare(dirfd, holder)
        try:
            if self._tempname is None:
                os.link(f"/proc/self/fd/{self._fd}", self._name, dst_dir_fd=dirfd)
            else:
                os.link(
                    self._tempname,
                    self._name,
                    src_dir_fd=dirfd,
                    dst_dir_fd=dirfd,
                    follow_symlinks=False,
                )
        except FileExistsError:
            return False
        except FileNotFoundError:
            if self._tempname is not None or not os.path.isdir("/proc/self/fd"):
                # Our named record was swept before we flocked it, or there is no /proc to
                # link an anonymous one from: make a named record (again).
                self._anonymous = False
                self._discard_record()
                return False
            raise LockUnusable(self.path, "no such file or directory") from None
        except OSError as exc:
            raise LockUnusable(self.path, reason(exc)) from None
        try:
            self._ident = os.fstat(self._fd)
        except OSError as exc:
            # Linked, but we cannot say it is ours: take it back out while we still can.
            discard(self._name, dirfd)
            raise LockUnusable(self.path, reason(exc)) from None
        if time.time() - holder.started > _FRESH:
            # A waiter's record was made before it waited, to be ready at once when the lock
            # came free; now that it holds the lock, say when it took it.
            holder.started = time.time()
            self._rewrite(self._fd, holder)
        if self._tempname is not None:
            self._discard_tempname(dirfd)
            self._sweep_orphans(dirfd)
        if self._for_command:
            self._command_fd = self._open_for_command(dirfd)
        return True

    def _open_for_command(self, dirfd: int) -> int:
        """A second open file of the lock, with a shared flock of its own, for the command.
        Nobody can remove the path while we hold it, so opening it names our file."""
        try:
            fd = os.open(self._name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
        except OSError as exc:
            raise LockUnusable(self.path, reason(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            close(fd)
            raise LockUnusable(self.path, reason(exc)) from None
        return fd

    def _prepare(self, dirfd: int, holder: Holder) -> int:
        """A flocked, fully written record that is not yet at the path."""
        fd = -1
        try:
            if self._anonymous:
                try:
                    fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
                except OSError as exc:
                    if exc.errno not in _TMPFILE_UNSUPPORTED:
                        raise
                    self._anonymous = False
                    # Network file systems cannot make anonymous files: say what holds there.
                    self.caveat = caveat(filesystem(dirfd))
            if fd < 0:
                self._tempname = f".{self._name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
                fd = os.open(
                    self._tempname,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS,
                    0o600,
                    dir_fd=dirfd,
                )
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if fd >= 0:
                close(fd)
            self._discard_tempname(dirfd)
            raise LockUnusable(self.path, reason(exc)) from None
        self._write_record(dirfd, fd, holder)
        return fd

    def _write_record(self, dirfd: int, fd: int, holder: Holder) -> None:
        try:
            data = holder.encode()
            write_all(fd, data)  # a new, empty file: nothing to truncate
            self._size = len(data)
            # After a power cut the path must not show an empty file: that would read as a
            # manual hold and stop the job until someone noticed.
            os.fdatasync(fd)
        except OSError as exc:
            close(fd)
            self._fd = None
            self._discard_tempname(dirfd)
            raise LockUnusable(self.path, reason(exc)) from None

    def _discard_tempname(self, dirfd: int) -> None:
        if self._tempname is not None:
            discard(self._tempname, dirfd)
            self._tempname = None

    def _discard_record(self) -> None:
        if self._fd is not None:
            close(self._fd)
            self._fd = None
        if self._tempname is not None and self._dirfd is not None:
            self._discard_tempname(self._dirfd)

    def _sweep_orphans(self, dirfd: int) -> None:
        """Named records left by runs that crashed before removing them (only where the
        file system cannot make anonymous files): any that nobody flocks are removed."""
        prefix = f".{self._name}."
        try:
            entries = [e.name for e in os.scandir(dirfd) if e.name.startswith(prefix)]
        except OSError:
            return
        for entry in entries:
            if not entry.endswith(".tmp"):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                # A record is flocked right after it is made; a young one may be that new.
                if check_ours(st) is None and time.time() - st.st_mtime > _ORPHAN_AGE:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if still_named(dirfd, entry, st):
                        os.unlink(entry, dir_fd=dirfd)
            except OSError:
                pass
            finally:
                close(fd)

    # -- waiting, holding, releasing ---------------------------------------------------

    def wait_for_change(self, deadline: float, watch: SignalWatch | None) -> bool:
        """Without a ``watch`` (a library caller, in any thread: no signal handlers), the
        holder's flock is polled, at most ``_MAX_NAP`` apart."""
        if self._fd is None and self._holder is not None and self._dirfd is not None:
            # Have the record ready, so that taking the lock once it is free is one link.
            self._fd = self._prepare(self._dirfd, self._holder)
        fd = self._busy_fd
        if fd is None:
            if not self._poll:
                return True
            # Nothing to block on: the holder lives but holds no flock for a moment.
            self._poll = False
            if watch is None:
                time.sleep(max(0.0, min(_POLL, deadline - time.monotonic())))
            else:
                watch.call_until(lambda: time.sleep(_POLL), deadline)
            return time.monotonic() < deadline
        try:
            if watch is None:
                return _poll_flock(fd, deadline)
            return watch.call_until(lambda: fcntl.flock(fd, fcntl.LOCK_EX), deadline)
        except OSError as exc:
            raise LockUnusable(self.path, reason(exc)) from None
        finally:
            self._drop_busy()

    def inheritable_fds(self) -> tuple[int, ...]:
        return () if self._command_fd is None else (self._command_fd,)

    def heartbeat(self) -> None:
        return None  # the kernel holds a flock for as long as its holders live

    def note_command(self, pid: int) -> None:
        if self._fd is None or self._holder is None:
            return
        self._holder.command_pid = pid
        self._holder.command_start = process_start(pid)
        self._rewrite(self._fd, self._holder)

    def _rewrite(self, fd: int, holder: Holder) -> None:
        """Rewrite our record in place, as long as it was or longer (a new start time, the
        command's pid, the end), so that no reader sees it cut short."""
        data = holder.encode()
        try:
            os.pwrite(fd, data, 0)
            if len(data) < self._size:  # a start time that came out a digit shorter
                os.ftruncate(fd, len(data))
            self._size = len(data)
        except OSError:
            pass  # the flocks still hold the lock; the record is what a reader is told

    def release(self, grace: float = 0.0) -> bool:
        ident, self._ident = self._ident, None
        if ident is None:
            return True
        if self._command_fd is not None:
            close(self._command_fd)
            self._command_fd = None
        fd = self._fd
        assert fd is not None
        try:
            deadline = time.monotonic() + grace
            while not self._try_exclusive(fd):
                # What the command started still holds it: processes that are dying with it,
                # or ones that live on. Give the first kind a moment; leave it to the second,
                # saying in the record that the run itself has ended.
                if time.monotonic() >= deadline:
                    if self._holder is not None:
                        self._holder.ended = time.time()
                        self._rewrite(fd, self._holder)
                    return False
                time.sleep(_POLL)
            # Remove the path only while it is still ours, and while we hold the flock:
            # unlocking first would let a waiter win a file that a newcomer is replacing.
            if self._dirfd is not None and still_named(self._dirfd, self._name, ident):
                os.unlink(self._name, dir_fd=self._dirfd)
            return True
        except OSError as exc:
            # Say in the record that this run is over, so that the next run takes the file
            # over as soon as our flock goes, even while this process lives on.
            if self._holder is not None:
                self._holder.ended = time.time()
                self._rewrite(fd, self._holder)
            raise LockUnusable(self.path, f"cannot remove lock file: {reason(exc)}") from None
        finally:
            self._discard_record()

    @staticmethod
    def _try_exclusive(fd: int) -> bool:
        """Make our shared flock exclusive if nothing else holds the lock, else keep it
        shared. Linux drops the old flock before it tries the new one, so after a failed
        attempt a newcomer may win the flock for a moment; it then finds our record's runner
        alive and backs off, never taking a live lock for a stale one. (/proc/locks would
        tell without trying, but reading it stalls every flock on the machine for an RCU
        grace period: milliseconds.)"""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # a newcomer is looking at it: our record, alive, makes it back off
        return False

    def abandon(self) -> None:
        """Close everything without releasing: in a forked child, whose parent still holds
        the lock through the same open files."""
        self._ident = None
        self._tempname = None
        self.close()

    def close(self) -> None:
        try:
            self.release()
        finally:
            self._drop_busy()
            self._discard_record()
            if self._command_fd is not None:
                close(self._command_fd)
                self._command_fd = None
            if self._dirfd is not None:
                close(self._dirfd)
                self._dirfd = None

    def _open_dir(self) -> int:
        if self._dirfd is None:
            self._dirfd, self._name = open_parent(self.path, LockUnusable)
        return self._dirfd

    def _drop_busy(self) -> None:
        if self._busy_fd is not None:
            close(self._busy_fd)
            self._busy_fd = None

    def _record(self, fd: int, st: os.stat_result) -> Holder | None:
        """The record in a file another process may be using; raises if it is a hard link."""
        holder = Holder.decode(os.pread(fd, _READ_LIMIT, 0))
        # A lock has one link, but for a moment where records need names of their own
        # (no O_TMPFILE). More is someone's hard link to another file: say so.
        if st.st_nlink > 1 and (holder is None or self._anonymous):
            raise LockUnusable(self.path, f"has {st.st_nlink} hard links") from None
        return holder

    def _one_link(self, fd: int) -> None:
        """Raise if the file, a manual hold nobody else uses, is a hard link to another."""
        links = os.fstat(fd).st_nlink
        if links > 1:
            raise LockUnusable(self.path, f"has {links} hard links")

    # -- operations: what an operator sees and clears ----------------------------------

    def inspect(self) -> LockState:
        """What is at the path now, judged as a run would judge it, without disturbing one:
        no flock is taken where anything else can tell (see :func:`_flocked`). Raises
        ``LockUnusable`` for a path a run could not use."""
        dirfd = self._open_dir()
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open_existing(dirfd)
            if fd is None:
                return LockState(FREE)
            try:
                state = self._judge(fd)
                # The answer is about the file opened: is it still the one at the path?
                if still_named(dirfd, self._name, os.fstat(fd)):
                    return state
            except OSError as exc:
                raise LockUnusable(self.path, reason(exc)) from None
            finally:
                close(fd)
        raise self._keeps_changing()

    def _judge(self, fd: int) -> LockState:
        st = os.fstat(fd)
        why = check_ours(st)
        if why:
            raise LockUnusable(self.path, why)
        holder = self._record(fd, st)
        if holder is None:
            return LockState(MANUAL, None, st.st_mtime)
        alive = holder.is_alive()
        if alive:
            return LockState(HELD, holder, runner_running=_runner_running(holder))
        # A record from another host or boot (alive is None) is on a network file system,
        # whose other clients' locks this host's /proc/locks does not list.
        flocked = _flocked(st) if alive is False else None
        if flocked is None:
            flocked = _probe(fd)
        if not flocked:
            return LockState(STALE, holder)
        # Held with no runner or command alive: processes the command started hold it.
        return LockState(HELD, holder, runner_running=alive is None)

    def unlock(self, force: bool = False) -> LockState | None:
        """Remove a stale lock (with ``force``, a manual hold too) as a run taking it over
        would, so that a run doing that at the same moment is safe. Returns what was removed,
        None if there was no lock; raises ``LockBusy`` for a live lock or, without ``force``,
        a manual hold, and ``LockUnusable`` for a path a run could not use."""
        dirfd = self._open_dir()
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open_existing(dirfd)
            if fd is None:
                return None
            try:
                removed = self._take_over(dirfd, fd, force)
            finally:
                if fd != self._busy_fd:
                    close(fd)
            if removed is not None:
                return removed
        raise self._keeps_changing()


FREE, HELD, STALE, MANUAL = "free", "held", "stale", "manual"


class LockState:
    """What :meth:`FileLock.inspect` found: ``state`` is FREE, HELD (a live holder), STALE
    (a holder that is gone) or MANUAL (a file taskrunner did not write)."""

    __slots__ = ("holder", "runner_running", "since", "state")

    def __init__(
        self,
        state: str,
        holder: Holder | None = None,
        since: float | None = None,
        runner_running: bool = False,
    ) -> None:
        self.state = state
        #: The record; None when FREE or MANUAL.
        self.holder = holder
        #: When the hold began (Unix time): the record's start, or a manual hold's mtime.
        self.since = since if holder is None else (holder.started or None)
        #: Whether the run that wrote the record still runs: False when HELD only by its
        #: command or what that started; True where it cannot be told (another host).
        self.runner_running = runner_running


_INIT_PIDNS = 0xEFFFFFFC  # the inode of the kernel's first pid namespace (PROC_PID_INIT_INO)


def _runner_running(holder: Holder) -> bool:
    """Whether the runner of a live record (this boot's) runs; True if its pids are not ours."""
    if holder.pidns is not None and holder.pidns != pid_namespace():
        return True
    return running(holder.pid, holder.proc_start)


def _flocked(st: os.stat_result) -> bool | None:
    """Whether a process holds a flock on the file ``st`` describes, from /proc/locks; None
    if that cannot tell. Reading it stalls every flock on the machine for an RCU grace
    period: fine for an operator's look, never for a run."""
    try:
        with open("/proc/locks", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    inode = b":%d" % st.st_ino
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:01:1234 0 EOF"; a blocked waiter's has "->".
        if len(fields) > 5 and fields[1] == b"FLOCK" and fields[5].endswith(inode):
            # The device is not compared: btrfs subvolumes list another one than stat
            # gives. Another file's flock on the same inode number errs on the side of held.
            return True
    # In any other pid namespace, /proc/locks leaves out the flocks of processes it cannot
    # see, such as a dead runner's, which its command holds on: there, absence proves nothing.
    return False if pid_namespace() == _INIT_PIDNS else None


def _poll_flock(fd: int, deadline: float) -> bool:
    """Try for an exclusive flock on ``fd`` until ``deadline`` (``time.monotonic()``),
    napping longer each time up to ``_MAX_NAP``: True once it is won."""
    nap = _FIRST_NAP
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(nap, left))
        nap = min(nap * 2, _MAX_NAP)


def _probe(fd: int) -> bool:
    """Whether a process holds a flock on ``fd``'s file, found by trying to take one. Only
    where /proc/locks cannot tell: a run that tries the lock at this very moment is refused."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


__all__ = ["FREE", "HELD", "MANUAL", "STALE", "FileLock", "LockState"]
