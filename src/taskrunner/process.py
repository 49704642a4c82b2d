"""Start the command, watch it, pass signals on, stop it at its time limit.

Without a controlling terminal (cron, systemd, CI) the command runs in a process group of its
own, so a signal or the time limit reaches everything it started. With a terminal, it stays
in the caller's job, as ``timeout --foreground`` does: it can read the terminal, and Ctrl-C,
Ctrl-Z, ``fg``, ``bg`` and pipelines act on it exactly as if it had been started directly;
signals and the time limit then go to the command's own process.

The runner waits with the signals it cares about blocked and taken by ``sigtimedwait``: no
handler runs at an awkward moment, and no signal is lost between two checks.
"""

from __future__ import annotations

import errno
import os
import time

from taskrunner.errors import CannotRun
from taskrunner.signals import signal

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# Signals whose disposition Python or taskrunner changed; the command gets their defaults.
_RESET = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM,
    signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ,
)  # fmt: skip
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent, e.g. the terminal's Ctrl-C
_POLL = 0.02  # how often to look for processes left in the group after a time limit
_LAST_WORDS = 2.0  # how long KILLed processes get to disappear
TIMED_OUT = 124


class Outcome:
    """How the command ended."""

    __slots__ = ("from_terminal", "signal", "status", "timed_out")

    def __init__(self, status: int, signal: int | None, timed_out: bool, from_terminal: bool):
        self.status = status
        self.signal = signal
        self.timed_out = timed_out
        #: The signal that killed it came from the terminal (Ctrl-C, Ctrl-\).
        self.from_terminal = from_terminal

    @property
    def exit_status(self) -> int:
        """What taskrunner exits with: 124 after the time limit, else the command's status,
        128+N when signal N killed it."""
        return TIMED_OUT if self.timed_out else self.status


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
        env: dict[str, str],
        *,
        path: str | None = None,
        pass_fds: tuple[int, ...] = (),
        ignored: frozenset[int] = frozenset(),
    ) -> None:
        """Run ``argv``: the program is ``path`` if given, else ``argv[0]`` looked up in PATH
        as a shell would. ``ignored`` are the signals this process was started with ignored:
        the command inherits that, and the runner does not pass them on."""
        self.argv = argv
        self._path = path
        self._env = env
        self._pass_fds = pass_fds
        self._ignored = ignored
        self._waited = {signal.SIGCHLD, *(s for s in FORWARDED if s not in ignored)}
        self.pid = 0
        self.own_group = True
        self._saved_mask: set[int] | None = None

    def start(self) -> None:
        """Start the command. Raises :class:`CannotRun`."""
        self.own_group = not has_terminal()
        # An inherited SIG_IGN for SIGCHLD would reap the command before we could.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Blocked before the command exists, so not even an immediate exit is missed.
        self._saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._waited)
        program = self._path or self.argv[0]
        defaults: list[int] = [s for s in _RESET if s not in self._ignored]
        for fd in self._pass_fds:
            os.set_inheritable(fd, True)
        try:
            if self.own_group:
                spawn = os.posix_spawnp if self._path is None else os.posix_spawn
                self.pid = spawn(program, self.argv, self._env, setpgroup=0, setsigmask=(),
                                 setsigdef=defaults)  # fmt: skip
            else:
                self.pid = self._fork_exec(program, defaults)
        except OSError as exc:
            self._restore_mask()
            not_found = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            why = "command not found" if not_found else os.strerror(exc.errno or 0).lower()
            raise CannotRun(self.argv[0], why, 127 if not_found else 126) from None
        finally:
            for fd in self._pass_fds:
                os.set_inheritable(fd, False)

    def _fork_exec(self, program: str, defaults: list[int]) -> int:
        """fork and exec, for a command in the terminal's job. posix_spawn's vfork would
        leave us unable to stop while the new process waits to exec: a Ctrl-Z at that
        moment would stop the command but not us, and the shell would wait forever."""
        report, errors = os.pipe()  # close-on-exec: an exec that works closes it
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.close(report)
                for sig in defaults:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                if self._path is None:
                    os.execvpe(program, self.argv, self._env)
                os.execve(program, self.argv, self._env)
            except OSError as exc:
                os.write(errors, b"%d" % (exc.errno or 0))
            finally:
                os._exit(127)
        os.close(errors)
        with open(report, "rb") as f:
            failed = f.read()
        if failed:
            os.waitpid(pid, 0)
            raise OSError(int(failed), os.strerror(int(failed)))
        return pid

    def wait(self, timeout: float, kill_after: float, early: list[int]) -> Outcome:
        """Wait for the command to end, passing on the termination signals the runner gets;
        at ``timeout`` seconds (0: never) send TERM, then KILL ``kill_after`` later (0: KILL
        at once). ``early`` holds signals that reached a handler just before they were
        blocked: they are passed on first."""
        try:
            return self._wait(timeout, kill_after, early)
        finally:
            self._restore_mask()

    def _wait(self, timeout: float, kill_after: float, early: list[int]) -> Outcome:
        deadline = time.monotonic() + timeout if timeout > 0 else None
        timed_out = terminal = False
        while early:
            self.send(early.pop(0))
        while True:
            if deadline is None:
                info: signal.struct_siginfo | None = signal.sigwaitinfo(self._waited)
            else:
                info = signal.sigtimedwait(self._waited, max(0.0, deadline - time.monotonic()))
            if info is None:  # the time limit, or the grace after it
                deadline = self._time_up(timed_out, kill_after)
                timed_out = True
            elif info.si_signo != signal.SIGCHLD:
                if self.own_group or info.si_code != _SI_KERNEL:
                    self.send(info.si_signo)
                else:
                    terminal = True  # the terminal signalled the whole job, the command too
            else:
                status = self._reap()
                if status is None:
                    continue
                if timed_out and self.own_group:
                    self._finish_group(deadline)
                if os.WIFSIGNALED(status):
                    sig = os.WTERMSIG(status)
                    return Outcome(128 + sig, sig, timed_out, terminal)
                return Outcome(os.WEXITSTATUS(status), None, timed_out, False)

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
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def send(self, signo: int) -> None:
        """Signal the command: its whole group when it has one, else its process."""
        try:
            if not self.own_group:
                os.kill(self.pid, signo)
                return
            os.killpg(self.pid, signo)
            if signo != signal.SIGKILL:
                os.killpg(self.pid, signal.SIGCONT)  # a stopped process acts on it only then
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 255 << 8
        return status if pid else None

    def _restore_mask(self) -> None:
        if self._saved_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._saved_mask)
            self._saved_mask = None
