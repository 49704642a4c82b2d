"""``taskrunner status`` and ``taskrunner unlock``: an operator's look at locks, and the
removal of a stale one.

The lock does the judging (:meth:`FileLock.inspect`, :meth:`FileLock.unlock`, and
:meth:`PgLock.inspect` for the fleet locks of ``status --lock-url``); this module parses the
arguments and formats what it found. ``status`` changes nothing, takes no flock where
/proc/locks can tell instead and never the advisory lock of a fleet key, so that it never
makes a run refuse.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from taskrunner.counter import parse
from taskrunner.errors import CounterUnusable, LockBusy, Unusable
from taskrunner.fsutil import OPEN_FLAGS, check_ours, close, open_parent, reason
from taskrunner.holder import format_age, iso8601
from taskrunner.lockfile import HELD, MANUAL, FileLock, LockState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, TextIO

    from taskrunner.pglock import DatabaseUnusable

    # path (or key), state, why unusable
    Found = tuple[str, Optional[LockState], Optional[str]]

USAGE_ERROR, UNUSABLE, BUSY = 2, 71, 75  # as a run's
_WIDTH = 80  # a table line fits this, unless a lock's path alone is too long
_MIN_COMMAND = 12  # the least of the command shown, however long the other columns
_COUNTER_READ = 64

USAGE = {
    "status": "taskrunner status [--json] [-f COUNTERFILE] LOCKFILE...\n"
    "       taskrunner status [--json] --lock-url URL KEY...",
    "unlock": "taskrunner unlock [--force] LOCKFILE",
}
HELP = {
    "status": """\
Show each lock's state, in the order given, and change nothing:
  free      no lock file (fleet: no session holds the key)
  held      a run holds it (or, its runner gone, its command or what that started does)
  stale     its holder is gone; the next run takes it over (or: taskrunner unlock)
  manual    a file taskrunner did not write (fleet: a database session that is not a run
            holds the key): runs are refused until it is removed
  unusable  a path no run can use (a symlink, another user's file, ...), or a database
            that cannot be reached: the reason follows

options:
  --json                                one JSON object per lock, in a list
  -f COUNTERFILE, --counter-file COUNTERFILE
                                        also show the count of refusals (one LOCKFILE only)
  --lock-url URL                        fleet locks: each KEY in the PostgreSQL database at
                                        URL, with its count of refusals

exit status: 0 every lock was read; 71 one could not be; 2 usage error""",
    "unlock": """\
Remove a stale lock (its holder is gone), safely even while runs are starting.
A live lock is never removed.

options:
  --force   also remove a manual hold (a file taskrunner did not write)

exit status: 0 removed, or there was no lock; 75 the lock is live, or a manual hold
without --force; 71 the path cannot be used; 2 usage error""",
}


class _Usage(Exception):
    pass


def main(command: str, args: list[str]) -> int:
    """``taskrunner status ARGS`` or ``taskrunner unlock ARGS``; returns the exit status."""
    try:
        status = _main(command, args)
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except BrokenPipeError:
        raise  # the reader has gone (``| head``): as for --help
    except OSError as exc:  # stdout on a full disk, say
        _write(sys.stderr, f"taskrunner: error: cannot write the output: {reason(exc)}\n")
        return UNUSABLE


def _main(command: str, args: list[str]) -> int:
    try:
        flags, counter, url, paths = _parse(command, args)
    except _Usage as exc:
        # The form in question: a fleet's when --lock-url was given.
        form = USAGE[command].splitlines()
        usage = form[-1].strip() if any(a.startswith("--lock-url") for a in args) else form[0]
        _write(sys.stderr, f"usage: {usage}\ntaskrunner: error: {exc}\n")
        return USAGE_ERROR
    if "--help" in flags:
        _write(sys.stdout, f"usage: {USAGE[command]}\n\n{HELP[command]}\n")
        return 0
    if command == "unlock":
        return _unlock(paths[0], "--force" in flags)
    if url is not None:
        return _fleet(url, paths, "--json" in flags)
    return _status(paths, "--json" in flags, counter)


def _parse(command: str, args: list[str]) -> tuple[set[str], str | None, str | None, list[str]]:
    """The flags given, the counter file and the database URL (status only), and the lock
    paths, or with a URL the keys."""
    known = {"--json"} if command == "status" else {"--force"}
    flags: set[str] = set()
    counter: str | None = None
    url: str | None = None
    paths: list[str] = []
    todo = list(args)
    while todo:
        arg = todo.pop(0)
        if arg == "--":
            paths += todo
            break
        if arg in ("-h", "--help"):
            flags.add("--help")
        elif arg in known:
            flags.add(arg)
        elif command == "status" and (arg[:2] == "-f" or arg.startswith("--counter-file")):
            if counter is not None:
                raise _Usage("-f/--counter-file given more than once")
            counter = _value(arg, todo)
        elif command == "status" and arg.partition("=")[0] == "--lock-url":
            if url is not None:
                raise _Usage("--lock-url given more than once")
            url = _value(arg, todo)
        elif arg.startswith("-") and arg != "-":
            raise _Usage(f"unknown option {arg.partition('=')[0]}")
        else:
            paths.append(arg)
    if "--help" in flags:
        return flags, counter, url, paths
    if url is not None:
        if counter is not None:
            raise _Usage("-f/--counter-file is for lock files: with --lock-url the count is "
                         "in the database, and shown for every key")  # fmt: skip
        if not url.lower().startswith(("postgresql://", "postgres://")):
            raise _Usage("--lock-url: not a postgresql:// URL")
        if not paths:
            raise _Usage("no key given")
        if "" in paths:
            raise _Usage("a key is empty")
        return flags, counter, url, paths
    if not paths:
        raise _Usage("no lock file given")
    if "" in paths or counter == "":
        raise _Usage("a path is empty")
    if command == "unlock" and len(paths) > 1:
        raise _Usage("unlock takes one lock file")
    if counter is not None and len(paths) > 1:
        raise _Usage("-f/--counter-file goes with exactly one lock file")
    return flags, counter, url, paths


def _value(arg: str, todo: list[str]) -> str:
    """The value of ``-f PATH``, ``-fPATH``, ``--counter-file PATH``, ``--counter-file=PATH``,
    ``--lock-url URL``, ``--lock-url=URL``."""
    if arg in ("-f", "--counter-file", "--lock-url"):
        if not todo:
            raise _Usage(f"{arg} needs a value ({'URL' if arg == '--lock-url' else 'COUNTERFILE'})")
        return todo.pop(0)
    for option in ("--counter-file=", "--lock-url="):
        if arg.startswith(option):
            return arg[len(option) :]
    if arg.startswith("--"):
        raise _Usage(f"unknown option {arg}")
    return arg[2:]


# -- status ------------------------------------------------------------------------------


def _status(paths: list[str], as_json: bool, counter: str | None) -> int:
    found = [_look(path) for path in paths]
    count = problem = None
    if counter is not None:
        try:
            count = _read_count(counter)
        except Unusable as exc:
            problem = exc.reason
    now = time.time()
    if as_json:
        objects = [_json(one, now) for one in found]
        if counter is not None:
            objects[0]["count"] = count
            if problem is not None:
                objects[0]["count_error"] = problem
        _write(sys.stdout, json.dumps(objects, indent=2) + "\n")
    else:
        notes = _notes(found)
        if counter is not None and problem is not None:
            notes.append(f"{_show(counter)}: {problem}")
        counts = None if counter is None else ["?" if count is None else str(count)]
        lines = _table(found, now, counts)
        lines += ["", *notes] if notes else []
        _write(sys.stdout, "".join(line + "\n" for line in lines))
    unusable = problem is not None or any(state is None for _, state, _ in found)
    return UNUSABLE if unusable else 0


def _look(path: str) -> Found:
    lock = FileLock(path)
    try:
        return path, lock.inspect(), None
    except Unusable as exc:
        return path, None, exc.reason
    finally:
        lock.close()


def _read_count(path: str) -> int:
    """The count, read as a run reads it (content that is not a count is 0) and left
    alone: no flock, since the counter is only ever replaced whole."""
    dirfd, name = open_parent(path, CounterUnusable)
    try:
        fd = os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dirfd)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise CounterUnusable(path, reason(exc)) from None
    finally:
        close(dirfd)
    try:
        st = os.fstat(fd)
        why = check_ours(st) or (f"has {st.st_nlink} hard links" if st.st_nlink > 1 else None)
        if why:
            raise CounterUnusable(path, why)
        return parse(os.pread(fd, _COUNTER_READ, 0)) or 0
    except OSError as exc:
        raise CounterUnusable(path, reason(exc)) from None
    finally:
        close(fd)


def _json(found: Found, now: float) -> dict[str, object]:
    path, state, error = found
    obj: dict[str, object] = {"lockfile": path, "state": state.state if state else "unusable"}
    holder = state.holder if state else None
    since = state.since if state else None
    obj["holder"] = None
    if state is not None and holder is not None:
        obj["holder"] = {
            "pid": holder.pid or None,  # 0: a record cut short
            "host": holder.host,
            "since": iso8601(since),
            "command": holder.command,
            "command_pid": holder.command_pid,
            "runner_running": state.runner_running,
        }
    obj["since"] = iso8601(since)
    obj["age"] = None if since is None else round(max(0.0, now - since), 3)
    if error is not None:
        obj["error"] = error
    return obj


def _table(found: list[Found], now: float, counts: list[str] | None) -> list[str]:
    """The table: with ``counts`` (one a lock), a COUNT column."""
    counting = counts is not None
    head = ["STATE", "LOCK", "PID", "HOST", "AGE", *(["COUNT"] if counting else []), "COMMAND"]
    rows = [head]
    for i, (path, state, _) in enumerate(found):
        holder = state.holder if state else None
        since = state.since if state else None
        row = [state.state if state else "unusable", _show(path)]
        row += [str(holder.pid), _show(holder.host)] if holder else ["-", "-"]
        row.append("-" if since is None else format_age(now - since))
        if counts is not None:
            row.append(counts[i])
        rows.append([*row, _show(holder.command) if holder else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    room = max(_MIN_COMMAND, _WIDTH - sum(width + 2 for width in widths))
    lines = []
    for row in rows:
        command = row[-1] if len(row[-1]) <= room else row[-1][: room - 3] + "..."
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + command
        )
    return lines


def _notes(found: list[Found]) -> list[str]:
    """A line for each unusable lock, with the reason, and each held one whose runner is gone."""
    notes = []
    for path, state, error in found:
        if state is None:
            notes.append(f"{_show(path)}: {error}")
        elif state.state == HELD and state.holder and not state.runner_running:
            notes.append(
                f"{_show(path)}: its runner, pid {state.holder.pid}, is gone; its command, "
                "or processes the command started, still hold the lock"
            )
    return notes


# -- status of fleet locks --------------------------------------------------------------


def _fleet(url: str, keys: list[str], as_json: bool) -> int:
    """``status --lock-url URL KEY...``: each key's state and count, one connection at a
    time; once the database cannot be reached, the keys left are not tried."""
    from taskrunner.pglock import MISSING, DatabaseUnusable, FleetState, PgLock

    try:
        importlib.import_module("psycopg")
    except ImportError:
        _write(sys.stderr, f"taskrunner: error: {MISSING}\n")
        return UNUSABLE
    found: list[Found] = []
    descriptions: list[str] = []
    down: DatabaseUnusable | None = None
    for key in keys:
        lock = PgLock(url, key)
        descriptions.append(lock.description)
        if down is not None:
            found.append((key, None, down.reason))
            continue
        try:
            found.append((key, lock.inspect(), None))
        except DatabaseUnusable as exc:
            down = exc
            found.append((key, None, exc.reason))
        except Unusable as exc:
            found.append((key, None, exc.reason))
    now = time.time()
    counts = [str(state.count) if isinstance(state, FleetState) else "?" for _, state, _ in found]
    if as_json:
        objects = []
        for one, description, count in zip(found, descriptions, counts):
            state = one[1]
            obj: dict[str, object] = {"key": one[0], "lock": description}
            obj.update((k, v) for k, v in _json(one, now).items() if k != "lockfile")
            error = obj.pop("error", None)
            obj["count"] = None if count == "?" else int(count)
            obj["backend_pid"] = state.backend if isinstance(state, FleetState) else None
            if error is not None:
                obj["error"] = error
            objects.append(obj)
        _write(sys.stdout, json.dumps(objects, indent=2) + "\n")
    else:
        lines = _table(found, now, counts)
        notes = _fleet_notes(found, down)
        lines += ["", *notes] if notes else []
        _write(sys.stdout, "".join(line + "\n" for line in lines))
    return UNUSABLE if any(state is None for _, state, _ in found) else 0


def _fleet_notes(found: list[Found], down: DatabaseUnusable | None) -> list[str]:
    """A line for each key that could not be looked at (one for them all when the database
    could not be reached), and for each manual hold, naming the session that holds it."""
    from taskrunner.pglock import FleetState

    notes = []
    for key, state, error in found:
        if state is None and (down is None or error != down.reason):
            notes.append(f"{_show(key)}: {error}")
        elif isinstance(state, FleetState) and state.state == MANUAL:
            notes.append(
                f"{_show(key)}: held by the database session of backend pid {state.backend}, "
                "which is not a run of taskrunner's"
            )
    if down is not None:
        notes.append(f"{_show(down.where)}: {down.reason}")
    return notes


# -- unlock ------------------------------------------------------------------------------


def _unlock(path: str, force: bool) -> int:
    lock = FileLock(path)
    try:
        removed = lock.unlock(force)
    except Unusable as exc:
        _write(sys.stderr, f"taskrunner: error: {_show(path)}: {exc.reason}\n")
        return UNUSABLE
    except LockBusy as busy:
        _write(sys.stderr, f"taskrunner: error: not removed: {_busy(path, busy, force)}\n")
        return BUSY
    finally:
        lock.close()
    if removed is None:
        done = f"no lock at {_show(path)}"
    elif removed.holder is not None:
        dead = removed.holder
        done = (
            f"removed the stale lock {_show(path)} of {dead.describe(f'started {dead.age()} ago')}"
        )
    else:
        done = f"removed the manual hold {_show(path)} ({_manual(removed.since)})"
    _write(sys.stdout, done + "\n")
    return 0


def _busy(path: str, busy: LockBusy, force: bool) -> str:
    holder = busy.holder
    if holder is not None:
        held = f"{_show(path)} is held by {holder.describe(f'for {holder.age()}')}"
        if holder.ended is not None:  # the record says so: its run ended, leaving them
            held += "; its run has ended, and processes its command started still hold it"
        return held
    if force:  # a manual hold is removed with --force unless something has it flocked
        return f"{_show(path)} is a file taskrunner did not write, and a process holds its flock"
    return f"{_show(path)} is a manual hold ({_manual(busy.since)}); unlock --force removes it"


def _manual(since: float | None) -> str:
    age = "" if since is None else f", {format_age(time.time() - since)} old"
    return f"a file taskrunner did not write{age}"


# -- output ------------------------------------------------------------------------------


def _show(text: str) -> str:
    """``text`` with what a terminal would not show plainly (newlines, escapes, bytes that
    were not UTF-8) spelled as Python escapes."""
    return (
        text
        if text.isprintable()
        else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    )


def _write(stream: TextIO | None, text: str) -> None:
    """Write ``text`` whatever the stream's encoding: what it cannot encode is escaped."""
    if stream is None:  # started with the stream closed
        return
    encoding = stream.encoding or "utf-8"
    stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
