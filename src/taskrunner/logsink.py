"""taskrunner's own lines for a library caller: records on the ``taskrunner`` logger.

The command line writes them to stderr itself (``logging`` costs more to import than a whole
uncontended run); a program that uses taskrunner as a library has logging configured, or
chooses not to, and taskrunner prints nothing of its own.
"""

from __future__ import annotations

import logging

from taskrunner.report import Reporter

LOGGER = "taskrunner"


def logger() -> logging.Logger:
    """The ``taskrunner`` logger. It has a ``NullHandler``, so that a program that has not
    configured logging does not get taskrunner's warnings on stderr from logging's
    last-resort handler."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    return log


class LogReporter(Reporter):
    """A :class:`~taskrunner.report.Reporter` that logs instead of writing. Each record
    carries the event's name and fields as ``taskrunner_event`` and ``taskrunner_fields``."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self._log = logger()

    def wants(self, level: int) -> bool:
        return self._log.isEnabledFor(level)

    def emit(self, level: int, event: str, message: str, fields: dict[str, object]) -> None:
        extra = {"taskrunner_event": event, "taskrunner_fields": fields}
        self._log.log(level, "%s", message, extra=extra)
