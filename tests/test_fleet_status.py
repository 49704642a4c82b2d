"""``taskrunner status --lock-url URL KEY...``: fleet locks, held or free, by which host and
pid, with their count, against the real PostgreSQL, and never a change to a lock.

Skipped without a server, except in CI (see test_fleet_backend.py, whose set-up this shares).
"""

# ruff: noqa: F811  (the fixtures of test_fleet_backend, taken as arguments)
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from taskrunner.pglock import key_hash
from test_fleet_backend import URL, admin, fleet, holding, key, psycopg, row  # noqa: F401 (fixtures)

from conftest import finish, run, start, wait_for

HOST = socket.gethostname()
WHERE = "127.0.0.1:5432/test"
UNREACHABLE = "postgresql://postgres:sekrit-pw@127.0.0.1:1/test"


def status(*args: str, url: str = URL) -> subprocess.CompletedProcess[str]:
    return run("status", "--lock-url", url, *args)


def table(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The table's rows (without the heading), as words, up to the blank line before notes."""
    lines = result.stdout.split("\n\n")[0].splitlines()
    assert lines[0].split() == ["STATE", "LOCK", "PID", "HOST", "AGE", "COUNT", "COMMAND"]
    return [line.split(maxsplit=6) for line in lines[1:]]


def notes(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stdout.partition("\n\n")[2].splitlines()


def as_json(*keys: str, code: int = 0, url: str = URL) -> list[dict[str, Any]]:
    result = status("--json", *keys, url=url)
    assert result.returncode == code, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def holders(admin: psycopg.Connection[Any], name: str) -> list[tuple[Any, ...]]:
    """What pg_locks says of the key: every granted or waiting advisory lock on it."""
    k = key_hash(name)
    found = admin.execute(
        "SELECT pid, granted, mode FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
        "AND classid = %s::oid AND objid = %s::oid ORDER BY pid",
        ((k >> 32) & 0xFFFFFFFF, k & 0xFFFFFFFF),
    ).fetchall()
    return [tuple(one) for one in found]


def settled(key: str, go: Path, admin: psycopg.Connection[Any]) -> Any:
    """A run holding ``key`` until ``go`` exists, once its record names its command."""
    proc = holding(key, go)
    wait_for(lambda: "\ncommand_pid " in (row(admin, key)[2] or ""), "the command's pid")
    return proc


def test_a_key_never_used_is_free_with_a_count_of_0(key: str):
    result = status(key)
    assert (result.returncode, result.stderr) == (0, "")
    assert table(result) == [["free", key, "-", "-", "-", "0", "-"]]
    assert notes(result) == []
    assert as_json(key) == [
        {"key": key, "lock": f"{key} on {WHERE}", "state": "free", "holder": None,
         "since": None, "age": None, "count": 0, "backend_pid": None},
    ]  # fmt: skip


def test_a_key_held_by_a_run_shows_its_pid_host_command_and_age(key: str, admin, tmp_path: Path):
    go = tmp_path / "go"
    holder = settled(key, go, admin)
    try:
        result = status(key)
        assert (result.returncode, result.stderr) == (0, "")
        ((state, lock, pid, host, age, count, command),) = table(result)
        assert (state, lock, pid, host, count) == ("held", key, str(holder.pid), HOST, "0")
        assert age.endswith("s") and int(age[:-1]) < 60
        assert command.startswith("touch ")
        (found,) = as_json(key)
        assert found["state"] == "held"
        assert found["holder"]["pid"] == holder.pid
        assert found["holder"]["host"] == HOST
        assert found["holder"]["command"].startswith(f"touch {go.with_suffix('.running')}")
        assert found["holder"]["runner_running"] is True
        assert found["holder"]["command_pid"] is not None
        assert 0 <= found["age"] < 60
        assert found["since"] == found["holder"]["since"]
        (session,) = holders(admin, key)
        assert found["backend_pid"] == session[0]
    finally:
        go.touch()
    assert finish(holder)[0] == 0
    assert table(status(key))[0][0] == "free"


def test_a_key_held_by_another_session_is_a_manual_hold(key: str, tmp_path: Path):
    with psycopg.connect(URL, autocommit=True) as other:
        backend = other.execute("SELECT pg_backend_pid()").fetchone()
        other.execute("SELECT pg_advisory_lock(%s)", (key_hash(key),))
        result = status(key)
        (found,) = as_json(key)
    assert (result.returncode, result.stderr) == (0, "")
    assert table(result) == [["manual", key, "-", "-", "-", "0", "-"]]
    assert backend is not None
    assert notes(result) == [
        f"{key}: held by the database session of backend pid {backend[0]}, "
        "which is not a run of taskrunner's"
    ]
    assert (found["state"], found["holder"], found["since"]) == ("manual", None, None)
    assert found["backend_pid"] == backend[0]


def test_a_manual_hold_is_told_from_the_last_runs_record(key: str, tmp_path: Path):
    assert run(*fleet(key), "-c", "true").returncode == 0  # leaves its record in the row
    with psycopg.connect(URL, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (key_hash(key),))
        (found,) = as_json(key)
    assert (found["state"], found["holder"]) == ("manual", None)


def test_the_count_of_refusals_is_shown(key: str, admin, tmp_path: Path):
    go = tmp_path / "go"
    holder = settled(key, go, admin)
    try:
        for _ in range(3):
            assert run(*fleet(key, "-t", "5"), "-c", "true").returncode == 75
        (found,) = as_json(key)
        assert (found["state"], found["count"]) == ("held", 3)
        assert table(status(key))[0][5] == "3"
    finally:
        go.touch()
    assert finish(holder)[0] == 0
    (found,) = as_json(key)
    assert (found["state"], found["count"]) == ("free", 3), "the count stays until a run resets it"


def test_several_keys_in_the_order_given(key: str, admin, tmp_path: Path):
    held, free, manual = f"{key}-held", f"{key}-free", f"{key}-manual"
    go = tmp_path / "go"
    holder = holding(held, go)
    try:
        with psycopg.connect(URL, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (key_hash(manual),))
            result = status(manual, held, free, held)
            found = as_json(free, manual, held)
        assert result.returncode == 0
        assert [(r[0], r[1]) for r in table(result)] == [
            ("manual", manual), ("held", held), ("free", free), ("held", held),
        ]  # fmt: skip
        assert table(result)[1][2] == str(holder.pid)
        assert [(f["key"], f["state"]) for f in found] == [
            (free, "free"), (manual, "manual"), (held, "held"),
        ]  # fmt: skip
    finally:
        go.touch()
        assert finish(holder)[0] == 0
        admin.execute("DELETE FROM taskrunner_locks WHERE key = %s", (key_hash(held),))


def test_an_unreachable_server_makes_every_key_unusable_with_one_reason():
    result = status("a", "b", url=UNREACHABLE)
    assert result.returncode == 71
    assert result.stderr == ""
    assert table(result) == [
        ["unusable", "a", "-", "-", "-", "?", "-"],
        ["unusable", "b", "-", "-", "-", "?", "-"],
    ]
    (note,) = notes(result)
    assert note.startswith("127.0.0.1:1/test: connection failed")
    assert "sekrit" not in result.stdout
    found = as_json("a", "b", code=71, url=UNREACHABLE)
    assert [(f["key"], f["state"], f["count"]) for f in found] == [
        ("a", "unusable", None), ("b", "unusable", None),
    ]  # fmt: skip
    assert found[0]["error"] == found[1]["error"] == note.partition(": ")[2]
    assert found[0]["lock"] == "a on 127.0.0.1:1/test"


def test_a_missing_table_is_free_and_status_creates_none(key: str, admin):
    schema = f"status_empty_{os.urandom(4).hex()}"
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        url = f"{URL}?options=-csearch_path%3D{schema}"
        (found,) = as_json(key, url=url)
        assert (found["state"], found["count"]) == ("free", 0)
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (key_hash(key),))
            (found,) = as_json(key, url=url)
            assert found["state"] == "manual"
        made = admin.execute("SELECT to_regclass(%s)", (f"{schema}.taskrunner_locks",)).fetchone()
        assert made == (None,)
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def test_status_never_takes_the_lock(key: str, admin, tmp_path: Path):
    # Free: a run started at the moment status is looking still gets the lock.
    for _ in range(5):
        looking = start("status", "--lock-url", URL, key)
        assert run(*fleet(key), "-c", "true").returncode == 0
        assert finish(looking)[0] == 0
    # Held: the holder keeps holding, and pg_locks shows the same as before.
    go = tmp_path / "go"
    holder = settled(key, go, admin)
    try:
        before = holders(admin, key)
        assert len(before) == 1 and before[0][1] is True
        for _ in range(5):
            assert status(key).returncode == 0
            assert holders(admin, key) == before
        assert holder.poll() is None, "the holder still runs"
        assert row(admin, key)[0] == 0, "status counted no refusal"
    finally:
        go.touch()
    assert finish(holder)[0] == 0, "the holder never lost its lock"


def test_fleet_status_usage_errors(tmp_path: Path):
    cases = [
        (["--lock-url", URL], "no key given"),
        (["--lock-url", URL, "-f", str(tmp_path / "C"), "k"], "-f/--counter-file is for lock files"),
        (["-f", str(tmp_path / "C"), "--lock-url", URL, "k"], "-f/--counter-file is for lock files"),
        (["--lock-url"], "--lock-url needs a value (URL)"),
        (["--lock-url", URL, "--lock-url", URL, "k"], "--lock-url given more than once"),
        (["--lock-url", "mysql://u:pw@h/db", "k"], "not a postgresql:// URL"),
        (["--lock-url", URL, ""], "a key is empty"),
    ]  # fmt: skip
    for args, expected in cases:
        result = run("status", *args)
        assert (result.returncode, result.stdout) == (2, ""), args
        usage, error = result.stderr.splitlines()
        assert usage == "usage: taskrunner status [--json] --lock-url URL KEY..."
        assert error.startswith("taskrunner: error: ") and expected in error, (args, error)
        assert "pw@" not in error
    shown = run("status", "--help")
    assert shown.returncode == 0
    assert "       taskrunner status [--json] --lock-url URL KEY...\n" in shown.stdout


def test_without_psycopg_one_line_and_71():
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from taskrunner.cli import main\n"
        f"sys.exit(main(['status', '--lock-url', {URL!r}, 'k']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (71, "")
    assert result.stderr == (
        "taskrunner: error: fleet mode needs psycopg: pip install 'taskrunner-lock[postgres]'\n"
    )
