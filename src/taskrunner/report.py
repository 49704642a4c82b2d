"""taskrunner's own lines: on stderr, and also in a log file or syslog when asked.

stderr gets ``taskrunner: `` lines at the chosen verbosity (warnings and errors by default).
A log file and syslog get every event at INFO and above (DEBUG too with ``-vv``), as text or
as one JSON object a line. ``logging`` is not used: it costs more to import than a whole
uncontended run of taskrunner.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}
# syslog severities (RFC 5424) for our levels, with the "user" facility (1 << 3)
_SYSLOG_SEVERITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}
_FACILITY_USER = 8
_SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog", "/var/run/log")
#: Names the syslog socket where it is not in a usual place (a container, a test).
SYSLOG_SOCKET_ENV = "TASKRUNNER_SYSLOG_SOCKET"


class Reporter:
    """Where taskrunner's own lines go."""

    def __init__(
        self,
        verbosity: int = 0,
        name: str = "",
        log_file: str | None = None,
        syslog: bool = False,
        log_format: str = "text",
    ) -> None:
        self.stderr_level = {-1: ERROR, 0: WARNING, 1: INFO}.get(verbosity, DEBUG)
        self.sink_level = DEBUG if verbosity >= 2 else INFO
        self.name = name
        self.log_format = log_format
        self._log_fd: int | None = None
        self._syslog: Any = None
        self._pid = os.getpid()
        if log_file is not None:
            self._open_log(log_file)
        if syslog:
            self._open_syslog()

    def wants(self, level: int) -> bool:
        """Whether a line of ``level`` goes anywhere (to skip building one that would not)."""
        return level >= self.stderr_level or (
            level >= self.sink_level and (self._log_fd is not None or self._syslog is not None)
        )

    def debug(self, event: str, message: str, **fields: object) -> None:
        self.emit(DEBUG, event, message, fields)

    def info(self, event: str, message: str, **fields: object) -> None:
        self.emit(INFO, event, message, fields)

    def warning(self, event: str, message: str, **fields: object) -> None:
        self.emit(WARNING, event, message, fields)

    def error(self, event: str, message: str, **fields: object) -> None:
        self.emit(ERROR, event, message, fields)

    def emit(self, level: int, event: str, message: str, fields: dict[str, object]) -> None:
        if level >= self.stderr_level:
            prefix = "" if level < WARNING else f"{_NAMES[level]}: "
            _write_stderr(f"taskrunner: {prefix}{message}\n")
        if level < self.sink_level or (self._log_fd is None and self._syslog is None):
            return
        if self.log_format == "json":
            body = self._json(level, event, message, fields)
        else:
            body = f"{_NAMES[level]}: {message}"
        if self._log_fd is not None:
            stamp = "" if self.log_format == "json" else f"{_timestamp()} taskrunner[{self._pid}]: "
            self._write_log(f"{stamp}{body}\n")
        if self._syslog is not None:
            self._send_syslog(level, body)

    def _json(self, level: int, event: str, message: str, fields: dict[str, object]) -> str:
        import json

        record: dict[str, object] = {
            "time": _timestamp(),
            "pid": self._pid,
            "level": _NAMES[level],
            "event": event,
            "name": self.name,
            "message": message,
        }
        record.update(fields)
        return json.dumps(record, default=str)

    def _open_log(self, path: str) -> None:
        """Open the log file for appending, under the lock's rules: reached through
        directories only root or we control, a regular file of ours with one link, never
        through a symlink. A log in a shared directory must not write into someone's file."""
        from taskrunner.errors import Unusable
        from taskrunner.fsutil import OPEN_FLAGS, check_ours, close, open_parent, reason

        try:
            dirfd, name = open_parent(path, Unusable)
        except Unusable as exc:
            self.warning("log", f"cannot open log file {path}: {exc.reason}")
            return
        try:
            fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | OPEN_FLAGS, 0o644,
                         dir_fd=dirfd)  # fmt: skip
            st = os.fstat(fd)
        except OSError as exc:
            self.warning("log", f"cannot open log file {path}: {reason(exc)}")
            return
        finally:
            close(dirfd)
        why = check_ours(st) or (f"has {st.st_nlink} hard links" if st.st_nlink > 1 else None)
        if why:
            close(fd)
            self.warning("log", f"cannot use log file {path}: it {why}")
            return
        self._log_fd = fd

    def _write_log(self, line: str) -> None:
        assert self._log_fd is not None
        try:
            os.write(self._log_fd, line.encode("utf-8", "backslashreplace"))
        except OSError as exc:
            from taskrunner.fsutil import close

            fd, self._log_fd = self._log_fd, None
            close(fd)
            self.warning("log", f"cannot write log file: {os.strerror(exc.errno or 0)}")

    def _open_syslog(self) -> None:
        import socket

        chosen = os.environ.get(SYSLOG_SOCKET_ENV)
        for path in (chosen,) if chosen else _SYSLOG_SOCKETS:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                continue
            self._syslog = sock
            return
        where = chosen or ", ".join(_SYSLOG_SOCKETS)
        self.warning("log", f"cannot reach syslog: no socket at {where}")

    def _send_syslog(self, level: int, body: str) -> None:
        pri = _FACILITY_USER | _SYSLOG_SEVERITY[level]
        msg = f"<{pri}>{time.strftime('%b %d %H:%M:%S')} taskrunner[{self._pid}]: {body}"
        try:
            self._syslog.send(msg.encode("utf-8", "backslashreplace"))
        except OSError:
            pass  # syslog is best effort, as syslog(3) itself is

    def close(self) -> None:
        if self._log_fd is not None:
            from taskrunner.fsutil import close

            close(self._log_fd)
            self._log_fd = None
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None


def _timestamp() -> str:
    """``2026-12-04T20:21:28.435+00:00``: ISO 8601, local time with its offset."""
    now = time.time()
    local = time.localtime(now)
    zone = time.strftime("%z", local)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", local)
        + f".{int(now % 1 * 1000):03d}{zone[:3]}:{zone[3:]}"
    )


def _write_stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no stderr (closed by the caller): nowhere left to say it
