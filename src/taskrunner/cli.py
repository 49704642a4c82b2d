"""The ``taskrunner`` command line: parse, build a job, run it, exit with its status.

The options are one table, :data:`OPTIONS`. A run parses it with the small parser below;
``--help`` (and anything else that wants an ``argparse`` parser) gets one built from the same
table by :func:`main_parser`. ``argparse`` is not used on the run path because importing and
building it costs more than the whole rest of an uncontended run: a cron wrapper should cost
about what starting Python costs, and no more.
"""

from __future__ import annotations

import os
import sys

from taskrunner import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Callable, NoReturn

    from taskrunner.backend import LockBackend
    from taskrunner.runner import Job

USAGE_ERROR = 2
_MAX_SECONDS = 10 * 365 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DIGITS = frozenset("0123456789")

USAGE = """\
taskrunner -c CMD -l LOCKFILE [-t N -f COUNTERFILE] [options]
       taskrunner -l LOCKFILE [-t N -f COUNTERFILE] [options] -- PROGRAM [ARG...]
       taskrunner --lock-url postgresql://... --key NAME [-t N] [options] -c CMD
       taskrunner status [--json] [-f COUNTERFILE] LOCKFILE...
       taskrunner status [--json] --lock-url URL KEY...
       taskrunner unlock [--force] LOCKFILE"""

DESCRIPTION = """\
Run a command only when no other run with the same lock is in progress, count the runs
refused, and report when refusals pile up past a threshold: the sign of a job that hangs.

The lock file exists exactly while a run holds it. A lock whose holder died (kill -9, crash,
reboot) is taken over by the next run with a warning. A file taskrunner did not write is a
manual hold: runs are refused and counted until it is removed."""

# The rest of the help, in parts that the man page (taskrunner.manpage) is made from too.
DURATIONS = "DURATION is seconds (90, 1.5) or a number with a unit: 30s, 5m, 2h, 1d."
EXIT_STATUS = (
    ("the command's own", "the command ran (128+N if signal N killed it)"),
    ("2", "usage error"),
    ("71", "the lock or counter cannot be used; the command did not run"),
    ("74", "fleet mode: the lock was lost while the command ran; it was stopped"),
    ("75", "busy: another run (or a manual hold) has the lock; not run"),
    ("76", "busy, and past the threshold or --stuck-after: reported"),
    ("124", "the command reached --timeout and was stopped"),
    ("126, 127", "the program cannot be run, or was not found"),
)
ENVIRONMENT = """\
The command gets TASKRUNNER_LOCKFILE and TASKRUNNER_NAME in its environment; in fleet mode
TASKRUNNER_NAME and TASKRUNNER_FENCING_TOKEN, which grows with every acquisition. Hooks get
TASKRUNNER_EVENT (stuck or stale), TASKRUNNER_NAME, TASKRUNNER_LOCKFILE, TASKRUNNER_COUNT,
TASKRUNNER_HOLDER_PID, TASKRUNNER_HOLDER_HOST and TASKRUNNER_HOLDER_SINCE.
taskrunner reads TMPDIR (where --quiet-success holds the output), TASKRUNNER_SYSLOG_SOCKET
(the syslog socket, if not /dev/log) and, in fleet mode, libpq's PG* variables."""
_SUBCOMMANDS = """\
taskrunner status [--json] [-f COUNTERFILE] LOCKFILE...
  each lock's state (free, held, stale, manual), holder and age; exit 71 if one cannot be read
taskrunner unlock [--force] LOCKFILE
  remove a stale lock (--force: also a manual hold); a live one is refused with 75"""
# 17: the width of the widest status, the first.
_EXITS = "exit status:" + "".join(f"\n  {code:<17}  {meaning}" for code, meaning in EXIT_STATUS)
EPILOG = "\n\n".join((DURATIONS, _EXITS, ENVIRONMENT, _SUBCOMMANDS))


class UsageError(Exception):
    """A bad command line: usage on stderr, exit 2. When what is missing is the lock or the
    command, the whole help goes with it, as the original taskrunner showed it."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def duration(text: str) -> float:
    """``90``, ``1.5``, ``30s``, ``5m``, ``2h``, ``1d`` -> seconds."""
    number, scale = text, 1
    if text[-1:] in _UNITS:
        number, scale = text[:-1], _UNITS[text[-1]]
    digits = number.replace(".", "", 1)
    if not digits or not _DIGITS.issuperset(digits):
        raise ValueError(f"not a duration: {text!r} (try 90, 1.5, 30s, 5m, 2h)")
    seconds = float(number) * scale
    if seconds > _MAX_SECONDS:
        raise ValueError(f"duration too long: {text!r} (at most 10 years)")
    return seconds


def count(text: str) -> int:
    """A whole number of 0 or more."""
    if not text or not _DIGITS.issuperset(text) or len(text) > 18:
        raise ValueError(f"not a whole number of 0 or more: {text!r}")
    return int(text)


def url(text: str) -> str:
    """An http:// or https:// URL with a host (and a port that is a number, if any)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        good = parts.scheme.lower() in ("http", "https") and parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        good = False
    if not good or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"not an http:// or https:// URL: {text!r}")
    return text


def database_url(text: str) -> str:
    if not text.lower().startswith(("postgresql://", "postgres://")):
        raise ValueError(f"not a postgresql:// URL: {text!r}")
    return text


def log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"not text or json: {text!r}")
    return text


FLAG = "flag"  # kind of an option that takes no value and may be repeated
COUNT = "count"  # like FLAG, counting how often it is given


class Option:
    """One command-line option: its spellings, where it goes, what value it takes."""

    __slots__ = ("choices", "dest", "flags", "group", "help", "kind", "metavar")

    def __init__(
        self,
        flags: tuple[str, ...],
        kind: Callable[[str], object] | str,
        help: str,
        group: str,
        metavar: str | None = None,
        choices: tuple[str, ...] | None = None,
    ) -> None:
        self.flags = flags
        self.dest = flags[-1].lstrip("-").replace("-", "_")
        self.kind = kind
        self.help = help
        self.group = group
        self.metavar = metavar
        self.choices = choices


_JOB, _RUN, _WATCH, _OUT = "the job", "run options", "monitoring", "output"
OPTIONS = (
    Option(("-c", "--command"), str, "command to run through /bin/sh -c "
           "(or give -- PROGRAM [ARG...])", _JOB, "CMD"),
    Option(("-l", "--lockfile"), str, "path to the lock file, e.g. /tmp/backup.lock "
           "(required)", _JOB, "LOCKFILE"),
    Option(("-t", "--threshold"), count, "report when refusals exceed N (0: do not count); "
           "needs -f", _JOB, "N"),
    Option(("-f", "--counter-file"), str, "file that keeps the count of refusals; needs -t",
           _JOB, "COUNTERFILE"),
    Option(("--lock-url",), database_url, "fleet mode, instead of -l: the PostgreSQL database "
           "that holds the lock and the count (-t N alone)", _JOB, "URL"),
    Option(("--key",), str, "fleet mode: the lock's name in that database", _JOB, "NAME"),
    Option(("--wait",), duration, "wait up to DURATION for the lock, then refuse (default 0: "
           "refuse at once); a waiter starts as soon as the lock is released", _RUN, "DURATION"),
    Option(("--timeout",), duration, "stop the command after DURATION: TERM to its process "
           "group, KILL after --kill-after; exit 124 (default 0: no limit)", _RUN, "DURATION"),
    Option(("--kill-after",), duration, "time between TERM and KILL at the time limit "
           "(default 10s; 0: KILL at once)", _RUN, "DURATION"),
    Option(("--cumulative",), FLAG, "keep counting refusals across successful runs; the count "
           "resets only when a report fires", _RUN),
    Option(("--name",), str, "the job's name in messages, logs, hooks and metrics (default: "
           "the lock file's name)", _RUN, "NAME"),
    Option(("--quiet-success",), FLAG, "hold the command's output on disk and show it only if "
           "the command fails, like chronic", _RUN),
    Option(("--stuck-after",), duration, "also report a refusal (exit 76) when the holder has "
           "held the lock longer than DURATION", _WATCH, "DURATION"),
    Option(("--on-stuck",), str, "run CMD through sh when a report fires", _WATCH, "CMD"),
    Option(("--on-recover",), str, "run CMD through sh when a run takes over the lock of a "
           "holder that died", _WATCH, "CMD"),
    Option(("--notify-url",), url, "POST each such event as JSON to URL", _WATCH, "URL"),
    Option(("--hook-timeout",), duration, "cut hooks and the POST off after DURATION "
           "(default 30s)", _WATCH, "DURATION"),
    Option(("--metrics-file",), str, "write Prometheus metrics to PATH after every invocation, for "
           "node_exporter's textfile collector", _WATCH, "PATH"),
    Option(("-q", "--quiet"), FLAG, "errors only on stderr", _OUT),
    Option(("-v", "--verbose"), COUNT, "more of taskrunner's own lines on stderr (-vv for "
           "debug)", _OUT),
    Option(("--log-file",), str, "also append taskrunner's events to PATH", _OUT, "PATH"),
    Option(("--syslog",), FLAG, "also send taskrunner's events to syslog", _OUT),
    Option(("--log-format",), log_format, "text or json: the form of --log-file and --syslog "
           "lines (default text)", _OUT, "FORMAT", ("text", "json")),
)  # fmt: skip
_BY_FLAG = {flag: opt for opt in OPTIONS for flag in opt.flags}


def parse(args: Sequence[str]) -> dict[str, object]:
    """Parse the options before ``--``: ``-x V``, ``-xV``, ``--long V``, ``--long=V``,
    bundled flags (``-vv``). Raises :class:`UsageError`; ``-h`` and ``--version`` raise
    ``SystemExit`` after printing."""
    values: dict[str, object] = {}
    todo = list(args)
    while todo:
        arg = todo.pop(0)
        if arg in ("-h", "--help"):
            if sys.stdout is not None:  # None: started with stdout closed
                main_parser().print_help(sys.stdout)
            raise SystemExit(0)
        if arg == "--version":
            if sys.stdout is not None:
                sys.stdout.write(f"taskrunner {__version__}\n")
            raise SystemExit(0)
        if arg.startswith("--"):
            flag, has_value, attached = arg.partition("=")
        elif arg.startswith("-") and len(arg) > 1:
            flag, attached = arg[:2], arg[2:]
            has_value = "=" if attached else ""
        else:
            raise UsageError(f"unexpected argument {arg!r} (a program goes after --)")
        opt = _BY_FLAG.get(flag)
        if opt is None:
            raise UsageError(f"unknown option {flag}")
        name = "/".join(opt.flags)
        if opt.kind in (FLAG, COUNT):
            if has_value and flag.startswith("--"):
                raise UsageError(f"{name} takes no value")
            values[opt.dest] = int(values.get(opt.dest, 0)) + 1  # type: ignore[call-overload]
            if attached:  # bundled short flags: -vv, -qv
                todo.insert(0, "-" + attached)
            continue
        if opt.dest in values:
            raise UsageError(f"{name} given more than once")
        if has_value:
            text = attached
        elif todo:
            text = todo.pop(0)
        else:
            raise UsageError(f"{name} needs a value ({opt.metavar})")
        assert callable(opt.kind)
        try:
            values[opt.dest] = opt.kind(text)
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from None
    return values


def main_parser() -> argparse.ArgumentParser:
    """An ``argparse`` parser for the same options: the help text, and a way for tools to
    read the command line's definition."""
    import argparse

    p = argparse.ArgumentParser(
        prog="taskrunner",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        group = groups.get(opt.group) or groups.setdefault(
            opt.group, p.add_argument_group(opt.group)
        )
        if opt.kind == FLAG:
            group.add_argument(*opt.flags, action="store_true", help=opt.help)
        elif opt.kind == COUNT:
            group.add_argument(*opt.flags, action="count", help=opt.help)
        else:
            group.add_argument(*opt.flags, metavar=opt.metavar, choices=opt.choices,
                               help=opt.help)  # fmt: skip
    p.add_argument("--version", action="version", version=f"taskrunner {__version__}")
    return p


def _job_from(values: dict[str, object], program: list[str] | None) -> Job:
    from taskrunner.runner import Job, metrics_lock, same_file

    def text(key: str) -> str | None:
        value = values.get(key)
        return value if isinstance(value, str) else None

    command, lockfile, counter_file = text("command"), text("lockfile"), text("counter_file")
    threshold = values.get("threshold")
    lock_url, key = text("lock_url"), text("key")
    fleet = lock_url is not None or key is not None
    if fleet:
        if lockfile is not None:
            raise UsageError("give -l LOCKFILE, or --lock-url URL --key NAME, not both")
        if lock_url is None or key is None:
            raise UsageError("--lock-url and --key go together")
        if counter_file is not None:
            raise UsageError("-f/--counter-file is for lock files: with --lock-url the count "
                             "is in the database (give -t N alone)")  # fmt: skip
    elif lockfile is None:
        raise UsageError("the lock file is required: -l LOCKFILE", missing=True)
    if command is not None and program is not None:
        raise UsageError("give the command with -c CMD or after --, not both")
    if command is None and program is None:
        raise UsageError("no command: give -c CMD or -- PROGRAM [ARG...]", missing=True)
    if not fleet and (threshold is None) != (counter_file is None):
        raise UsageError("-t/--threshold and -f/--counter-file go together")
    if values.get("cumulative") and threshold is None:
        raise UsageError("--cumulative needs -t N" + ("" if fleet else " -f COUNTERFILE"))
    if values.get("quiet") and values.get("verbose"):
        raise UsageError("-q/--quiet and -v/--verbose contradict each other")
    for option in ("command", "lockfile", "counter_file", "name", "log_file", "on_stuck",
                   "on_recover", "metrics_file", "key"):  # fmt: skip
        if values.get(option) == "":
            raise UsageError(f"--{option.replace('_', '-')} is empty")
    if program == []:
        raise UsageError("no program after --")
    if program is not None and not program[0]:
        raise UsageError("the program after -- is empty")
    # No two of taskrunner's files may be one: each would clobber the other.
    metrics = text("metrics_file")
    clash = same_file([
        ("the lock file", lockfile),
        ("the counter file", counter_file),
        ("the metrics file", metrics),
        ("the metrics file's lock", metrics_lock(metrics)),
        ("the log file", text("log_file")),
    ])  # fmt: skip
    if clash is not None:
        raise UsageError(f"{clash[0]} must not be {clash[1]}")
    if values.get("hook_timeout") == 0:
        raise UsageError("--hook-timeout must be more than 0: hooks are always cut off")
    name = text("name") or key or os.path.basename(lockfile or "") or lockfile or ""

    def seconds(key: str, default: float) -> float:
        value = values.get(key)
        return value if isinstance(value, float) else default

    return Job(
        lockfile,
        [command] if command is not None else list(program or ()),
        shell=command is not None,
        name=name,
        threshold=threshold if isinstance(threshold, int) else 0,
        counter_file=counter_file,
        cumulative=bool(values.get("cumulative")),
        wait=seconds("wait", 0.0),
        timeout=seconds("timeout", 0.0),
        kill_after=seconds("kill_after", 10.0),
        stuck_after=seconds("stuck_after", 0.0),
        on_stuck=text("on_stuck"),
        on_recover=text("on_recover"),
        notify_url=text("notify_url"),
        hook_timeout=seconds("hook_timeout", 30.0),
        metrics_file=text("metrics_file"),
        quiet_success=bool(values.get("quiet_success")),
        lock_url=lock_url,
        key=key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["status"], ["unlock"]):
        from taskrunner.status import main as operate

        return operate(args[0], args[1:])
    program = None
    if "--" in args:
        cut = args.index("--")
        args, program = args[:cut], args[cut + 1 :]
    try:
        values = parse(args)
        job = _job_from(values, program)
    except UsageError as exc:
        if sys.stderr is not None:
            text = main_parser().format_help() if exc.missing else f"usage: {USAGE}\n"
            sys.stderr.write(f"{text}taskrunner: error: {exc}\n")
        return USAGE_ERROR
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0

    from taskrunner.lockfile import FileLock
    from taskrunner.report import Reporter
    from taskrunner.runner import run

    verbose = values.get("verbose")
    log_file, fmt = values.get("log_file"), values.get("log_format")
    reporter = Reporter(
        verbosity=-1 if values.get("quiet") else verbose if isinstance(verbose, int) else 0,
        name=job.name,
        log_file=log_file if isinstance(log_file, str) else None,
        syslog=bool(values.get("syslog")),
        log_format=fmt if isinstance(fmt, str) else "text",
    )
    lock: LockBackend
    if job.lockfile is not None:
        lock = FileLock(job.lockfile)
    else:
        from taskrunner.pglock import PgLock

        lock = PgLock(job.lock_url or "", job.key or "", cumulative=job.cumulative)
    try:
        result = run(job, lock, reporter)
    finally:
        reporter.close()
    if result.terminal_signal is not None:
        _die_of(result.terminal_signal)
    return result.status


def _die_of(signum: int) -> None:
    """Die of ``signum``, as the command did (without a core dump of our own)."""
    import resource
    import signal

    _flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 the caller closed, so that no lock file or pipe of
    ours ever lands there and reaches the command as its stdin or stdout."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # the command's too


def entrypoint() -> NoReturn:
    """The console script."""
    _ensure_std_fds()
    try:
        status = main()
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:  # e.g. ``taskrunner --help | head -1``
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141
    except Exception as exc:  # a bug: one line, not a traceback
        sys.stderr.write(f"taskrunner: error: internal error: {type(exc).__name__}: {exc}\n")
        status = 70
    # Leave without the interpreter's teardown: by now the lock is released and every file
    # of ours is closed, and tearing down the modules costs milliseconds per run.
    _flush()
    os._exit(status)
