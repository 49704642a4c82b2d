"""The fleet lock against the real PostgreSQL: :mod:`taskrunner.pglock`.

Holders, refusals and counts are real processes running ``taskrunner.pglock`` (the script
below), as the runner will; the heartbeat and the waits are driven from the test itself.
The server is TASKRUNNER_TEST_PG_URL, by default the local one; without it the module is
skipped, except in CI (CI set), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from taskrunner.errors import Interrupted, LockBusy, LockUnusable
from taskrunner.holder import Holder

from conftest import HANG, start, wait_for

URL = os.environ.get("TASKRUNNER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _unreachable(why: str) -> None:
    shown = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", URL)  # no password in CI logs
    message = (
        f"PostgreSQL not reachable at {shown}: set TASKRUNNER_TEST_PG_URL or start the server "
        f"({why})"
    )
    if "CI" in os.environ:
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


try:
    import psycopg
    from psycopg.conninfo import make_conninfo
except ImportError:
    _unreachable("psycopg is not installed: pip install -e '.[test]'")
try:
    psycopg.connect(URL, connect_timeout=3).close()
except psycopg.Error as exc:
    _unreachable(str(exc).strip().splitlines()[0])

from taskrunner.pglock import PgLock, key_hash  # noqa: E402  (needs psycopg)

# argv: URL KEY [OPTIONS-JSON]. Takes the lock once; prints one JSON line: acquired (then
# holds until the "release" file exists, or stdin ends), busy (after counting the refusal),
# or unusable (exit 71).
SCRIPT = """\
import json, os, sys, time
from taskrunner.errors import LockBusy, LockUnusable
from taskrunner.holder import Holder
from taskrunner.pglock import PgLock
url, key = sys.argv[1], sys.argv[2]
opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
lock = PgLock(url, key, cumulative=opts.get("cumulative", False))
if opts.get("connect_first"):  # so that the attempts start closer together
    from taskrunner.signals import SignalWatch
    lock.wait_for_change(0.0, SignalWatch())
go = opts.get("go")
while go and not os.path.exists(go):
    time.sleep(0.001)
try:
    lock.try_acquire(Holder.current("job " + key))
except LockBusy as busy:
    count, fired = lock.increment(opts.get("threshold", 1000))
    holder = busy.holder
    print(json.dumps({"busy": True, "manual": busy.manual, "count": count, "fired": fired,
                      "pid": holder and holder.pid, "host": holder and holder.host}))
    sys.exit(75)
except LockUnusable as exc:
    print(json.dumps({"unusable": exc.reason, "path": exc.path}))
    sys.exit(71)
print(json.dumps({"acquired": True, "fencing": lock.fencing_token}), flush=True)
release = opts.get("release")
while release and not os.path.exists(release):
    time.sleep(0.005)
if not release:
    sys.stdin.read()
print(json.dumps({"held": lock.held()}), flush=True)
lock.release()
"""


def launch(key: str, url: str = URL, **opts: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, url, key, json.dumps(opts)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The first line a script prints (its attempt's outcome)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return json.loads(line)  # type: ignore[no-any-return]


def collect(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=HANG)
    assert err == ""
    return proc.returncode, out


def let_go(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Have a holder from :func:`hold` release the lock; its status and what it printed."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.stdin = None
    return collect(proc)


def attempt(key: str, url: str = URL, **opts: object) -> dict[str, Any]:
    """One attempt that must be refused, in a process of its own."""
    proc = launch(key, url, **opts)
    status, out = collect(proc)
    result: dict[str, Any] = json.loads(out)
    assert status == 75, result
    return result


def hold(key: str, scripts: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """A process holding ``key`` until its stdin is closed."""
    proc = launch(key)
    scripts.append(proc)
    assert outcome(proc)["acquired"]
    return proc


def row(admin: psycopg.Connection[Any], key: str) -> tuple[Any, ...]:
    found = admin.execute(
        "SELECT count, fencing, holder FROM taskrunner_locks WHERE key = %s", (key_hash(key),)
    ).fetchone()
    assert found is not None
    return tuple(found)


def measured(call: Callable[[], object]) -> tuple[object, float]:
    began = time.monotonic()
    result = call()
    return result, time.monotonic() - began


def fleet(key: str, *options: str, url: str = URL) -> tuple[str, ...]:
    """taskrunner's options for fleet mode on ``key`` (for test_fleet and test_fleet_status)."""
    return ("--lock-url", url, "--key", key, *options)


def holding(key: str, go: Path, *options: str, url: str = URL) -> Any:
    """A taskrunner run that holds ``key`` until ``go`` exists; returned once its command
    runs, and so once the lock is taken."""
    marker = go.with_suffix(".running")
    proc = start(*fleet(key, *options, url=url), "-c",
                 f"touch {marker}; while [ ! -e {go} ]; do sleep 0.01; done")  # fmt: skip
    wait_for(marker.exists, "the holder's command to start")
    return proc


@pytest.fixture
def admin() -> Any:
    with psycopg.connect(URL, autocommit=True) as conn:
        yield conn


@pytest.fixture
def key(request: pytest.FixtureRequest, admin: psycopg.Connection[Any]) -> Any:
    name = f"{request.node.name}-{os.urandom(4).hex()}"
    yield name
    admin.execute("DELETE FROM taskrunner_locks WHERE key = %s", (key_hash(name),))


@pytest.fixture
def scripts() -> Any:
    """Scripts a test launched: any still running at the end are killed."""
    launched: list[subprocess.Popen[str]] = []
    yield launched
    for proc in launched:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def locks() -> Any:
    """PgLocks made in the test process: closed at the end."""
    made: list[PgLock] = []
    yield made
    for lock in made:
        lock.close()


def test_key_hash_is_pinned() -> None:
    # Every host of a fleet must compute the same key: this value may never change.
    assert key_hash("backup") == -2429842175423148308
    assert key_hash("") == -1824766357935406494
    assert key_hash("backup ") != key_hash("backup")
    assert -(2**63) <= key_hash("é" * 1000) < 2**63
    import taskrunner.pglock

    assert "taskrunner-lock-key-v1" in (taskrunner.pglock.__doc__ or "")


def test_a_second_process_is_refused_and_told_who_holds(
    key: str, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    holder = hold(key, scripts)
    refused = attempt(key)
    assert refused == {
        "busy": True,
        "manual": False,
        "count": 1,
        "fired": False,
        "pid": holder.pid,
        "host": os.uname().nodename,
    }
    assert attempt(key)["count"] == 2
    assert row(admin, key)[0] == 2
    assert let_go(holder) == (0, '{"held": true}\n')


def _storm(
    key: str, tmp_path: Path, scripts: list[subprocess.Popen[str]], threshold: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """40 processes try the lock at once; the winner holds it until all others are done.
    The winners' and the refused processes' outcomes."""
    go, release = tmp_path / "go", tmp_path / "release"
    for _ in range(40):
        scripts.append(launch(key, go=str(go), release=str(release), threshold=threshold))
    go.touch()
    results = [(proc, outcome(proc)) for proc in scripts]
    won = [result for _, result in results if result.get("acquired")]
    refused = [result for _, result in results if result.get("busy")]
    for proc, result in results:
        if result.get("busy"):
            assert collect(proc)[0] == 75
    release.touch()
    for proc, result in results:
        if result.get("acquired"):
            assert collect(proc) == (0, '{"held": true}\n')
    return won, refused


def test_a_storm_of_40_one_runs_and_39_are_counted(
    key: str, tmp_path: Path, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    won, refused = _storm(key, tmp_path, scripts, threshold=1000)
    assert len(won) == 1
    assert len(refused) == 39
    assert sorted(r["count"] for r in refused) == list(range(1, 40))
    assert row(admin, key)[0] == 39


def test_a_storm_fires_once_every_threshold_plus_one_refusals(
    key: str, tmp_path: Path, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    won, refused = _storm(key, tmp_path, scripts, threshold=9)
    assert len(won) == 1
    counts = sorted(r["count"] for r in refused)
    assert counts == sorted([*range(1, 11), *range(1, 11), *range(1, 11), *range(1, 10)])
    assert [r["count"] for r in refused if r["fired"]] == [10, 10, 10]
    assert row(admin, key)[0] == 9


def test_kill_9_of_the_holder_frees_the_lock_at_once(
    key: str, scripts: list[subprocess.Popen[str]], locks: list[PgLock]
) -> None:
    holder = hold(key, scripts)
    lock = PgLock(URL, key)
    locks.append(lock)
    with pytest.raises(LockBusy):
        lock.try_acquire(Holder.current("next"))
    holder.kill()
    holder.wait()
    began = time.monotonic()

    def taken() -> bool:
        try:
            lock.try_acquire(Holder.current("next"))
        except LockBusy:
            return False
        return True

    wait_for(taken, "the lock of a killed holder to come free")
    assert time.monotonic() - began < 1.0
    assert lock.held()


def test_a_terminated_session_is_noticed_by_the_heartbeat(
    key: str, admin: psycopg.Connection[Any], locks: list[PgLock]
) -> None:
    lock = PgLock(URL, key)
    locks.append(lock)
    lock.try_acquire(Holder.current("job"))
    assert lock.held()
    name = f"taskrunner {os.uname().nodename} {os.getpid()}"
    backends = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
    ).fetchall()
    assert len(backends) == 1
    assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", backends[0]).fetchone() == (True,)
    held, took = measured(lambda: lock.held(timeout=2.0))
    assert held is False
    assert took < 1.0
    # The server freed the lock: another run may start now, which is why the run must stop
    # its command; the loss sticks.
    other = PgLock(URL, key)
    locks.append(other)
    other.try_acquire(Holder.current("other"))
    assert lock.held() is False
    assert lock.release() is True


class Proxy:
    """A TCP proxy to the server that can stop forwarding, as a partitioned network does
    (nothing is closed, nothing arrives)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        while not self.stopped.is_set():
            if self.frozen.is_set():
                time.sleep(0.01)
                continue
            for found, _ in sel.select(0.01):
                sock = found.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    client, _ = sock.accept()
                    upstream = socket.create_connection(self.target)
                    self.sockets += [client, upstream]
                    peers[client], peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
                if not data:
                    sel.unregister(sock)
                    peers[sock].shutdown(socket.SHUT_WR)
                    continue
                peers[sock].sendall(data)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def test_a_partition_is_noticed_by_the_heartbeats_deadline(
    key: str, admin: psycopg.Connection[Any], locks: list[PgLock]
) -> None:
    info = psycopg.conninfo.conninfo_to_dict(URL)
    proxy = Proxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    try:
        lock = PgLock(make_conninfo(URL, host="127.0.0.1", port=str(proxy.port)), key)
        locks.append(lock)
        lock.try_acquire(Holder.current("job"))
        assert lock.held(timeout=1.0)
        proxy.frozen.set()
        held, took = measured(lambda: lock.held(timeout=1.0))
        assert held is False
        assert 0.9 < took < 1.5
        # The server still keeps the session and its lock meanwhile (until its keepalives
        # give up): the run must stop its command before that.
        assert attempt(key)["manual"] is False
        assert lock.held() is False
        lock.close()
    finally:
        proxy.close()
    other = PgLock(URL, key)
    locks.append(other)

    def taken() -> bool:
        try:
            other.try_acquire(Holder.current("other"))
        except LockBusy:
            return False
        return True

    wait_for(taken, "the partitioned session's lock to be freed once its socket closed")


def test_the_servers_idle_session_timeout_does_not_end_a_hold(
    key: str, locks: list[PgLock]
) -> None:
    # As if the server's configuration said so: a session idle for 0.5 s would be ended.
    lock = PgLock(make_conninfo(URL, options="-c idle_session_timeout=500"), key)
    locks.append(lock)
    lock.try_acquire(Holder.current("job"))
    time.sleep(1.0)
    assert lock.held()


def test_a_session_that_already_holds_the_key_is_refused(key: str, locks: list[PgLock]) -> None:
    # What a pooler in transaction mode does: it hands a server session that holds the key
    # to another client, whose pg_try_advisory_lock would succeed too (the lock is
    # reentrant). Here the session takes the key itself, behind the lock's back.
    import psycopg as module

    lock = PgLock(URL, key)
    locks.append(lock)
    conn = lock._connect(module)
    conn.execute("SELECT pg_advisory_lock(%s)", (key_hash(key),))
    with pytest.raises(LockUnusable) as caught:
        lock.try_acquire(Holder.current("job"))
    assert caught.value.reason == (
        "the server session is shared or changes (a pooler in transaction mode?): "
        "session advisory locks need a direct connection or session pooling"
    )
    assert lock.fencing_token is None


def test_the_fencing_token_grows_by_one_with_every_acquisition(
    key: str, scripts: list[subprocess.Popen[str]], locks: list[PgLock]
) -> None:
    tokens = []
    for _ in range(3):
        proc = launch(key)
        scripts.append(proc)
        tokens.append(outcome(proc)["fencing"])
        assert let_go(proc) == (0, '{"held": true}\n')
    lock = PgLock(URL, key)
    locks.append(lock)
    lock.try_acquire(Holder.current("job"))
    tokens.append(lock.fencing_token)
    assert tokens == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["refusing", "silent", "black hole"])
def test_an_unreachable_server_is_unusable_within_a_bound(where: str) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        host = {
            "refusing": "127.0.0.1:1",
            "silent": f"127.0.0.1:{silent.getsockname()[1]}",
            "black hole": "10.255.255.1:5432",  # where the network does not answer at all
        }[where]
        lock = PgLock(f"postgresql://postgres:sekrit-pw@{host}/test", "job", connect_timeout=1)
        assert lock.description == f"job on {host}/test"
        began = time.monotonic()
        with pytest.raises(LockUnusable) as caught:
            lock.try_acquire(Holder.current("job"))
        # libpq waits 2 s at least, whatever is asked.
        assert time.monotonic() - began < 3.0
        error = caught.value
        assert error.path == lock.description
        assert "sekrit" not in error.reason
        assert "\n" not in error.reason
    finally:
        silent.close()


def test_a_refusal_counted_while_the_lock_is_taken_is_not_wiped(
    key: str, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    first = hold(key, scripts)  # makes the row
    let_go(first)
    admin.execute("UPDATE taskrunner_locks SET count = 5 WHERE key = %s", (key_hash(key),))

    def waiting(proc: subprocess.Popen[str]) -> bool:
        name = f"taskrunner {os.uname().nodename} {proc.pid}"
        found = admin.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
        return found is not None and found[0] == "Lock"

    # Hold the row as a run taking the lock does: the next taker queues first, a refusal
    # after it; the refusal must be counted after the taker's reset, not before.
    with psycopg.connect(URL) as other:  # a transaction, left open until the end
        other.execute("SELECT 1 FROM taskrunner_locks WHERE key = %s FOR UPDATE", (key_hash(key),))
        taker = launch(key)
        scripts.append(taker)
        wait_for(lambda: waiting(taker), "the taker to wait for the row")
        refuser = launch(key)
        scripts.append(refuser)
        wait_for(lambda: waiting(refuser), "the refusal to wait for the row")
    assert outcome(taker)["acquired"]
    assert outcome(refuser)["count"] == 1
    assert row(admin, key)[0] == 1
    let_go(taker)


def test_cumulative_acquisition_keeps_the_count(
    key: str, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    holder = hold(key, scripts)
    attempt(key)
    attempt(key)
    let_go(holder)
    proc = launch(key, cumulative=True)
    scripts.append(proc)
    assert outcome(proc)["acquired"]
    assert row(admin, key)[0] == 2
    let_go(proc)


def test_a_key_held_by_something_else_is_a_manual_hold(
    key: str, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    dead = hold(key, scripts)  # leaves its record in the row
    dead.kill()
    dead.wait()
    with psycopg.connect(URL, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (key_hash(key),))
        refused = attempt(key)
    assert refused["manual"] is True
    assert refused["pid"] is None
    assert refused["count"] == 1


def connected(admin: psycopg.Connection[Any]) -> int:
    """How many sessions of taskrunner (of this host) there are."""
    prefix = f"taskrunner {os.uname().nodename} %"
    found = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (prefix,)
    ).fetchone()
    return int(found[0]) if found else 0


def test_the_table_is_made_by_racing_first_runs(
    tmp_path: Path, admin: psycopg.Connection[Any], scripts: list[subprocess.Popen[str]]
) -> None:
    schema = f"taskrunner_test_{os.urandom(4).hex()}"
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        url = make_conninfo(URL, options=f"-c search_path={schema}")
        go, release = tmp_path / "go", tmp_path / "release"
        for _ in range(10):
            scripts.append(
                launch("first", url, go=str(go), release=str(release), connect_first=True)
            )
        wait_for(lambda: connected(admin) >= 10, "the scripts to connect")
        go.touch()
        results = [outcome(proc) for proc in scripts]
        release.touch()
        assert sum(1 for r in results if r.get("acquired")) == 1, results
        assert sum(1 for r in results if r.get("busy")) == 9, results
        found = admin.execute(f"SELECT count FROM {schema}.taskrunner_locks").fetchall()
        assert found == [(9,)]
    finally:
        for proc in scripts:
            proc.communicate(timeout=HANG)
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def test_waiting_ends_when_the_holder_lets_go_or_at_the_deadline(
    key: str, scripts: list[subprocess.Popen[str]], locks: list[PgLock]
) -> None:
    from taskrunner.signals import SignalWatch

    holder = hold(key, scripts)
    lock = PgLock(URL, key)
    locks.append(lock)
    with pytest.raises(LockBusy):
        lock.try_acquire(Holder.current("waiter"))
    watch = SignalWatch()
    changed, took = measured(lambda: lock.wait_for_change(time.monotonic() + 0.3, watch))
    assert changed is False
    assert 0.3 <= took < 0.6
    holder.stdin.close()  # type: ignore[union-attr]
    holder.stdin = None
    changed, took = measured(lambda: lock.wait_for_change(time.monotonic() + 10, watch))
    assert changed is True
    assert took < 1.0
    lock.try_acquire(Holder.current("waiter"))
    assert lock.held()
    collect(holder)


def test_a_signal_ends_the_wait(
    key: str, scripts: list[subprocess.Popen[str]], locks: list[PgLock]
) -> None:
    from taskrunner.signals import SignalWatch

    hold(key, scripts)
    lock = PgLock(URL, key)
    locks.append(lock)
    with pytest.raises(LockBusy):
        lock.try_acquire(Holder.current("waiter"))
    watch = SignalWatch()
    watch.install()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        began = time.monotonic()
        with pytest.raises(Interrupted):
            lock.wait_for_change(time.monotonic() + 10, watch)
        assert time.monotonic() - began < 1.0
        timer.join()
    finally:
        watch.restore()


def test_without_psycopg_one_line_says_what_to_install() -> None:
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from taskrunner.errors import LockUnusable\n"
        "from taskrunner.holder import Holder\n"
        "from taskrunner.pglock import PgLock\n"
        "lock = PgLock('postgresql://u:sekrit-pw@db.example:6543/jobs', 'backup')\n"
        "try:\n"
        "    lock.try_acquire(Holder.current('job'))\n"
        "except LockUnusable as exc:\n"
        "    print(f'{exc.path}: {exc.reason}')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "backup on db.example:6543/jobs: fleet mode needs psycopg: "
        "pip install 'taskrunner-lock[postgres]'\n"
    )
