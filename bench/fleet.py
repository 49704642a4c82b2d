"""Benchmark fleet mode's lock: taskrunner's PgLock against bare advisory-lock round trips.

Run from the repository root with the dev venv (psycopg installed; --quick for a shorter run):

    .venv/bin/python bench/fleet.py [--url postgresql://...] [--quick]

Each section runs its cases interleaved, in a shuffled order every round, after 3 warm-up
rounds; x is a row's median over its baseline's median. It prints Markdown tables, writes
them as JSON to bench/results/fleet.json and deletes its keys' rows from taskrunner_locks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import psycopg

from taskrunner.errors import LockBusy
from taskrunner.holder import Holder
from taskrunner.pglock import PgLock, key_hash

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
URL = os.environ.get("TASKRUNNER_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/test"
PREFIX = f"bench-fleet-{os.getpid()}-{random.randrange(16**6):06x}"  # every key's name
TRY, UNLOCK = "SELECT pg_try_advisory_lock(%s)", "SELECT pg_advisory_unlock(%s)"
HELD_SQL = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE granted AND pid = pg_backend_pid())"
SQL = (("bare SELECT 1", "SELECT 1"), ("bare pg_locks query (as held())", HELD_SQL))
PSQL = "psql -c 'select pg_try_advisory_lock(K)'"
THRESHOLD = 10**12  # never exceeded: no reset of the count during the run
Case = Callable[[], dict[str, float]]  # one timed run of a case: ms by row
Spec = list[tuple[str, Optional[str]]]  # (row, baseline row) in the order printed


def since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def timed(row: str, fn: Callable[..., object], *args: Any) -> Case:
    """A case timing ``fn(*args)`` whole as ``row``."""

    def case() -> dict[str, float]:
        t0 = time.perf_counter()
        fn(*args)
        return {row: since(t0)}

    return case


def run(argv: list[str]) -> None:
    if subprocess.run(argv, stdout=subprocess.DEVNULL, check=False).returncode:
        sys.exit(f"bench: {shlex.join(argv)} failed")


def bare_lock(conn: Any, key: int, expect: bool = True, unlock: bool = True) -> None:
    assert conn.execute(TRY, (key,)).fetchone() == (expect,)
    if unlock:
        conn.execute(UNLOCK, (key,))


def interleave(cases: list[Case], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for n in range(rounds + 3):  # 3 rounds of warm-up, not counted
        for case in random.sample(cases, len(cases)):
            for row, ms in case().items():
                if n >= 3:
                    samples.setdefault(row, []).append(ms)
    return samples


def connect_acquire_release(url: str, holder: Holder) -> tuple[list[Case], Spec]:
    key, bare = f"{PREFIX}-a", key_hash(f"{PREFIX}-a-bare")
    pg, raw = "PgLock: connect, try_acquire, release", "bare: connect, try_lock, unlock, close"

    def pglock() -> None:
        lock = PgLock(url, key)
        lock.try_acquire(holder)
        lock.release()

    def plain() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            bare_lock(conn, bare)

    return [timed(pg, pglock), timed(raw, plain)], [(pg, raw)]


def on_open_connection(url: str, holder: Holder, conn: Any) -> tuple[list[Case], Spec]:
    key, bare = f"{PREFIX}-b", key_hash(f"{PREFIX}-b-bare")
    acq, rel = "PgLock try_acquire", "PgLock release (unlock, close)"
    both, b_long = "PgLock try_acquire + release", "bare try_lock, unlock (long-lived conn.)"
    b_try, b_rel, b_all = "bare try_lock", "bare unlock, close", "bare try_lock, unlock, close"

    def pglock() -> dict[str, float]:
        lock = PgLock(url, key)
        lock._connect(psycopg)  # private: release() closes, so no public way to pre-open
        t0 = time.perf_counter()
        lock.try_acquire(holder)
        t1 = time.perf_counter()
        lock.release()
        t2 = time.perf_counter()
        return {acq: (t1 - t0) * 1e3, rel: (t2 - t1) * 1e3, both: (t2 - t0) * 1e3}

    def fresh() -> dict[str, float]:
        c = psycopg.connect(url, autocommit=True)
        t0 = time.perf_counter()
        bare_lock(c, bare, unlock=False)
        t1 = time.perf_counter()
        c.execute(UNLOCK, (bare,))
        c.close()
        t2 = time.perf_counter()
        return {b_try: (t1 - t0) * 1e3, b_rel: (t2 - t1) * 1e3, b_all: (t2 - t0) * 1e3}

    spec: Spec = [(acq, b_try), (rel, b_rel), (both, b_all), (both, b_long)]
    return [pglock, fresh, timed(b_long, bare_lock, conn, bare)], spec


def refusal(url: str, holder: Holder, conn: Any, owner: PgLock) -> tuple[list[Case], Spec]:
    key, kept = owner.key, PgLock(url, owner.key)  # kept: its connection outlives refusals
    one, inc = "PgLock refusal: try_acquire, increment", "PgLock increment alone"
    cold = "PgLock refusal: connect, try_acquire, increment, close"
    b_one, b_cold = "bare failing try_lock", "bare connect, failing try_lock, close"

    def refuse(lock: PgLock) -> float:
        try:
            lock.try_acquire(holder)
        except LockBusy:
            t0 = time.perf_counter()
            lock.increment(THRESHOLD)
            return since(t0)
        sys.exit("bench: a second PgLock took a held key")

    def pg_open() -> dict[str, float]:
        t0 = time.perf_counter()
        ms = refuse(kept)
        return {one: since(t0), inc: ms}

    def pg_cold() -> None:
        lock = PgLock(url, key)
        refuse(lock)
        lock.close()

    def plain_cold() -> None:
        with psycopg.connect(url, autocommit=True) as c:
            bare_lock(c, owner.key_id, expect=False, unlock=False)

    plain = timed(b_one, bare_lock, conn, owner.key_id, False, False)
    cases = [pg_open, timed(cold, pg_cold), plain, timed(b_cold, plain_cold)]
    return cases, [(one, b_one), (inc, b_one), (cold, b_cold)]


def heartbeat(conn: Any, owner: PgLock) -> tuple[list[Case], Spec]:
    held, one, locks = "PgLock held()", "bare SELECT 1", "bare pg_locks query (as held())"
    cases = [timed(held, owner.held), *(timed(row, conn.execute, sql) for row, sql in SQL)]
    return cases, [(held, one), (locks, one)]


def cli(url: str, tmp: Path) -> tuple[list[Case], Spec]:
    exe, python = Path(sys.executable).with_name("taskrunner"), sys.executable
    fleet, local = "taskrunner --lock-url URL --key K -c true", "taskrunner -l L -c true"
    imp = "python -c 'import psycopg'"
    argvs = {
        fleet: [str(exe), "--lock-url", url, "--key", f"{PREFIX}-e", "-c", "true"],
        local: [str(exe), "-l", str(tmp / "L"), "-c", "true"],
        imp: [python, "-c", "import psycopg"],
    }
    spec: Spec = [(fleet, local)]
    psql = shutil.which("psql")
    if psql:
        sql = f"select pg_try_advisory_lock({key_hash(PREFIX + '-e-psql')})"
        argvs[PSQL] = [psql, "-X", "-q", url, "-c", sql]
        spec += [(fleet, PSQL), (PSQL, local)]
    cases = [timed(name, run, argv) for name, argv in argvs.items()]
    return cases, [*spec, (imp, local)]


def machine(conn: Any) -> str:
    cpus = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpus if ln.startswith("model name")), "?")
    server = conn.execute("SHOW server_version").fetchone()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable) | "
        f"{platform.system()} {platform.release()} | {platform.python_implementation()} "
        f"{platform.python_version()} | PostgreSQL {server} at {conn.info.host}:"
        f"{conn.info.port} | psycopg {psycopg.__version__} ({psycopg.pq.__impl__})"
    )


def summarize(samples: dict[str, list[float]], spec: Spec) -> list[dict[str, Any]]:
    """The rows of ``spec``, then the baselines not in it."""
    rows, listed = [], {row for row, _ in spec}
    for row, base in [*spec, *dict.fromkeys((b, None) for _, b in spec if b and b not in listed)]:
        med = statistics.median(samples[row])
        p90 = statistics.quantiles(samples[row], n=10, method="inclusive")[8]
        x = med / statistics.median(samples[base]) if base else None
        rows.append({"case": row, "median_ms": med, "p90_ms": p90, "x": x, "vs": base})
    return rows


TITLES = {
    "a": "(a) connect + acquire + release: what one CLI run pays",
    "b": "(b) acquire + release on an open connection. PgLock cannot keep its connection: "
    "release() closes it, the next try_acquire() connects anew. Here it is opened first, "
    "untimed, through the private _connect(); the bare cases on a fresh session too (its "
    "first statements are the slower ones), or on a long-lived one",
    "c": "(c) a refusal (the key held by another session), the count's increment included. A "
    "refused PgLock keeps its connection: the first row reuses one",
    "d": "(d) the heartbeat, held() on a held lock",
    "e": "(e) the whole command line (wall time per run)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL, help=f"the database (default: {URL})")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    opts = parser.parse_args()
    rounds, runs = (40, 15) if opts.quick else (400, 80)
    holder = Holder.current("bench")
    conn = psycopg.connect(opts.url, autocommit=True)
    owner_c, owner_d = PgLock(opts.url, f"{PREFIX}-c"), PgLock(opts.url, f"{PREFIX}-d")
    tmp = Path(tempfile.mkdtemp(prefix="taskrunner-fleet-bench-", dir="/tmp"))
    res: dict[str, Any] = {"machine": machine(conn), "rounds": rounds, "cli_runs": runs}
    try:
        owner_c.try_acquire(Holder.current("bench: the holder"))
        owner_d.try_acquire(holder)
        sections = {
            "a": connect_acquire_release(opts.url, holder),
            "b": on_open_connection(opts.url, holder, conn),
            "c": refusal(opts.url, holder, conn, owner_c),
            "d": heartbeat(conn, owner_d),
            "e": cli(opts.url, tmp),
        }
        for name, (cases, spec) in sections.items():
            n = runs if name == "e" else rounds
            print(f"({name}) {n} rounds", flush=True)
            res[name] = summarize(interleave(cases, n), spec)
            if name == "d" and not owner_d.held():  # once False, held() stays False
                sys.exit("bench: the heartbeat said the lock was lost")
        sql = "SELECT count FROM taskrunner_locks WHERE key = %s"
        row = conn.execute(sql, (owner_c.key_id,)).fetchone()  # 2 a round, warm-up included
        res["count"] = {"expected": 2 * (rounds + 3), "in_row": row and row[0]}
    finally:
        owner_c.release()
        owner_d.release()
        sql = "DELETE FROM taskrunner_locks WHERE name LIKE %s"
        res["rows_deleted"] = conn.execute(sql, (PREFIX + "-%",)).rowcount
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n### taskrunner fleet lock against bare advisory locks\n\n{res['machine']}\n\n"
        f"{rounds} rounds in-process, {runs} runs of each command line, cases interleaved in "
        "shuffled order; times in ms; x = median / median of the row named in vs."
    )
    for name, title in TITLES.items():
        print(f"\n{title}.\n\n| case | median | p90 | x | vs |\n|---|--:|--:|--:|---|")
        for r in res[name]:
            x, vs = "" if r["x"] is None else f"{r['x']:.2f}", r["vs"] or ""
            print(f"| {r['case']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {x} | {vs} |")
    if not shutil.which("psql"):
        print("\npsql not found: no psql row in (e)")
    count, ok = res["count"], res["count"]["expected"] == res["count"]["in_row"]
    print(
        f"\nrefusals counted in (c): {count['in_row']} in the row, {count['expected']} "
        f"expected: {'PASS' if ok else 'FAIL'}; rows deleted: {res['rows_deleted']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"written: {(RESULTS / 'fleet.json').relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
