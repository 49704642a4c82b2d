"""The errors taskrunner raises. Only the command line turns them into messages and statuses."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from taskrunner.holder import Holder


class TaskrunnerError(Exception):
    """Base class of every error taskrunner raises on purpose."""


class InvalidJob(TaskrunnerError, ValueError):
    """Arguments that do not describe a job: ones the command line refuses with exit 2."""


class Unusable(TaskrunnerError):
    """A lock or counter path that cannot be used: the command must not run (exit 71)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[Unusable], tuple[str, str]]:
        return type(self), (self.path, self.reason)  # so that it crosses process pools


class LockUnusable(Unusable):
    """The lock cannot be taken or inspected: bad path, wrong file type, permission, disk."""


class CounterUnusable(Unusable):
    """The counter file cannot be read or updated."""


class MetricsUnusable(Unusable):
    """The metrics file cannot be read or written. It is written once the invocation is
    over, so what this means for the exit status is the caller's to say."""


class LockBusy(TaskrunnerError):
    """Another run holds the lock, or an operator put a file of their own in its place."""

    def __init__(self, path: str, holder: Holder | None, since: float | None) -> None:
        self.path = path
        self.holder = holder
        """The holder's record; None for a manual hold (a file taskrunner did not write)."""
        self.since = holder.started if holder is not None else since
        """When the hold began (Unix time), if known."""
        what = holder.describe() if holder is not None else "a manual hold"
        super().__init__(f"{path}: busy: {what}")

    def __reduce__(self) -> tuple[type[LockBusy], tuple[str, Holder | None, float | None]]:
        return type(self), (self.path, self.holder, self.since)

    @property
    def manual(self) -> bool:
        return self.holder is None


class Interrupted(TaskrunnerError):
    """A termination signal arrived before the command was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

    def __reduce__(self) -> tuple[type[Interrupted], tuple[int]]:
        return type(self), (self.signum,)


class CannotRun(TaskrunnerError):
    """The program could not be started: 127 when not found, 126 otherwise (as a shell says)."""

    def __init__(self, program: str, reason: str, status: int) -> None:
        super().__init__(f"{program}: {reason}")
        self.program = program
        self.reason = reason
        self.status = status

    def __reduce__(self) -> tuple[type[CannotRun], tuple[str, str, int]]:
        return type(self), (self.program, self.reason, self.status)
