"""taskrunner: run a command only when no other run holds its lock.

As a library::

    import taskrunner

    with taskrunner.Lock("/run/lock/backup.lock", wait=30):
        ...  # the same lock as ``taskrunner -l /run/lock/backup.lock``

    result = taskrunner.run(["backup.sh", "--full"], "/run/lock/backup.lock")

The names below are imported when first used, not with this package: the command line
(:mod:`taskrunner.cli`) starts in milliseconds and must not pay for the library's.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "CannotRun",
    "CounterUnusable",
    "Holder",
    "Interrupted",
    "InvalidJob",
    "Lock",
    "LockBusy",
    "LockUnusable",
    "Result",
    "TaskrunnerError",
    "Unusable",
    "__version__",
    "run",
]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from taskrunner.api import run
    from taskrunner.errors import (
        CannotRun,
        CounterUnusable,
        Interrupted,
        InvalidJob,
        LockBusy,
        LockUnusable,
        TaskrunnerError,
        Unusable,
    )
    from taskrunner.holder import Holder
    from taskrunner.lock import Lock
    from taskrunner.runner import Result

_HOMES = {
    "run": "taskrunner.api",
    "Lock": "taskrunner.lock",
    "Holder": "taskrunner.holder",
    "Result": "taskrunner.runner",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and a misspelt name is an error

    def __getattr__(name: str) -> object:
        if name not in __all__:
            raise AttributeError(f"module 'taskrunner' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(_HOMES.get(name, "taskrunner.errors")), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
