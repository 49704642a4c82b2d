"""The metrics file: Prometheus text format for node_exporter's textfile collector.

After every invocation, :func:`record` rewrites the file with the job's series, each labelled
``name="<the job's name>"``::

    taskrunner_last_start_timestamp_seconds       when the command last started
    taskrunner_last_duration_seconds              how long its last run took
    taskrunner_last_exit_status                   its last run's exit status (124: timed out)
    taskrunner_last_invocation_timestamp_seconds  when taskrunner was last invoked (its end)
    taskrunner_last_invocation_status             that invocation's exit status (75, 76, 71...)
    taskrunner_consecutive_refusals               refusals since the command last ran
    taskrunner_runs_total                         runs of the command (counter)
    taskrunner_refusals_total                     refusals, the lock being busy (counter)
    taskrunner_reports_total                      stuck reports (counter)
    taskrunner_lock_held                          1 if the lock is held as this is written

The first three are left out until the command has run, and kept as they were by an
invocation that did not run it. What must carry over from one invocation to the next is read
back from the file: only lines of these series with a ``name`` label and nothing else, whose
values are of the right form; anything else in the file is dropped, and a series with no
such line starts from nothing (a count from 0). Several jobs may share one file: each
rewrites its own lines and keeps the others' (up to 4 MiB in all).

The file is replaced whole, as the counter is (see :mod:`taskrunner.replaced`): concurrent
invocations lose no update and a reader never sees a partial file. The file is mode 0644
whatever the umask, since the collector usually runs as another user; and since any user
who can read it could flock it, updates are serialised on the flock of a sidecar,
``NAME.lock``, mode 0600, that only its owner can open. The temp file is ``NAME.tmp``; the
collector, reading ``*.prom``, skips both.
"""

from __future__ import annotations

import math

from taskrunner.errors import MetricsUnusable
from taskrunner.fsutil import close
from taskrunner.replaced import Replaced
from taskrunner.signals import SignalWatch

__all__ = ["SERIES", "Invocation", "escape", "parse", "record", "render", "update"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    Value = float  # int or float
    Samples = dict[str, dict[str, Value]]
    """Job name -> series -> value, in the order the names appear in the file."""

#: Larger content is not a file this module wrote, and is started over.
_READ_LIMIT = 4 << 20
_MAX_DIGITS = 18

# The kinds of value a series holds, by how they are read back and written.
_SECONDS, _STATUS, _COUNT, _FLAG = range(4)

LAST_START = "taskrunner_last_start_timestamp_seconds"
LAST_DURATION = "taskrunner_last_duration_seconds"
LAST_EXIT = "taskrunner_last_exit_status"
INVOCATION_TIME = "taskrunner_last_invocation_timestamp_seconds"
INVOCATION_STATUS = "taskrunner_last_invocation_status"
CONSECUTIVE = "taskrunner_consecutive_refusals"
RUNS = "taskrunner_runs_total"
REFUSALS = "taskrunner_refusals_total"
REPORTS = "taskrunner_reports_total"
HELD = "taskrunner_lock_held"

#: Every series: its name, type, kind of value and help text, in the file's order.
SERIES = (
    (LAST_START, "gauge", _SECONDS, "When the command last started, in seconds since the epoch."),
    (LAST_DURATION, "gauge", _SECONDS, "How long the last run of the command took, in seconds."),
    (LAST_EXIT, "gauge", _STATUS,
     "Exit status of the last run of the command (124: stopped at its time limit)."),
    (INVOCATION_TIME, "gauge", _SECONDS,
     "When taskrunner was last invoked for the job (as it ended), in seconds since the epoch."),
    (INVOCATION_STATUS, "gauge", _STATUS,
     "Exit status of taskrunner's last invocation for the job (75: refused, busy; "
     "76: refused and reported stuck; 71: unusable lock)."),
    (CONSECUTIVE, "gauge", _COUNT, "Refusals since the command last ran."),
    (RUNS, "counter", _COUNT, "Runs of the command."),
    (REFUSALS, "counter", _COUNT, "Invocations refused because the lock was busy."),
    (REPORTS, "counter", _COUNT, "Refusals that reported the job as stuck."),
    (HELD, "gauge", _FLAG, "Whether the job's lock was held (1) or not (0) as this was written."),
)  # fmt: skip
_KINDS = {series: kind for series, _, kind, _ in SERIES}


class Invocation:
    """What one invocation of taskrunner came to, for :func:`record`."""

    __slots__ = ("duration", "ended", "held", "refused", "reported", "started", "status")

    def __init__(
        self,
        *,
        ended: float,
        status: int,
        started: float | None = None,
        duration: float | None = None,
        refused: bool = False,
        reported: bool = False,
        held: bool = False,
    ) -> None:
        #: When this invocation ended (Unix time).
        self.ended = ended
        #: taskrunner's exit status.
        self.status = status
        #: When the command started (Unix time); None if it did not run.
        self.started = started
        #: How long the command ran, in seconds; None if it did not run.
        self.duration = duration
        #: Whether the lock was busy (75 or 76).
        self.refused = refused
        #: Whether this refusal reported the job as stuck (76).
        self.reported = reported
        #: Whether the lock is held as this is recorded.
        self.held = held


def record(path: str, name: str, inv: Invocation, watch: SignalWatch) -> None:
    """Update the metrics file at ``path`` with invocation ``inv`` of the job ``name``.

    Raises :class:`~taskrunner.errors.MetricsUnusable` when the file cannot be read or
    written (a symlink, FIFO, directory, another user's file, a hard link, a missing
    directory, a full disk...), and :class:`~taskrunner.errors.Interrupted` if a termination
    signal arrives while another invocation is updating the file; ``watch`` bounds that wait.
    """
    file = Replaced(
        path,
        watch,
        error=MetricsUnusable,
        mode=0o644,
        read_limit=_READ_LIMIT,
        noun="the metrics file",
        temp_noun="a metrics file's temp file",
        sidecar=True,
    )
    name = _utf8(name)
    try:
        fd = file.hold(create=True)
        assert fd is not None
        try:
            samples = parse(file.read(fd))
            samples[name] = update(samples.get(name, {}), inv)
            data = render(samples)
            if len(data) >= _READ_LIMIT:  # too many other jobs: keep this one's series
                data = render({name: samples[name]})
            file.replace(data)
        finally:
            close(fd)
    finally:
        file.close()


def update(old: dict[str, Value], inv: Invocation) -> dict[str, Value]:
    """A job's series after ``inv``, given them before it."""
    new: dict[str, Value] = {}
    ran = inv.started is not None
    if inv.started is not None:
        new[LAST_START] = inv.started
        if inv.duration is not None:
            new[LAST_DURATION] = inv.duration
        new[LAST_EXIT] = inv.status
    else:
        for series in (LAST_START, LAST_DURATION, LAST_EXIT):
            if series in old:
                new[series] = old[series]
    new[INVOCATION_TIME] = inv.ended
    new[INVOCATION_STATUS] = inv.status
    new[CONSECUTIVE] = 0 if ran else int(old.get(CONSECUTIVE, 0)) + inv.refused
    new[RUNS] = int(old.get(RUNS, 0)) + ran
    new[REFUSALS] = int(old.get(REFUSALS, 0)) + inv.refused
    new[REPORTS] = int(old.get(REPORTS, 0)) + inv.reported
    new[HELD] = int(bool(inv.held))
    return new


def render(samples: Samples) -> bytes:
    """The file's content for ``samples``: each series with samples gets its HELP and TYPE
    lines and then one line per job, in the order of ``samples``."""
    lines = []
    for series, kind_name, kind, help_text in SERIES:
        values = []
        for name, job in samples.items():
            value = _format(job[series], kind) if series in job else None
            if value is not None:
                values.append(f'{series}{{name="{escape(name)}"}} {value}')
        if values:
            lines.append(f"# HELP {series} {help_text}")
            lines.append(f"# TYPE {series} {kind_name}")
            lines.extend(values)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def parse(data: bytes) -> Samples:
    """The samples of our series in a metrics file's content. Lines of other series, with
    other labels or a timestamp, or with a value not of the series' form, are left out; so
    is everything when the content is too large to be one this module wrote."""
    samples: Samples = {}
    if len(data) >= _READ_LIMIT:
        return samples
    for raw in data.split(b"\n"):
        if not raw.startswith(b"taskrunner_"):
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        found = _sample(line)
        if found is not None:
            series, name, value = found
            samples.setdefault(name, {})[series] = value
    return samples


def escape(name: str) -> str:
    """A label value as the text format writes it: backslash, double quote and line feed
    escaped, and in UTF-8 (see :func:`_utf8`)."""
    return _utf8(name).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _utf8(name: str) -> str:
    """``name`` with the bytes that were not UTF-8 (a name from a file name or an argument
    in another encoding, which Python keeps as lone surrogates) as U+FFFD: the format is
    UTF-8, and the name must be the same when it is read back."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = name.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def _sample(line: str) -> tuple[str, str, Value] | None:
    """(series, job name, value) from ``SERIES{name="NAME"} VALUE``; None for any other line."""
    series, brace, rest = line.partition('{name="')
    kind = _KINDS.get(series)
    if not brace or kind is None:
        return None
    chars = []
    i = 0
    while True:  # the label value, up to its closing quote
        j = min((k for k in (rest.find('"', i), rest.find("\\", i)) if k >= 0), default=-1)
        if j < 0:
            return None
        chars.append(rest[i:j])
        if rest[j] == '"':
            break
        unescaped = _UNESCAPE.get(rest[j + 1 : j + 2])
        if unescaped is None:
            return None
        chars.append(unescaped)
        i = j + 2
    tail = rest[j:]
    if not tail.startswith('"} '):
        return None
    value = _value(tail[3:], kind)
    return None if value is None else (series, "".join(chars), value)


def _value(text: str, kind: int) -> Value | None:
    """A value of ``kind`` as this module writes it; None if ``text`` is not one."""
    if kind == _SECONDS:
        if not text.isascii():  # float() would take other scripts' digits
            return None
        try:
            seconds = float(text)
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) else None
    digits = text[1:] if kind == _STATUS and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= _MAX_DIGITS):
        return None
    number = int(text)
    return number if kind != _FLAG or number in (0, 1) else None


def _format(value: Value, kind: int) -> str | None:
    if kind == _SECONDS:
        return f"{value:.6f}" if math.isfinite(value) else None
    return str(int(value))
