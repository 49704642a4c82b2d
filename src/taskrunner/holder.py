"""The holder record written into a lock file, and the identity of a process.

Format (version 1), UTF-8 text, one ``key value`` pair a line after a fixed first line::

    taskrunner-lock 1
    pid 4242
    host web1
    boot_id 5f0c0e1e-...
    proc_start 1234567
    started 1764860000.123
    command backup.sh --full
    pidns 4026531836
    lockfile /var/lock/backup.lock
    command_pid 4243
    command_start 1234570

``pid`` is the runner's; ``command_pid`` the command's, added once it has started; ``ended``
(a time) once the run is over but the file is still there: left to what the command started,
or not removable.
``proc_start`` and ``command_start`` are their start times in clock ticks after boot (field 22
of ``/proc/PID/stat``); with ``boot_id`` and the pid namespace (``pidns``) they tell a live
process from a reused pid. ``lockfile`` is the path the command got in its environment.
Values escape backslash, newline and carriage return. Readers ignore keys they do not know.
"""

from __future__ import annotations

import os
import time

from taskrunner.fsutil import close

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    N = TypeVar("N", int, float)

MAGIC = b"taskrunner-lock 1\n"
#: Any version of the record starts so: a file that does is taskrunner's, whatever follows.
SIGNATURE = b"taskrunner-lock "
_MAX_COMMAND = 4096  # characters of the command kept in the record


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(value: str) -> str:
    out = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def _read_small(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        close(fd)


def _number(text: str | None, kind: type[N]) -> N | None:
    try:
        return kind(text) if text else None
    except ValueError:
        return None


def _pid(text: str | None) -> int | None:
    pid = _number(text, int)
    return pid if pid is not None and 0 < pid < _PID_MAX else None


def _time(text: str | None) -> float | None:
    """A Unix time; None for one no clock shows (NaN, infinite, negative, centuries off)."""
    value = _number(text, float)
    return value if value is not None and 0 <= value < 1e11 else None


def boot_id() -> str | None:
    """This boot's random id (Linux), or None where the kernel does not give one."""
    text = _read_small("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state first."""
    text = _read_small(f"/proc/{pid}/stat")
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    return text[text.rfind(")") + 2 :].split() if text else None


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), or None if unknown."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


_PID_MAX = 1 << 22  # the kernel's limit for any pid


def pid_namespace() -> int | None:
    """This process's pid namespace (Linux), or None."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def running(pid: int, start: int | None) -> bool:
    """Whether process ``pid``, started at ``start`` (if known), runs on this host now. A
    zombie does not: it has ended, only its parent has not noticed."""
    if not 0 < pid < _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:  # no such entry in /proc, or no /proc: the pid is all there is
        return not os.path.isdir("/proc/self")
    try:
        return fields[0] != "Z" and (start is None or int(fields[19]) == start)
    except (IndexError, ValueError):
        return True


def _real_uid(pid: int) -> int | None:
    """The real user id of process ``pid`` (its owner, whatever it is allowed to do)."""
    text = _read_small(f"/proc/{pid}/status")
    for line in (text or "").splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return None


def command_of(lockfile: str, since: int) -> bool:
    """Whether a process of ours (its real user ours: the lock file is ours, so was its
    runner) started at or after ``since`` has ``TASKRUNNER_LOCKFILE`` set to ``lockfile``: a
    command whose runner died before it could record the command's pid. Another user's
    process could set that variable too, and must not keep our lock."""
    wanted = b"TASKRUNNER_LOCKFILE=" + os.fsencode(lockfile)
    uid = os.geteuid()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fields = _stat(pid)
        try:
            if not fields or fields[0] == "Z" or int(fields[19]) < since:
                continue
            fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, IndexError, ValueError):
            continue
        try:
            # Not the owner of /proc/PID/environ: a process that made itself undumpable has
            # root's there, whoever it is.
            environ = os.read(fd, 1 << 20) if _real_uid(pid) == uid else b""
        except OSError:
            continue
        finally:
            close(fd)
        if wanted in environ.split(b"\0"):
            return True
    return False


def iso8601(when: float | None) -> str | None:
    """``when`` (Unix time) in ISO 8601, local time with its offset, to the millisecond;
    None for None, or for a time no calendar shows (a file's mtime in the year 10000)."""
    if when is None:
        return None
    from datetime import datetime

    try:
        return datetime.fromtimestamp(when).astimezone().isoformat("T", "milliseconds")
    except (OverflowError, OSError, ValueError):
        return None


_IDENTITY: list[tuple[int, str, str | None, int | None, int | None]] = []


def _identity() -> tuple[int, str, str | None, int | None, int | None]:
    """This process's pid, host name, boot id, start time and pid namespace, read once per
    process: a program that takes locks again and again need not read /proc each time. (A
    forked child has a pid of its own and reads its own; a renamed host shows its old name.)"""
    pid = os.getpid()
    if not _IDENTITY or _IDENTITY[0][0] != pid:
        _IDENTITY[:] = [(pid, os.uname().nodename, boot_id(), process_start(pid), pid_namespace())]
    return _IDENTITY[0]


def command_text(argv: list[str]) -> str:
    """A program and its arguments as a person would type them in a shell."""
    return " ".join(_quote(arg) for arg in argv)


def _quote(arg: str) -> str:
    safe = "-_./=:,+@%^"
    if arg and all(c.isalnum() or c in safe for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def format_age(seconds: float) -> str:
    """A short human duration: ``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Holder:
    """Who holds (or held) a lock: enough to name it in a report and to judge it alive."""

    __slots__ = (
        "boot_id", "command", "command_pid", "command_start", "ended", "host", "lockfile",
        "pid", "pidns", "proc_start", "started",
    )  # fmt: skip

    def __init__(
        self,
        pid: int,
        host: str,
        started: float,
        command: str,
        boot_id: str | None = None,
        proc_start: int | None = None,
    ) -> None:
        self.pid = pid
        self.host = host
        self.started = started
        self.command = command
        self.boot_id = boot_id
        self.proc_start = proc_start
        self.pidns: int | None = None
        self.lockfile: str | None = None
        self.command_pid: int | None = None
        self.command_start: int | None = None
        self.ended: float | None = None

    @classmethod
    def current(cls, command: str, lockfile: str | None = None) -> Holder:
        """The record for this process, about to run ``command`` with ``lockfile`` in its
        environment."""
        pid, host, boot, start, pidns = _identity()
        holder = cls(pid, host, time.time(), command, boot, start)
        holder.pidns = pidns
        holder.lockfile = lockfile
        return holder

    def encode(self) -> bytes:
        lines = [f"pid {self.pid}", f"host {_escape(self.host)}"]
        if self.boot_id:
            lines.append(f"boot_id {_escape(self.boot_id)}")
        if self.proc_start is not None:
            lines.append(f"proc_start {self.proc_start}")
        lines.append(f"started {self.started:.3f}")
        command = self.command
        if len(command) > _MAX_COMMAND:
            command = command[: _MAX_COMMAND - 3] + "..."
        lines.append(f"command {_escape(command)}")
        if self.pidns is not None:
            lines.append(f"pidns {self.pidns}")
        if self.lockfile is not None:
            lines.append(f"lockfile {_escape(self.lockfile)}")
        if self.command_pid is not None:
            lines.append(f"command_pid {self.command_pid}")
        if self.command_start is not None:
            lines.append(f"command_start {self.command_start}")
        if self.ended is not None:
            lines.append(f"ended {self.ended:.3f}")
        body = "\n".join(lines) + "\n"
        return MAGIC + body.encode("utf-8", "surrogateescape")

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        """The record in ``data``; None if ``data`` is not taskrunner's. A record of
        taskrunner's that cannot be read whole (another version, cut short) still gives a
        Holder, with what could be read."""
        if not data.startswith(SIGNATURE):
            return None
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "surrogateescape").split("\n")[1:]:
            key, _, value = line.partition(" ")
            if key:
                fields[key] = _unescape(value)
        holder = cls(
            pid=_pid(fields.get("pid")) or 0,
            host=fields.get("host", "?"),
            started=_time(fields.get("started")) or 0.0,
            command=fields.get("command", "?"),
            boot_id=fields.get("boot_id") or None,
            proc_start=_number(fields.get("proc_start"), int),
        )
        holder.pidns = _number(fields.get("pidns"), int)
        holder.lockfile = fields.get("lockfile") or None
        holder.command_pid = _pid(fields.get("command_pid"))
        holder.command_start = _number(fields.get("command_start"), int)
        holder.ended = _time(fields.get("ended"))
        return holder

    def is_alive(self) -> bool | None:
        """Whether the runner, or the command it started, still runs. None when that cannot
        be told from here: another machine, or a record without the start times that tell a
        process from one that reused its pid."""
        here = boot_id()
        if self.boot_id is None or here is None or self.proc_start is None:
            return None
        if self.boot_id != here:  # another boot: nothing recorded runs here any more
            return None if self.host != os.uname().nodename else False
        # The same boot of the same kernel, whatever the host is called now.
        same_pids = self.pidns is None or self.pidns == pid_namespace()
        if same_pids:
            # A record that says its run ended is not kept alive by its runner, which may
            # live on (a program using the library) long after letting the lock go.
            if self.ended is None and running(self.pid, self.proc_start):
                return True
            if self.command_pid is not None and self.command_start is not None:
                return running(self.command_pid, self.command_start)
        # The runner died before it recorded its command's pid (or ended without knowing
        # it), or its pids are another pid namespace's: look for the command by the path it
        # was given, whatever its pid.
        unknown = self.command_pid is None or not same_pids
        if self.lockfile is not None and (self.ended is None or unknown):
            return command_of(self.lockfile, self.proc_start)
        return False if same_pids else None

    def describe(self, when: str = "") -> str:
        """``pid 4242 on web1 for 3m12s (command 'backup.sh')``, ``when`` being the middle."""
        when = f" {when}" if when else ""
        return f"pid {self.pid} on {self.host}{when} (command {self.command!r})"

    def age(self, now: float | None = None) -> str:
        """How long ago the hold began, e.g. ``3m12s``."""
        return format_age((time.time() if now is None else now) - self.started)
