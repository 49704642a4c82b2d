"""Start the command, watch it, pass signals on, stop it at its time limit.

Without a controlling terminal (cron, systemd, CI) the command runs in a process group of its
own, so a signal or the time limit reaches everything it started. With a terminal, it stays
in the caller's job, as ``timeout --foreground`` does: it can read the terminal, and Ctrl-C,
Ctrl-Z, ``fg``, ``bg`` and pipelines act on it exactly as if it had been started directly;
signals and the time limit then go to the command and the processes it started (found in
/proc), since its group is the caller's.

The runner waits with the signals it cares about blocked and taken by ``sigtimedwait``: no
handler runs at an awkward moment, and no signal is lost between two checks.
"""

from __future__ import annotations

import errno
import os
import time

from taskrunner.errors import CannotRun, Interrupted
from taskrunner.fsutil import close
from taskrunner.holder import process_start, running
from taskrunner.signals import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# Python ignores these at start-up; the command gets their defaults, as from a shell. Other
# signals keep what taskrunner was started with: handlers end at exec, SIG_IGN stays.
_RESET = (signal.SIGPIPE, signal.SIGXFSZ)
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent, e.g. the terminal's Ctrl-C
_POLL = 0.02  # how often to look for processes left in the group after a time limit
_LAST_WORDS = 2.0  # how long KILLed processes get to disappear
TIMED_OUT = 124
LOST = 74


class Heartbeat:
    """A check, every ``interval`` seconds while the command runs, that the lock is still
    held; ``check`` returns False once it is not."""

    __slots__ = ("check", "interval")

    def __init__(self, check: Callable[[], bool], interval: float) -> None:
        self.check = check
        self.interval = interval


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, as /proc shows them now."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _find(program: str, search: str) -> str:
    """Where ``program`` is, looked up in the PATH ``search`` as execvp does."""
    if "/" in program:
        return program
    for folder in search.split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return program


class Outcome:
    """How the command ended."""

    __slots__ = ("from_terminal", "lost", "signal", "status", "timed_out")

    def __init__(
        self,
        status: int,
        signal: int | None,
        timed_out: bool,
        from_terminal: bool,
        lost: bool = False,
    ):
        self.status = status
        self.signal = signal
        self.timed_out = timed_out
        #: The heartbeat failed: the lock was lost, and the command was stopped for it.
        self.lost = lost
        #: The signal that killed it came from the terminal (Ctrl-C, Ctrl-\).
        self.from_terminal = from_terminal

    @property
    def exit_status(self) -> int:
        """What taskrunner exits with: 74 when the lock was lost, 124 after the time limit,
        else the command's status, 128+N when signal N killed it."""
        return LOST if self.lost else TIMED_OUT if self.timed_out else self.status


def has_terminal() -> bool:
    """Whether this process has a controlling terminal."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError:
        return False
    return True


class Child:
    """The running command."""

    def __init__(
        self,
        argv: list[str],
        env: dict[bytes, bytes],
        *,
        path: str | None = None,
        pass_fds: tuple[int, ...] = (),
        ignored: frozenset[int] = frozenset(),
        output: tuple[int, int] | None = None,
    ) -> None:
        """Run ``argv``: the program is ``path`` if given, else ``argv[0]`` looked up in PATH
        as a shell would. ``ignored`` are the signals this process was started with ignored:
        the command inherits that, and the runner does not pass them on. ``output``, if
        given, are the descriptors to give the command as its stdout and stderr."""
        self.argv = argv
        self._path = path
        self._env = env
        self._pass_fds = pass_fds
        self._output = output
        self._ignored = ignored
        self._waited = {signal.SIGCHLD, *(s for s in FORWARDED if s not in ignored)}
        self.pid = 0
        self._reaped = False
        self.own_group = True
        self._saved_mask: set[int] | None = None
        self._saved_chld: object = None
        self._signalled: dict[int, int | None] = {}  # with a terminal: pid -> start time

    def block(self) -> None:
        """Hold back the signals :meth:`wait` takes, from now on: call before the last look
        at signals that came earlier, and before :meth:`start`, so that none is missed."""
        if self._saved_mask is None:
            # An inherited SIG_IGN for SIGCHLD would reap the command before we could.
            self._saved_chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._waited)

    def start(self) -> None:
        """Start the command. Raises :class:`CannotRun`."""
        self.own_group = not has_terminal()
        self.block()
        for fd in self._pass_fds:
            os.set_inheritable(fd, True)
        try:
            try:
                self.pid = self._spawn(self._path, self.argv)
            except OSError as exc:
                if exc.errno != errno.ENOEXEC or self._path is not None:
                    raise
                # A script without #!: run it with sh, as execvp and shells do.
                search = os.fsdecode(self._env.get(b"PATH", os.defpath.encode()))
                script = _find(self.argv[0], search)
                self.pid = self._spawn("/bin/sh", ["sh", script, *self.argv[1:]])
        except OSError as exc:
            self._restore_mask()
            not_found = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            why = "command not found" if not_found else os.strerror(exc.errno or 0).lower()
            raise CannotRun(self.argv[0], why, 127 if not_found else 126) from None
        except BaseException:  # Interrupted, or a library caller's argument spawn refuses
            self._restore_mask()
            raise
        finally:
            for fd in self._pass_fds:
                os.set_inheritable(fd, False)

    def _spawn(self, path: str | None, argv: list[str]) -> int:
        """Start ``argv`` (``path``, or ``argv[0]`` looked up in PATH), with the signal mask
        taskrunner was started with."""
        # A termination signal that came before the command exists means it must not run
        # (and with a terminal, one of the terminal's would otherwise reach nobody).
        early = signal.sigpending() & (self._waited - {signal.SIGCHLD})
        if early:
            sig = min(early)
            signal.sigtimedwait({sig}, 0)
            raise Interrupted(sig)
        mask = self._saved_mask or set()
        if not self.own_group:
            return self._fork_exec(path, argv, mask)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in self._redirections()]
        if path is None:
            return os.posix_spawnp(argv[0], argv, self._env, setpgroup=0, setsigmask=mask,
                                   setsigdef=_RESET, file_actions=actions or None)  # fmt: skip
        return os.posix_spawn(path, argv, self._env, setpgroup=0, setsigmask=mask,
                              setsigdef=_RESET, file_actions=actions or None)  # fmt: skip

    def _redirections(self) -> list[tuple[int, int]]:
        return [] if self._output is None else [(self._output[0], 1), (self._output[1], 2)]

    def _fork_exec(self, path: str | None, argv: list[str], mask: set[int]) -> int:
        """fork and exec, for a command in the terminal's job. posix_spawn's vfork would
        leave us unable to stop while the new process waits to exec: a Ctrl-Z at that
        moment would stop the command but not us, and the shell would wait forever."""
        report, errors = os.pipe()  # close-on-exec: an exec that works closes it
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.close(report)
                # Our handlers first, while still blocked: a Ctrl-C that comes now must
                # end this process as it would the command, not reach a handler of ours.
                for sig in (*FORWARDED, *_RESET):
                    if signal.getsignal(sig) != signal.SIG_IGN or sig in _RESET:
                        signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for fd, target in self._redirections():
                    os.dup2(fd, target)
                if path is None:
                    os.execvpe(argv[0], argv, self._env)
                os.execve(path, argv, self._env)
            except OSError as exc:
                os.write(errors, b"%d" % (exc.errno or 0))
            finally:
                os._exit(127)
        close(errors)
        with open(report, "rb") as f:
            failed = f.read()
        if failed:
            os.waitpid(pid, 0)
            raise OSError(int(failed), os.strerror(int(failed)))
        return pid

    def wait(
        self,
        timeout: float,
        kill_after: float,
        early: list[int],
        heartbeat: Heartbeat | None = None,
        reap_every: float | None = None,
    ) -> Outcome:
        """Wait for the command to end, passing on the termination signals the runner gets;
        at ``timeout`` seconds (0: never) send TERM, then KILL ``kill_after`` later (0: KILL
        at once). ``early`` holds signals that reached a handler just before they were
        blocked: they are passed on first. A ``heartbeat`` that fails stops the command the
        same way, at once. ``reap_every``: also look for the command's end that often, for
        a process with other threads, any of which may take the SIGCHLD (and drop it)."""
        try:
            return self._wait(timeout, kill_after, early, heartbeat, reap_every)
        finally:
            self._restore_mask()

    def _wait(
        self,
        timeout: float,
        kill_after: float,
        early: list[int],
        heartbeat: Heartbeat | None,
        reap_every: float | None,
    ) -> Outcome:
        deadline = time.monotonic() + timeout if timeout > 0 else None
        # Once stopping (the time limit, or a lock lost), ``deadline`` is when KILL is due.
        stopping = timed_out = lost = terminal = False
        beat = None if heartbeat is None else time.monotonic() + heartbeat.interval
        while early:
            sig = early.pop(0)
            terminal = terminal or (not self.own_group and sig in (signal.SIGINT, signal.SIGQUIT))
            self.send(sig)
        while True:
            look = None if reap_every is None else time.monotonic() + reap_every
            wake = min((t for t in (deadline, beat, look) if t is not None), default=None)
            if wake is None:
                info: signal.struct_siginfo | None = signal.sigwaitinfo(self._waited)
            else:
                info = signal.sigtimedwait(self._waited, max(0.0, wake - time.monotonic()))
            if info is None:
                status = None if reap_every is None else self._reap()
                if status is not None:
                    return self._ended(status, stopping, deadline, timed_out, terminal, lost)
                if beat is not None and time.monotonic() >= beat:
                    assert heartbeat is not None
                    if heartbeat.check():
                        beat = time.monotonic() + heartbeat.interval
                        continue
                    beat, lost = None, True  # stop the command now, as at a time limit
                    if stopping:
                        continue
                    deadline = time.monotonic()
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = timed_out or not (stopping or lost)
                    deadline = self._time_up(stopping, kill_after)
                    stopping = True
            elif info.si_signo != signal.SIGCHLD:
                if self.own_group or info.si_code != _SI_KERNEL:
                    self.send(info.si_signo)
                else:
                    terminal = True  # the terminal signalled the whole job, the command too
            else:
                status = self._reap()
                if status is not None:
                    return self._ended(status, stopping, deadline, timed_out, terminal, lost)

    def _ended(
        self,
        status: int,
        stopping: bool,
        deadline: float | None,
        timed_out: bool,
        terminal: bool,
        lost: bool,
    ) -> Outcome:
        """The command has ended with wait ``status``: wait for the rest of its group if it
        was being stopped, and say how it ended."""
        if stopping:
            self._finish_group(deadline)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return Outcome(128 + sig, sig, timed_out, terminal, lost)
        return Outcome(os.WEXITSTATUS(status), None, timed_out, False, lost)

    def _time_up(self, timed_out: bool, kill_after: float) -> float | None:
        """Act on the time limit (TERM, or KILL at once) or on the end of the grace after
        it (KILL); the next deadline."""
        if not timed_out and kill_after > 0:
            self.send(signal.SIGTERM)
            return time.monotonic() + kill_after
        self.send(signal.SIGKILL)
        return None

    def _finish_group(self, kill_at: float | None) -> None:
        """After a time limit: the command has ended, but what it started may still run.
        Wait for the rest of its group until the KILL is due, then KILL it."""
        end = (time.monotonic() if kill_at is None else kill_at) + _LAST_WORDS
        killed = kill_at is None
        while self._group_alive() and time.monotonic() < end:
            if not killed and time.monotonic() >= (kill_at or 0.0):
                self.send(signal.SIGKILL)
                killed = True
            time.sleep(_POLL)

    def _group_alive(self) -> bool:
        if not self.own_group:
            return any(running(p, start) for p, start in self._signalled.items() if p != self.pid)
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def send(self, signo: int) -> None:
        """Signal the command: its whole group when it has one; else the command and every
        process it started, and every process signalled before that still runs."""
        if self.own_group:
            try:
                os.killpg(self.pid, signo)
                if signo != signal.SIGKILL:
                    os.killpg(self.pid, signal.SIGCONT)  # a stopped process acts on it then
            except (ProcessLookupError, PermissionError):
                pass
            return
        for pid in (self.pid, *_descendants(self.pid)):
            self._signalled.setdefault(pid, process_start(pid))
        for pid, start in self._signalled.items():
            if running(pid, start):
                try:
                    os.kill(pid, signo)
                except (ProcessLookupError, PermissionError):
                    pass

    def _reap(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        self._reaped = bool(pid)
        return status if pid else None

    def stop(self) -> None:
        """KILL the command and what it started, and reap it: for when it can no longer be
        watched. Nothing is sent once it has been reaped (its pid may be another's now)."""
        if self.pid == 0 or self._reaped:
            return
        self.send(signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._reaped = True

    def unblock(self) -> None:
        """Undo :meth:`block` when the command is not going to be started after all."""
        self._restore_mask()

    def _restore_mask(self) -> None:
        if self._saved_mask is not None:
            # What a library caller had for SIGCHLD, back while the signal is still blocked.
            if self._saved_chld not in (None, signal.SIG_DFL):
                signal.signal(signal.SIGCHLD, self._saved_chld)  # type: ignore[arg-type]
            self._saved_chld = None
            signal.pthread_sigmask(signal.SIG_SETMASK, self._saved_mask)
            self._saved_mask = None
