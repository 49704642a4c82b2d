"""Acquire-and-release rate of taskrunner.Lock and of the locks people would pick instead.

Run by bench.py inside its virtual environment, once per directory measured:

    python bench/locks.py DIRECTORY ITERATIONS ROUNDS

Each round runs ITERATIONS acquire()/release() pairs of every lock, in a new random order,
one lock object each, uncontended. Prints, as JSON, each lock's pairs per second (the
median over the rounds) and what it does in that time.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from importlib.metadata import version
from typing import Any, Callable

import fasteners
import filelock

import taskrunner

# What each lock does for its time: the file while held, the record, a dead holder's lock.
UNSYNCED = "taskrunner.Lock, no fdatasync"
DOES = {
    "taskrunner.Lock": "file exists only while held; holder record; stale lock taken over; "
    "record fdatasync'd before it is published",
    "filelock.SoftFileLock": "file exists only while held; holder record; stale lock taken over",
    "filelock.FileLock": "flock on a file that is never removed",
    "fasteners.InterProcessLock": "fcntl lock on a file that is never removed",
    UNSYNCED: "taskrunner.Lock with fdatasync made a no-op: not a mode taskrunner has; "
    "the difference is what the sync costs",
}


def locks(directory: str) -> dict[str, Any]:
    def path(name: str) -> str:
        return os.path.join(directory, name)

    return {
        "taskrunner.Lock": taskrunner.Lock(path("taskrunner.lock")),
        "filelock.SoftFileLock": filelock.SoftFileLock(path("soft.lock")),
        "filelock.FileLock": filelock.FileLock(path("file.lock")),
        "fasteners.InterProcessLock": fasteners.InterProcessLock(path("fasteners.lock")),
        UNSYNCED: Unsynced(taskrunner.Lock(path("unsynced.lock"))),
    }


class Unsynced:
    """A taskrunner.Lock whose record is not fdatasync'd, to measure what the sync costs."""

    def __init__(self, lock: taskrunner.Lock) -> None:
        self.lock = lock

    def acquire(self) -> None:
        sync, os.fdatasync = os.fdatasync, _no_sync
        try:
            self.lock.acquire()
        finally:
            os.fdatasync = sync

    def release(self) -> None:
        self.lock.release()


def _no_sync(fd: int) -> None:
    pass


def pairs_per_second(acquire: Callable[[], object], release: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        acquire()
        release()
    return n / (time.perf_counter() - start)


def main() -> int:
    directory, iterations, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chosen = locks(directory)
    rates: dict[str, list[float]] = {name: [] for name in chosen}
    names = list(chosen)
    for n in range(rounds + 1):  # the first round warms the caches and is not counted
        random.shuffle(names)
        for name in names:
            lock = chosen[name]
            rate = pairs_per_second(lock.acquire, lock.release, iterations)
            if n:
                rates[name].append(rate)
    result = {
        name: {"pairs_per_s": statistics.median(r), "min": min(r), "max": max(r)}
        for name, r in rates.items()
    }
    versions = {name: version(name) for name in ("taskrunner-lock", "filelock", "fasteners")}
    print(json.dumps({"locks": result, "does": DOES, "versions": versions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
