"""The holder record written into a lock file, and the identity of a process.

Format (version 1), UTF-8 text, one ``key value`` pair a line after a fixed first line::

    taskrunner-lock 1
    pid 4242
    host web1
    boot_id 5f0c0e1e-...
    proc_start 1234567
    started 1764860000.123
    command backup.sh --full
    command_pid 4243
    command_start 1234570

``pid`` is the runner's; ``command_pid`` the command's, added once it has started.
``proc_start`` and ``command_start`` are their start times in clock ticks after boot (field 22
of ``/proc/PID/stat``); with ``boot_id`` they tell a live process from a reused pid. Values
escape backslash, newline and carriage return. Readers ignore keys they do not know.
"""

from __future__ import annotations

import os
import time

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
        os.close(fd)


def _number(text: str | None, kind: type[N]) -> N | None:
    try:
        return kind(text) if text else None
    except ValueError:
        return None


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


def running(pid: int, start: int | None) -> bool:
    """Whether process ``pid``, started at ``start`` (if known), runs on this host now. A
    zombie does not: it has ended, only its parent has not noticed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None:  # no /proc: the pid exists, and that is all there is to know
        return True
    try:
        return fields[0] != "Z" and (start is None or int(fields[19]) == start)
    except (IndexError, ValueError):
        return True


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
        "boot_id", "command", "command_pid", "command_start", "host", "pid", "proc_start",
        "started",
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
        self.command_pid: int | None = None
        self.command_start: int | None = None

    @classmethod
    def current(cls, command: str) -> Holder:
        """The record for this process, about to run ``command``."""
        pid = os.getpid()
        return cls(pid, os.uname().nodename, time.time(), command, boot_id(), process_start(pid))

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
        if self.command_pid is not None:
            lines.append(f"command_pid {self.command_pid}")
        if self.command_start is not None:
            lines.append(f"command_start {self.command_start}")
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
            pid=_number(fields.get("pid"), int) or 0,
            host=fields.get("host", "?"),
            started=_number(fields.get("started"), float) or 0.0,
            command=fields.get("command", "?"),
            boot_id=fields.get("boot_id") or None,
            proc_start=_number(fields.get("proc_start"), int),
        )
        holder.command_pid = _number(fields.get("command_pid"), int)
        holder.command_start = _number(fields.get("command_start"), int)
        return holder

    def is_alive(self) -> bool | None:
        """Whether the runner or its command still runs: None when that cannot be told from
        here (another host)."""
        if self.host != os.uname().nodename:
            return None
        if self.boot_id is not None and self.boot_id != boot_id():
            return False
        if self.pid > 0 and running(self.pid, self.proc_start):
            return True
        return self.command_pid is not None and running(self.command_pid, self.command_start)

    def describe(self, when: str = "") -> str:
        """``pid 4242 on web1 for 3m12s (command 'backup.sh')``, ``when`` being the middle."""
        when = f" {when}" if when else ""
        return f"pid {self.pid} on {self.host}{when} (command {self.command!r})"

    def age(self, now: float | None = None) -> str:
        """How long ago the hold began, e.g. ``3m12s``."""
        return format_age((time.time() if now is None else now) - self.started)
