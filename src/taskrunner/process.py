"""Start the command, watch it, pass signals on, stop it at its time limit.

The command runs in its own process group, so a signal or a time limit reaches everything it
started. The runner waits with the signals it cares about blocked and taken by
``sigtimedwait``: no handler runs at an awkward moment and no signal is lost between checks.
Run from a terminal, the command's group is made the terminal's foreground group (as a
shell does for a job), so it can read the terminal and Ctrl-C / Ctrl-Z reach it; when
Ctrl-Z stops it, the runner stops too, so the shell sees the job stopped, and ``fg`` resumes
both.
"""

from __future__ import annotations

import errno
import os
import time

from taskrunner.errors import CannotRun
from taskrunner.signals import signal

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_WAITED = {signal.SIGCHLD, signal.SIGTTOU, *FORWARDED}
# Signals whose disposition Python or taskrunner changed; the command gets their defaults.
_RESET = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGALRM,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGTTOU,
    signal.SIGTTIN,
    signal.SIGTSTP,
)
TIMED_OUT = 124


class Outcome:
    """How the command ended."""

    __slots__ = ("signal", "status", "timed_out")

    def __init__(self, status: int, signal: int | None, timed_out: bool) -> None:
        self.status = status
        self.signal = signal
        self.timed_out = timed_out

    @property
    def exit_status(self) -> int:
        """What taskrunner exits with: 124 after the time limit, else the command's status,
        128+N when signal N killed it."""
        return TIMED_OUT if self.timed_out else self.status


def _controlling_terminal() -> int | None:
    """A descriptor for our terminal if we are its foreground job, else None."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


class Child:
    """The running command."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        path: str | None = None,
        pass_fds: tuple[int, ...] = (),
        keep_ignored: frozenset[int] = frozenset(),
    ) -> None:
        """Run ``argv``; the program is ``path`` if given, else ``argv[0]`` looked up in PATH
        as a shell would."""
        self.argv = argv
        self._path = path
        self._env = env
        self._pass_fds = pass_fds
        self._keep_ignored = keep_ignored
        self.pid = 0
        self._tty: int | None = None

    def start(self) -> None:
        """Start the command; the caller has blocked :data:`_WAITED` already (see
        :func:`block_signals`). Raises :class:`CannotRun`."""
        self._tty = _controlling_terminal()
        spawn = os.posix_spawnp if self._path is None else os.posix_spawn
        for fd in self._pass_fds:
            os.set_inheritable(fd, True)
        try:
            self.pid = spawn(
                self._path or self.argv[0],
                self.argv,
                self._env,
                setpgroup=0,
                setsigmask=(),
                setsigdef=[s for s in _RESET if s not in self._keep_ignored],
            )
        except OSError as exc:
            self._close_tty()
            not_found = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            why = "command not found" if not_found else os.strerror(exc.errno or 0).lower()
            raise CannotRun(self.argv[0], why, 127 if not_found else 126) from None
        finally:
            for fd in self._pass_fds:
                os.set_inheritable(fd, False)
        self._give_terminal()

    def wait(self, timeout: float, kill_after: float, early: list[int]) -> Outcome:
        """Wait for the command to end; pass on the termination signals the runner gets;
        at ``timeout`` seconds (0: never) send TERM, then KILL ``kill_after`` later.
        ``early`` holds signals that reached a handler just before they were blocked: they
        are passed on first."""
        now = time.monotonic()
        deadline = now + timeout if timeout > 0 else None
        timed_out = False
        while early:
            self.signal_group(early.pop(0))
        while True:
            wait_for = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait_for is None:
                info = signal.sigwaitinfo(_WAITED)
                signo: int | None = info.si_signo
            else:
                got = signal.sigtimedwait(_WAITED, wait_for)
                signo = got.si_signo if got is not None else None
            if signo is None:  # the time limit, or the grace after it
                if not timed_out:
                    timed_out = True
                    if kill_after > 0:
                        self.signal_group(signal.SIGTERM)
                        deadline = time.monotonic() + kill_after
                        continue
                self.signal_group(signal.SIGKILL)
                deadline = None
            elif signo in FORWARDED:
                self.signal_group(signo)
            elif signo == signal.SIGCHLD:
                outcome = self._reap(timed_out)
                if outcome is not None:
                    return outcome

    def signal_group(self, signo: int) -> None:
        try:
            os.killpg(self.pid, signo)
            if signo != signal.SIGKILL:
                os.killpg(self.pid, signal.SIGCONT)  # a stopped group acts on it only then
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, timed_out: bool) -> Outcome | None:
        flags = os.WNOHANG | (os.WUNTRACED if self._tty is not None else 0)
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            return Outcome(255, None, timed_out)
        if pid == 0:
            return None
        if os.WIFSTOPPED(status):
            self._stopped(os.WSTOPSIG(status))
            return None
        self._take_terminal_back()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return Outcome(128 + sig, sig, timed_out)
        return Outcome(os.WEXITSTATUS(status), None, timed_out)

    def _stopped(self, sig: int) -> None:
        """The command stopped while we run it from a terminal."""
        tty = self._tty
        assert tty is not None
        if sig in (signal.SIGTTIN, signal.SIGTTOU) and self._owns_terminal():
            # It reached the terminal before we handed it over: let it go on.
            self.signal_group(signal.SIGCONT)
            return
        # Ctrl-Z (or a stop): stop with it, as the job the shell knows is us.
        self._take_terminal_back()
        os.killpg(os.getpgrp(), signal.SIGSTOP)
        # Resumed. In the foreground (fg) the command gets the terminal again; in the
        # background (bg) it runs on without it.
        self._give_terminal()
        self.signal_group(signal.SIGCONT)

    def _owns_terminal(self) -> bool:
        try:
            return self._tty is not None and os.tcgetpgrp(self._tty) == self.pid
        except OSError:
            return False

    def _give_terminal(self) -> None:
        if self._tty is None:
            return
        try:
            if os.tcgetpgrp(self._tty) == os.getpgrp():
                os.tcsetpgrp(self._tty, self.pid)
        except OSError:
            pass

    def _take_terminal_back(self) -> None:
        if self._tty is None:
            return
        try:
            if os.tcgetpgrp(self._tty) == self.pid:
                os.tcsetpgrp(self._tty, os.getpgrp())
        except OSError:
            pass

    def _close_tty(self) -> None:
        if self._tty is not None:
            os.close(self._tty)
            self._tty = None

    def close(self) -> None:
        self._take_terminal_back()
        self._close_tty()


def block_signals() -> set[int]:
    """Block the signals :meth:`Child.wait` takes; returns the previous mask. Call before
    :meth:`Child.start`, so that not even an immediate exit is missed."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN would reap for us
    return signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)


def restore_signals(mask: set[int]) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
