"""Telling the outside world that a job looks stuck, or that a dead holder's lock was taken
over: a hook command run through ``sh``, and a JSON POST to a URL (a webhook, a
Healthchecks-style endpoint). Both are bounded in time, both failing is only a warning: they
never change the run's exit status.

Only a run that has such an event to tell imports this module, and only a run with a URL
imports ``urllib``.
"""

from __future__ import annotations

import os
import time

from taskrunner.signals import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess

    from taskrunner.holder import Holder
    from taskrunner.report import Reporter

STUCK = "stuck"
STALE = "stale"
_TERM_GRACE = 1.0  # seconds a hook gets after TERM before KILL, once its time is up


def iso8601(when: float) -> str:
    """``2026-12-04T19:58:38+00:00``: local time with its offset."""
    from datetime import datetime

    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")


class Event:
    """What happened to a job: ``stuck`` (a report fired) or ``stale`` (a run took over the
    lock of a holder that died)."""

    __slots__ = ("count", "holder", "kind", "lockfile", "message", "name", "since", "time")

    def __init__(
        self,
        kind: str,
        *,
        name: str,
        lockfile: str,
        count: int,
        holder: Holder | None,
        since: float | None,
        message: str,
    ) -> None:
        self.kind = kind
        self.name = name
        self.lockfile = lockfile
        self.count = count
        self.holder = holder
        """The holder's record; None for a manual hold."""
        self.since = since
        """When the hold began (Unix time), if known."""
        self.message = message
        self.time = time.time()

    def environ(self) -> dict[bytes, bytes]:
        """The variables a hook gets, besides the runner's own environment."""
        values = {
            "TASKRUNNER_EVENT": self.kind,
            "TASKRUNNER_NAME": self.name,
            "TASKRUNNER_LOCKFILE": self.lockfile,
            "TASKRUNNER_COUNT": str(self.count),
            "TASKRUNNER_HOLDER_PID": "" if self.holder is None else str(self.holder.pid),
            "TASKRUNNER_HOLDER_HOST": "" if self.holder is None else self.holder.host,
            "TASKRUNNER_HOLDER_SINCE": "" if self.since is None else iso8601(self.since),
        }
        return {os.fsencode(k): os.fsencode(v) for k, v in values.items()}

    def payload(self) -> dict[str, object]:
        """The JSON body of the POST."""
        holder = None
        if self.holder is not None:
            holder = {
                "pid": self.holder.pid,
                "host": self.holder.host,
                "since": iso8601(self.holder.started),
                "command": self.holder.command,
            }
        return {
            "event": self.kind,
            "name": self.name,
            "lockfile": self.lockfile,
            "count": self.count,
            "holder": holder,
            "since": None if self.since is None else iso8601(self.since),
            "host": os.uname().nodename,
            "time": iso8601(self.time),
            "message": self.message,
        }


def deliver(
    event: Event, hook: str | None, url: str | None, timeout: float, reporter: Reporter
) -> None:
    """Run ``hook`` and POST to ``url`` (either may be None), side by side, each cut off
    after ``timeout`` seconds."""
    poster = None
    if url is not None:
        import threading

        failure: list[str] = []
        # A thread, so that a name lookup, which no socket timeout covers, cannot hold the run
        # beyond the bound either: one still running at the end is abandoned.
        poster = threading.Thread(target=_post, args=(url, event, timeout, failure), daemon=True)
        # Born with every signal blocked, so that it never takes one meant for the runner:
        # the command's SIGCHLD, or a TERM to pass on, while the runner waits in sigwaitinfo
        # with them blocked, would otherwise go to this thread and be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            poster.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    end = time.monotonic() + timeout
    if hook is not None:
        _run_hook(hook, event, timeout, reporter)
    if poster is not None:
        poster.join(max(0.0, end - time.monotonic()))
        if poster.is_alive():
            reporter.warning("notify", f"{event.name}: {url}: no answer within {timeout:g}s")
        elif failure:
            reporter.warning("notify", f"{event.name}: {url}: {failure[0]}")
        else:
            reporter.info("notify", f"{event.name}: posted the {event.kind} event to {url}")


def _run_hook(hook: str, event: Event, timeout: float, reporter: Reporter) -> None:
    import subprocess

    env = dict(os.environb)
    env.update(event.environ())
    option = "--on-stuck" if event.kind == STUCK else "--on-recover"
    try:
        # Its output goes to stderr: the run's stdout is the command's alone. A group of its
        # own, so that cutting it off reaches whatever it started.
        proc = subprocess.Popen(
            ["/bin/sh", "-c", hook],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=2,
            start_new_session=True,
        )
    except OSError as exc:
        reporter.warning("hook", f"{event.name}: {option} hook could not start: {exc.strerror}")
        return
    try:
        status = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        reporter.warning("hook", f"{event.name}: {option} hook cut off after {timeout:g}s")
        return
    if status != 0:
        how = f"signal {-status}" if status < 0 else f"status {status}"
        reporter.warning("hook", f"{event.name}: {option} hook failed with {how}")
    else:
        reporter.info("hook", f"{event.name}: {option} hook ran")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    import subprocess

    for sig, grace in ((signal.SIGTERM, _TERM_GRACE), (signal.SIGKILL, _TERM_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass


def _post(url: str, event: Event, timeout: float, failure: list[str]) -> None:
    import json
    import urllib.error
    import urllib.request

    body = json.dumps(event.payload()).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "taskrunner"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        failure.append(f"the server answered {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
        why = exc.reason
        failure.append(why.strerror if isinstance(why, OSError) and why.strerror else str(why))
    except (OSError, ValueError) as exc:
        failure.append(str(exc) or type(exc).__name__)
