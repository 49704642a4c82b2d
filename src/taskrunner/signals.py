"""Termination signals while taskrunner waits, and blocking calls that a deadline can cut.

Python retries a system call that a signal interrupts (PEP 475) unless the signal's handler
raises, so a handler that raises is the one way to stop a blocking ``flock``. A signal that
lands between the last check and the system call would be missed, so the timer also ticks
while armed: a missed wake-up costs at most one tick.
"""

from __future__ import annotations

import time

from taskrunner.errors import Interrupted

__all__ = ["TERMINATING", "SignalWatch", "signal"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Callable
else:
    try:  # the C module: the same calls without signal.py's enums, 0.5 ms less at start-up
        import _signal as signal
    except ImportError:
        import signal

TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_TICK = 0.05


class _Wakeup(BaseException):
    """Raised by a handler to cut a blocking call short; never escapes this module."""


class SignalWatch:
    """Records the termination signals that arrive before the command runs.

    Signals this process was started with ignored (``nohup``, a background job of a script)
    stay ignored, and are listed in ``ignored`` so the command inherits that too.
    """

    def __init__(self, signals: tuple[int, ...] = TERMINATING) -> None:
        self.pending: list[int] = []
        self.ignored: set[int] = set()
        self._saved: dict[int, object] = {}
        self._signals = signals
        self._armed = False
        self._deadline = 0.0

    def install(self) -> None:
        for sig in self._signals:
            old = signal.getsignal(sig)
            if old == signal.SIG_IGN:
                self.ignored.add(sig)
                continue
            if old is None:  # a handler set outside Python (an embedding program): leave it
                continue
            self._saved[sig] = old
            signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._saved.clear()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a termination signal has arrived."""
        if self.pending:
            raise Interrupted(self.pending[0])

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)
        if self._armed:
            self._armed = False
            raise _Wakeup

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._armed and (self.pending or time.monotonic() >= self._deadline):
            self._armed = False
            raise _Wakeup

    def call_until(self, call: Callable[[], object], deadline: float) -> bool:
        """Run the blocking ``call`` until it returns (True) or ``deadline`` (a
        ``time.monotonic()`` value) passes (False). A termination signal raises
        :class:`Interrupted`. Main thread only, as Python's signal handlers are."""
        # A library caller's own timer, if it has one running, is held back meanwhile.
        caller_timer = signal.setitimer(signal.ITIMER_REAL, 0)
        began = time.monotonic()
        old_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
        self._deadline = deadline
        done = False
        try:
            try:
                self._armed = True
                remaining = deadline - time.monotonic()
                if not self.pending and remaining > 0:
                    signal.setitimer(signal.ITIMER_REAL, min(remaining, _TICK), _TICK)
                    call()
                    done = True
            except _Wakeup:
                pass
            self._armed = False
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_alarm)
            _resume_timer(caller_timer, time.monotonic() - began)
        self.check()
        return done


def _resume_timer(timer: tuple[float, float], spent: float) -> None:
    """Set again a timer a library caller had running (``setitimer``'s ``(delay,
    interval)``), less the time ``spent`` meanwhile; raise its SIGALRM if it ran out."""
    delay, interval = timer
    if delay <= 0:
        return
    left = delay - spent
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, left, interval)
        return
    if interval > 0:
        signal.setitimer(signal.ITIMER_REAL, interval, interval)
    signal.raise_signal(signal.SIGALRM)
