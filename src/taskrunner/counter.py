"""The counter file: how many runs in a row were refused.

The file holds an ASCII decimal and a newline; absent means 0. Whoever holds the flock of the
file currently at the path may change it, and changes it only by replacing it (a temp file,
fsynced, renamed over) or removing it, so a crash leaves the old value or the new one. A run
that wins the flock checks that the path still names that file, since the last holder may
just have replaced it; that is what makes concurrent increments exact. Only that holder ever
writes the temp file, so it has one fixed name, ``COUNTER.tmp``, and a crash's leftover is
removed by the next holder. That machinery is :class:`taskrunner.replaced.Replaced`, which
the metrics file shares.
"""

from __future__ import annotations

from taskrunner.errors import CounterUnusable
from taskrunner.fsutil import close
from taskrunner.replaced import Replaced
from taskrunner.signals import SignalWatch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable
_READ_LIMIT = 64
_MAX_DIGITS = 18


def parse(data: bytes) -> int | None:
    """The count in a counter file's content; None if it is not a count. Empty is 0."""
    text = data.strip()
    if not text:
        return 0
    if len(data) < _READ_LIMIT and len(text) <= _MAX_DIGITS and text.isdigit():
        return int(text)
    return None


class Counter:
    """The counter file at ``path``."""

    def __init__(self, path: str, watch: SignalWatch) -> None:
        self.path = path
        self._file = Replaced(
            path,
            watch,
            error=CounterUnusable,
            mode=0o600,
            read_limit=_READ_LIMIT,
            noun="the counter file",
            temp_noun="a counter's temp file",
        )
        #: The content found instead of a count by the last increment, if any.
        self.garbage: bytes | None = None

    def increment(self, threshold: int) -> tuple[int, bool]:
        """Count one refusal. Returns the count, this refusal included, and whether it
        exceeded ``threshold``; if it did, the count is reset to 0."""
        fd = self._file.hold(create=True)
        assert fd is not None
        try:
            data = self._file.read(fd)
            old = parse(data)
            self.garbage = data if old is None else None
            count = (old or 0) + 1
            if count > threshold:
                self._file.remove()  # reset to 0: absent means 0
                return count, True
            self._file.replace(b"%d\n" % count)
            return count, False
        finally:
            close(fd)

    def reset_around(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (taking the lock) and, if it succeeds, reset the count, holding
        the counter's flock across both: a refusal counted once the lock is taken is never
        wiped by this reset."""
        fd = self._file.hold(create=False)
        try:
            attempt()
            if fd is not None:
                self._file.remove()
                self._file.discard_temp()
        finally:
            if fd is not None:
                close(fd)

    def check(self) -> None:
        """Raise :class:`CounterUnusable` if the counter path cannot be used."""
        self._file.check()

    def close(self) -> None:
        self._file.close()
