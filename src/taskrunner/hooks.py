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

from taskrunner.errors import Interrupted
from taskrunner.holder import iso8601
from taskrunner.signals import SignalWatch, signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess

    from taskrunner.holder import Holder
    from taskrunner.report import Reporter

STUCK = "stuck"
STALE = "stale"
_TERM_GRACE = 1.0  # seconds a hook gets after TERM before KILL, once its time is up
_POLL = 0.02


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
            "TASKRUNNER_HOLDER_SINCE": iso8601(self.since) or "",
        }
        # No NUL can be in an environment; a crafted record could hold one.
        return {os.fsencode(k): os.fsencode(v).replace(b"\0", b"") for k, v in values.items()}

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
            "since": iso8601(self.since),
            "host": os.uname().nodename,
            "time": iso8601(self.time),
            "message": self.message,
        }


def deliver(
    event: Event,
    hook: str | None,
    url: str | None,
    timeout: float,
    reporter: Reporter,
    watch: SignalWatch,
) -> None:
    """Run ``hook`` and POST to ``url`` (either may be None), side by side, both cut off
    after ``timeout`` seconds. A termination signal cuts them short too: the hook is stopped
    and :class:`Interrupted` raised, as anywhere before the command runs."""
    end = time.monotonic() + timeout
    post = None if url is None else _Post(url, event, timeout)
    if hook is not None:
        _run_hook(hook, event, timeout, end, reporter, watch)
    if post is None:
        return
    # Not Thread.join cut short by a signal: that leaves the thread marked as ended.
    while not post.done.wait(_POLL) and time.monotonic() < end:
        watch.check()
    watch.check()
    if not post.done.is_set():
        reporter.warning("notify", f"{event.name}: {url}: no answer within {timeout:g}s")
    elif post.failure:
        reporter.warning("notify", f"{event.name}: {url}: {post.failure}")
    else:
        reporter.info("notify", f"{event.name}: posted the {event.kind} event to {url}")


def _run_hook(
    hook: str, event: Event, timeout: float, end: float, reporter: Reporter, watch: SignalWatch
) -> None:
    import subprocess

    env = dict(os.environb)
    env.update(event.environ())
    option = f"{event.name}: --on-{'stuck' if event.kind == STUCK else 'recover'} hook"
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
    except (OSError, ValueError) as exc:
        reporter.warning("hook", f"{option} could not start: {exc}")
        return
    try:
        finished = watch.call_until(proc.wait, end)
    except Interrupted as exc:
        _stop_group(proc)
        reporter.warning("hook", f"{option} stopped: signal {exc.signum} arrived")
        raise
    if not finished:
        _stop_group(proc)
        reporter.warning("hook", f"{option} cut off after {timeout:g}s")
    elif proc.returncode != 0:
        status = proc.returncode
        how = f"signal {-status}" if status < 0 else f"status {status}"
        reporter.warning("hook", f"{option} failed with {how}")
    else:
        reporter.info("hook", f"{option} ran")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM to the hook's process group, KILL a moment later to what is left of it: the hook
    may end at the TERM while what it started does not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            break  # the group is gone
        end = time.monotonic() + _TERM_GRACE
        while time.monotonic() < end:
            proc.poll()  # reap the hook itself, which keeps its group alive as a zombie
            try:
                os.killpg(proc.pid, 0)
            except OSError:
                return
            time.sleep(_POLL)
    proc.poll()


class _Post:
    """The POST of an event, under way in a thread of its own, so that even a name lookup,
    which no socket timeout covers, cannot hold the run beyond the bound: a POST still
    under way at the end is abandoned."""

    def __init__(self, url: str, event: Event, timeout: float) -> None:
        import threading

        self.failure: str | None = None
        self.done = threading.Event()
        thread = threading.Thread(target=self._run, args=(url, event, timeout), daemon=True)
        # Born with every signal blocked, so that it never takes one meant for the runner:
        # the command's SIGCHLD, or a TERM to pass on, while the runner waits in sigwaitinfo
        # with them blocked, would otherwise go to this thread and be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _run(self, url: str, event: Event, timeout: float) -> None:
        try:
            _post(url, event, timeout)
        except Exception as exc:  # whatever it was, the run goes on, and says so
            self.failure = _failure(exc)
        finally:
            self.done.set()


def _post(url: str, event: Event, timeout: float) -> None:
    import json
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        # Following one would turn the POST into a GET without the event.
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    request = urllib.request.Request(
        url,
        data=json.dumps(event.payload()).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "taskrunner"},
    )
    with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as response:
        response.read(65536)


def _failure(exc: Exception) -> str:
    """What went wrong with a POST, in a few words."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        moved = " (redirects are not followed: give the final URL)" if 300 <= exc.code < 400 else ""
        return f"the server answered {exc.code} {exc.reason}{moved}"
    why: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(why, OSError) and why.strerror:
        return why.strerror
    return str(why) or type(why).__name__
