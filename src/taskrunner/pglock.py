"""The fleet lock: a PostgreSQL session advisory lock, with the count and a fencing token.

One lock is one *key*, a name given with ``--key``. Taskrunner turns it into the 64-bit
advisory-lock key itself, with a versioned hash (key version 1)::

    key = signed big-endian int of sha256(b"taskrunner-lock-key-v1\\0" + UTF-8 name)[:8]

Every run of every host must compute the same number for the same name, or two of them run
at once: a change of this formula is a new version, with a new prefix, and a release note.

The lock is ``pg_try_advisory_lock(key)`` on a dedicated autocommit connection, so it lasts
as long as that session: the server frees it the moment the session ends, whether the run
let go or died; a host that crashed or was cut off keeps it until the *server's* TCP
keepalives give up (``tcp_keepalives_*`` in its configuration; 2 h and more by the Linux
defaults), or the server ends the session otherwise (``pg_terminate_backend``, a restart).
The count of
refusals, the fencing token and the last holder's record live in one row per key of a table
taskrunner creates if it is missing::

    CREATE TABLE IF NOT EXISTS taskrunner_locks (
        key bigint PRIMARY KEY, name text NOT NULL, count bigint NOT NULL DEFAULT 0,
        fencing bigint NOT NULL DEFAULT 0, holder text, acquired_at timestamptz)

Taking the lock locks that row first and keeps it locked until the reset of the count and the
new fencing token are committed, so a refusal counted by another run once the lock is taken
waits for the row and is never wiped by that reset. ``holder`` is the holder's record
(:meth:`taskrunner.holder.Holder.encode`) plus a ``backend_pid`` line naming its session,
which tells a taskrunner holder from anything else that holds the key (a manual hold).

Nothing may hang: connecting is bounded by ``connect_timeout``, every statement by
``statement_timeout`` and ``lock_timeout`` (set on the session) and by the kernel's
``tcp_user_timeout``; :meth:`PgLock.held`, the heartbeat, by a deadline of its own, enforced
on the client by polling the socket, since a partitioned network can keep a query waiting
silently for many minutes. The session's ``idle_session_timeout`` is turned off, since
the server ending the session of a healthy run would free the lock under its command.

A connection pooler in transaction mode breaks session locks: the lock stays with a server
session that the run no longer talks to, or that other clients share, and would take again
(advisory locks are reentrant). It is unsupported, and refused where it shows: when the
session's backend changes between two statements, or already holds the key it is to take.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import select
import time

from taskrunner.errors import CounterUnusable, LockBusy, LockUnusable
from taskrunner.holder import Holder
from taskrunner.lockfile import FREE, HELD, MANUAL, LockState
from taskrunner.process import Heartbeat
from taskrunner.signals import SignalWatch, signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, Callable

    import psycopg
    from psycopg.rows import TupleRow

    from taskrunner.backend import Tally

    Connection = psycopg.Connection[TupleRow]

KEY_VERSION = 1
_KEY_PREFIX = b"taskrunner-lock-key-v1\0"
_TABLE = "taskrunner_locks"
_STATEMENT_TIMEOUT = "10s"  # for our own statements, server side
_TCP_USER_TIMEOUT_MS = 10000  # unacknowledged data: the kernel drops the connection
_HEARTBEAT_TIMEOUT = 2.0  # default deadline of held()
#: Seconds between two checks that the session still holds the lock, while the command runs.
HEARTBEAT_INTERVAL = 1.0
_RELEASE_TIMEOUT = 5.0
_POLL = 0.05  # seconds between looks while waiting for the holder
_KEEPER_POLL = 0.2  # seconds between a keeper's looks at the command
_ANSWER = 10.0  # seconds the server has to answer a statement, as its statement_timeout
_STALL_REPEAT = 0.5
_STALLED = f"no answer from the server within {_ANSWER:g}s"
_INSPECT_TRIES = 20  # looks, _POLL apart, while a run of taskrunner's is taking the key
_APP_NAME_MAX = 63  # bytes: the server's NAMEDATALEN - 1
_MISSING = "fleet mode needs psycopg: pip install 'taskrunner-lock[postgres]'"
#: The line that says psycopg is missing.
MISSING = _MISSING
_POOLER = (
    "the server session is shared or changes (a pooler in transaction mode?): session "
    "advisory locks need a direct connection or session pooling"
)


def key_hash(name: str) -> int:
    """The advisory-lock key of ``name`` (key version 1): a signed 64-bit integer."""
    digest = hashlib.sha256(_KEY_PREFIX + name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _psycopg(where: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise LockUnusable(where, _MISSING) from None
    return psycopg


class _Stalled(BaseException):
    """Raised by the alarm of :func:`_answered_within`: the server has not answered."""


@contextlib.contextmanager
def _answered_within(seconds: float) -> Iterator[None]:
    """Cut the statements run in this block short with :class:`_Stalled` after ``seconds``:
    a connection that stays open but gets no answer (a stalled proxy) gives no error on its
    own. The alarm repeats, so that a ROLLBACK on the way out is cut short too. Main thread
    only, as signal handlers are; elsewhere the block runs unguarded."""

    def stalled(signum: int, frame: object) -> None:
        raise _Stalled

    try:
        old = signal.signal(signal.SIGALRM, stalled)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds, _STALL_REPEAT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Failed(Exception):
    """A bounded statement failed or ran out of time: the connection is not to be trusted."""


class DatabaseUnusable(LockUnusable):
    """No key of the database can be looked at: psycopg is missing, or the server cannot
    be reached or refuses the connection. ``where`` names the database (``HOST:PORT/DB``)."""

    def __init__(self, path: str, reason: str, where: str) -> None:
        super().__init__(path, reason)
        self.where = where


class FleetState(LockState):
    """What :meth:`PgLock.inspect` found: a :class:`LockState` (FREE, HELD or MANUAL; never
    STALE, since the server frees a dead session's lock) with the count of refusals and the
    server session (backend pid) holding the key, if any."""

    __slots__ = ("backend", "count")

    def __init__(
        self,
        state: str,
        holder: Holder | None = None,
        *,
        count: int = 0,
        backend: int | None = None,
    ) -> None:
        # A holder's runner is on some host of the fleet: whether it runs cannot be told.
        super().__init__(state, holder, runner_running=holder is not None)
        #: The count of refusals in the key's row (0 without one).
        self.count = count
        #: The backend pid of the session holding the key; None when FREE.
        self.backend = backend


# -- SQL -----------------------------------------------------------------------------------

_CREATE = f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
    key bigint PRIMARY KEY, name text NOT NULL, count bigint NOT NULL DEFAULT 0,
    fencing bigint NOT NULL DEFAULT 0, holder text, acquired_at timestamptz)"""

# One round trip at connection: our session's backend, and its timeouts.
_SETUP = """SELECT pg_backend_pid(),
    set_config('statement_timeout', %(timeout)s, false),
    set_config('lock_timeout', %(timeout)s, false),
    (SELECT set_config(name, '0', false) FROM pg_settings WHERE name = 'idle_session_timeout')"""

# Where a bigint key shows in pg_locks: its high and low halves.
_KEY_IN_PG_LOCKS = """locktype = 'advisory' AND objsubid = 1
    AND classid = %(classid)s::oid AND objid = %(objid)s::oid"""

# The row is created or locked (DO UPDATE locks it even when it changes nothing) before the
# advisory lock is tried. NULL rather than trying when the backend is not our session's, or
# already holds the key: a pooler shares it, and the lock, which would be taken twice.
_TRY = f"""INSERT INTO {_TABLE} AS t (key, name) VALUES (%(key)s, %(name)s)
ON CONFLICT (key) DO UPDATE SET name = t.name
RETURNING t.name, t.holder, t.acquired_at, CASE
    WHEN pg_backend_pid() <> %(pid)s THEN NULL
    WHEN EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND {_KEY_IN_PG_LOCKS})
        THEN NULL
    ELSE pg_try_advisory_lock(t.key) END"""

_TAKE = f"""UPDATE {_TABLE}
SET fencing = fencing + 1, count = CASE WHEN %(cumulative)s THEN count ELSE 0 END,
    holder = %(holder)s, acquired_at = now()
WHERE key = %(key)s RETURNING fencing"""

# The session holding the key now, if any.
_HOLDING = f"""SELECT pid FROM pg_locks WHERE granted AND {_KEY_IN_PG_LOCKS}
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""

# One statement, so no increment is lost. RETURNING sees only the new count, 0 after a
# reset: the count before comes from the subquery, read under the row's lock.
_INCREMENT = f"""UPDATE {_TABLE} AS t
SET count = CASE WHEN old.count + 1 > %(threshold)s THEN 0 ELSE old.count + 1 END
FROM (SELECT key, count FROM {_TABLE} WHERE key = %(key)s FOR UPDATE) AS old
WHERE t.key = old.key RETURNING old.count + 1"""

_ADD_ROW = f"INSERT INTO {_TABLE} (key, name) VALUES (%(key)s, %(name)s) ON CONFLICT DO NOTHING"

# Free now? Tried and let go at once, so that the waiter holds nothing meanwhile.
_PROBE = "SELECT CASE WHEN pg_try_advisory_lock(%(key)s) THEN pg_advisory_unlock(%(key)s) END"

# Best effort, never waiting for a row an operator's open transaction has locked.
_NOTE = f"""UPDATE {_TABLE} SET holder = $1
WHERE key = (SELECT key FROM {_TABLE} WHERE key = $2 FOR UPDATE SKIP LOCKED)"""

# What status shows: the sessions holding the key (several for a shared hold), and the row.
_HOLDERS = f"""SELECT array_agg(pid ORDER BY pid) FROM pg_locks WHERE granted AND {_KEY_IN_PG_LOCKS}
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
_INSPECT = f"""SELECT ({_HOLDERS}), t.count, t.name, t.holder
FROM (SELECT 1) AS one LEFT JOIN {_TABLE} AS t ON t.key = %(key)s"""
_OURS = """SELECT EXISTS (SELECT 1 FROM pg_stat_activity
    WHERE pid = %(pid)s AND application_name LIKE 'taskrunner %%')"""

# The heartbeat: does this very session hold the key?
_HELD = f"""SELECT EXISTS (SELECT 1 FROM pg_locks
    WHERE granted AND pid = pg_backend_pid() AND {_KEY_IN_PG_LOCKS})"""


# -- the lock --------------------------------------------------------------------------------


class PgLock:
    """The lock ``key`` in the database at ``url``, as described in the module docstring.

    It is also the run's counter (the count lives in the same row): :meth:`increment`,
    :meth:`reset_around` and :meth:`check` are those of :class:`taskrunner.counter.Counter`.
    """

    def __init__(
        self, url: str, key: str, *, cumulative: bool = False, connect_timeout: float = 10.0
    ) -> None:
        self.url = url
        self.key = key
        self.key_id = key_hash(key)
        self.cumulative = cumulative
        self.connect_timeout = connect_timeout
        self._password, where = _where(url)
        self.description = f"{key} on {where}"
        self.path = self.description  # as the counter is named in messages
        self.recovered: Holder | None = None  # a dead session's lock is freed by the server
        self.caveat: str | None = None
        self.garbage: bytes | None = None  # a count in a bigint column is always a count
        self.tally: Tally | None = self  # the count lives in the lock's row
        #: The fencing token of the current hold: grows by one with every acquisition.
        self.fencing_token: int | None = None
        self._conn: Connection | None = None
        self._backend = 0  # our session's backend pid
        self._holder: Holder | None = None
        self._lost = False  # the connection failed or timed out: never trusted again
        self._keeper: int | None = None  # pid of the process keeping the session for the command

    # -- acquiring ---------------------------------------------------------------------

    def try_acquire(self, holder: Holder) -> None:
        if self.fencing_token is not None:
            raise RuntimeError("lock already held")
        psycopg = _psycopg(self.description)
        try:
            with _answered_within(_ANSWER):
                self._acquire(psycopg, holder)
        except _Stalled:
            self._lost = True
            self.close()
            raise LockUnusable(self.description, _STALLED) from None

    def _acquire(self, psycopg: Any, holder: Holder) -> None:
        conn = self._connect(psycopg)
        try:
            try:
                row = self._try(conn, holder)
            except psycopg.errors.UndefinedTable:
                self._create_table(psycopg, conn)
                row = self._try(conn, holder)
            if row is None:  # taken: check that the session still holds it
                if conn.execute(_HELD, self._halves()).fetchone() != (True,):
                    raise _Failed(_POOLER)
                return
            busy = self._busy(conn, row)
        except psycopg.Error as exc:
            self.close()
            raise LockUnusable(self.description, self._reason(exc)) from None
        except _Failed as exc:
            self.close()
            raise LockUnusable(self.description, str(exc)) from None
        raise busy

    def _connect(self, psycopg: Any) -> Connection:
        if self._conn is not None and not self._lost:
            return self._conn
        self.close()
        name = f"taskrunner {os.uname().nodename} {os.getpid()}".encode()[:_APP_NAME_MAX]
        try:
            conn: Connection = psycopg.connect(
                self.url,
                autocommit=True,
                prepare_threshold=None,
                application_name=name.decode("utf-8", "ignore"),
                connect_timeout=max(1, math.ceil(self.connect_timeout)),
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                tcp_user_timeout=_TCP_USER_TIMEOUT_MS,
                # Whatever the URL says: keys and records are UTF-8 text, and the raw
                # statements of note_command and held() send them as such.
                client_encoding="UTF8",
            )
        except psycopg.Error as exc:
            raise LockUnusable(self.description, self._reason(exc)) from None
        try:
            row = conn.execute(_SETUP, {"timeout": _STATEMENT_TIMEOUT}).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise LockUnusable(self.description, self._reason(exc)) from None
        assert row is not None
        self._conn, self._backend, self._lost = conn, row[0], False
        return conn

    def _try(self, conn: Connection, holder: Holder) -> tuple[Any, ...] | None:
        """One attempt in one transaction: None if it took the lock, else the row's
        ``(name, holder, acquired_at, taken)``."""
        key = self.key_id
        with conn.transaction():
            params = {"key": key, "name": _text(self.key), "pid": self._backend, **self._halves()}
            row: tuple[Any, ...] | None = conn.execute(_TRY, params).fetchone()
            assert row is not None
            if row[0] != _text(self.key):
                raise _Failed(f"key hash {key} is already used by the key {row[0]!r}")
            if row[3] is None:
                raise _Failed(_POOLER)
            if not row[3]:
                return row
            if time.time() - holder.started > 1.0:
                holder.started = time.time()  # a waiter's record: say when it took the lock
            self._holder = holder
            take = {"key": key, "cumulative": self.cumulative, "holder": self._record()}
            taken = conn.execute(_TAKE, take).fetchone()
            assert taken is not None
        self.fencing_token = taken[0]  # once committed
        return None

    def _create_table(self, psycopg: Any, conn: Connection) -> None:
        errors = psycopg.errors
        try:
            conn.execute(_CREATE)
        except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject):
            # Another run created it at the same moment: these say that its catalog rows
            # are committed, so the table is there now.
            pass
        except psycopg.Error as exc:
            raise _Failed(f"cannot create table {_TABLE}: {self._reason(exc)}") from None

    def _busy(self, conn: Connection, row: tuple[Any, ...]) -> LockBusy:
        """The refusal: the row's holder, if the session holding the key is the one it
        names; otherwise a manual hold (something else took the key)."""
        _name, record, acquired_at, _taken = row
        since = acquired_at.timestamp() if acquired_at is not None else None
        holder = Holder.decode(record.encode()) if record else None
        found = conn.execute(_HOLDING, self._halves()).fetchone()
        if found is not None and holder is not None and found[0] != _backend_of(record):
            holder, since = None, None
        return LockBusy(self.description, holder, since)

    def _halves(self) -> dict[str, int]:
        return {"classid": (self.key_id >> 32) & 0xFFFFFFFF, "objid": self.key_id & 0xFFFFFFFF}

    def _record(self) -> str:
        assert self._holder is not None
        # Text columns take neither NUL nor bytes that are not UTF-8.
        text = self._holder.encode().decode("utf-8", "replace").replace("\0", "\ufffd")
        return f"{text}backend_pid {self._backend}\n"

    # -- operations: what an operator sees -------------------------------------------

    def inspect(self) -> FleetState:
        """Who holds the key now, for ``taskrunner status``, without disturbing a run: on a
        connection of its own, closed after, that never takes the advisory lock nor waits
        for the row, and creates no table (a missing one: the key is free). HELD when the
        session holding the key is the one the row's record names; MANUAL when something
        else holds it. Raises ``DatabaseUnusable`` when no key can be looked at (psycopg
        missing, the server unreachable), ``LockUnusable`` for a failure on this key."""
        _password, where = _where(self.url)
        try:
            psycopg = _psycopg(self.description)
            probe = PgLock(self.url, self.key, connect_timeout=self.connect_timeout)
            conn = probe._connect(psycopg)
        except LockUnusable as exc:
            raise DatabaseUnusable(self.description, exc.reason, where) from None
        try:
            for _ in range(_INSPECT_TRIES - 1):
                state = probe._look(psycopg, conn)
                if state.state != MANUAL or not probe._taking(conn, state.backend):
                    return state
                time.sleep(_POLL)  # a run is taking the key: its record is on its way
            return probe._look(psycopg, conn)
        except psycopg.Error as exc:
            raise LockUnusable(self.description, self._reason(exc)) from None
        except _Failed as exc:
            raise LockUnusable(self.description, str(exc)) from None
        finally:
            probe.close()

    def _look(self, psycopg: Any, conn: Connection) -> FleetState:
        params = {"key": self.key_id, **self._halves()}
        try:
            row = conn.execute(_INSPECT, params).fetchone()
        except psycopg.errors.UndefinedTable:  # no run has used the database yet
            row = (*(conn.execute(_HOLDERS, params).fetchone() or (None,)), 0, None, None)
        assert row is not None
        backends, count, name, record = row
        count = count or 0
        if name is not None and name != _text(self.key):
            raise _Failed(f"key hash {self.key_id} is already used by the key {name!r}")
        if not backends:
            return FleetState(FREE, count=count)
        holder = Holder.decode(record.encode()) if record else None
        if holder is not None and len(backends) == 1 and backends[0] == _backend_of(record):
            return FleetState(HELD, holder, count=count, backend=backends[0])
        return FleetState(MANUAL, count=count, backend=backends[0])

    def _taking(self, conn: Connection, backend: int | None) -> bool:
        """Whether the session ``backend``, holding the key though the row does not name
        it, is a run of taskrunner's between taking the key and recording itself."""
        row = conn.execute(_OURS, {"pid": backend}).fetchone()
        return row is not None and bool(row[0])

    # -- counting: the runner's counter ------------------------------------------------

    def increment(self, threshold: int) -> tuple[int, bool]:
        """Count one refusal. Returns the count, this refusal included, and whether it
        exceeded ``threshold``; if it did, the count is reset to 0."""
        psycopg = _psycopg(self.description)
        try:
            with _answered_within(_ANSWER):
                conn = self._connect(psycopg)
                params = {"key": self.key_id, "threshold": threshold, "name": _text(self.key)}
                for _ in range(2):
                    row = conn.execute(_INCREMENT, params).fetchone()
                    if row is not None:
                        return row[0], row[0] > threshold
                    conn.execute(_ADD_ROW, params)  # an operator deleted the row meanwhile
        except _Stalled:
            self._lost = True
            self.close()
            raise CounterUnusable(self.description, _STALLED) from None
        except psycopg.Error as exc:
            raise CounterUnusable(self.description, self._reason(exc)) from None
        except LockUnusable as exc:
            raise CounterUnusable(self.description, exc.reason) from None
        raise CounterUnusable(self.description, "the lock's row keeps disappearing")

    def reset_around(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt``: taking the lock resets the count in the same transaction."""
        attempt()

    def check(self) -> None:
        """Nothing to check before connecting: the first attempt says."""

    # -- holding -----------------------------------------------------------------------

    def held(self, timeout: float = _HEARTBEAT_TIMEOUT) -> bool:
        """Whether the server says that this session holds the lock, asked within
        ``timeout`` seconds. False on any failure (the connection is gone, the session was
        ended, no answer in time), and from then on: the connection is never trusted again.
        It is not closed, though, so a session that does still hold the lock keeps it
        until the run has stopped its command and closes it."""
        if self._lost or self.fencing_token is None:
            return False
        try:
            # Integers of ours filled in: the bounded path sends the text as it is.
            query = (_HELD % self._halves()).encode()
            if self._bounded(query, (), timeout) != b"t":
                self._lost = True
        except _Failed:
            pass
        return not self._lost

    def note_command(self, pid: int) -> None:
        """Record the command's pid in the row, for operators; best effort, bounded."""
        if self._holder is None or self.fencing_token is None or self._lost:
            return
        from taskrunner.holder import process_start

        self._holder.command_pid = pid
        self._holder.command_start = process_start(pid)
        self._keep_for(pid, self._holder.command_start)
        params = (self._record().encode(), str(self.key_id).encode())
        try:
            self._bounded(_NOTE.encode(), params, _HEARTBEAT_TIMEOUT)
        except _Failed:
            pass  # the connection is marked lost: the next heartbeat says so

    def _keep_for(self, pid: int, start: int | None) -> None:
        """Start a keeper: a process of its own that holds the session's socket open until
        the command ends. Should the runner be killed, the session, and with it the lock,
        then lasts as long as the command, even one that closes what it inherited."""
        if self._conn is None:
            return
        sock = self._conn.fileno()
        try:
            keeper = os.fork()
        except OSError:
            return  # the command still holds the socket it inherited
        if keeper == 0:  # pragma: no cover (the keeper)
            try:
                os.setsid()  # out of the way of signals to the runner's or command's group
                os.closerange(0, sock)
                os.closerange(sock + 1, 1 << 16)
                from taskrunner.holder import running

                while running(pid, start):
                    time.sleep(_KEEPER_POLL)
            finally:
                os._exit(0)
        self._keeper = keeper

    def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            try:
                os.kill(keeper, 9)
                os.waitpid(keeper, 0)
            except OSError:
                pass

    def _bounded(self, query: bytes, params: Sequence[bytes], timeout: float) -> bytes | None:
        """The first value ``query`` returns, within ``timeout`` seconds on the client's
        clock, whatever the network does. Any failure marks the connection lost."""
        from psycopg import pq

        if self._conn is None or self._lost:
            raise _Failed("no connection")
        pgconn = self._conn.pgconn
        end = time.monotonic() + timeout
        value, error = None, None
        try:
            pgconn.send_query_params(query, list(params))  # a list: the C version says so
            while pgconn.flush():
                _wait(pgconn.socket, select.POLLOUT, end)
            while True:
                while pgconn.is_busy():
                    _wait(pgconn.socket, select.POLLIN, end)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples:
                    value = result.get_value(0, 0)
                elif result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                    error = result.error_message.decode("utf-8", "replace")
        except Exception as exc:  # whatever it is, the answer is not known
            self._lost = True
            raise _Failed(str(exc)) from None
        except BaseException:  # a signal handler's: the query is still on its way
            self._lost = True
            raise
        if error is not None:
            self._lost = True
            raise _Failed(error)
        return value

    # -- waiting, releasing ------------------------------------------------------------

    def wait_for_change(self, deadline: float, watch: SignalWatch) -> bool:
        psycopg = _psycopg(self.description)
        while True:
            watch.check()
            try:
                with _answered_within(_ANSWER):
                    conn = self._connect(psycopg)
                    row = conn.execute(_PROBE, {"key": self.key_id}).fetchone()
            except _Stalled:
                self._lost = True
                self.close()
                raise LockUnusable(self.description, _STALLED) from None
            except psycopg.Error as exc:
                self.close()
                raise LockUnusable(self.description, self._reason(exc)) from None
            if row is not None and row[0]:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL, left))

    def inheritable_fds(self) -> tuple[int, ...]:
        # The command keeps the session's socket open: if the runner is killed, the session,
        # and so the lock, lasts until the command ends, as a lock file's flock does.
        return () if self._conn is None else (self._conn.fileno(),)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.held, HEARTBEAT_INTERVAL)

    def release(self, grace: float = 0.0) -> bool:
        if self.fencing_token is not None and not self._lost:
            unlock = f"SELECT pg_advisory_unlock({self.key_id})".encode()
            try:
                self._bounded(unlock, (), _RELEASE_TIMEOUT)
            except _Failed:
                pass  # closing the session frees it all the same
        self.close()
        return True

    def close(self) -> None:
        self._stop_keeper()
        self.fencing_token = None
        self._holder = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # ends the session: the server frees whatever it held

    # -- messages ----------------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        """One line saying why, never with the password in it."""
        lines = str(exc).strip().splitlines()
        text = lines[0].strip() if lines else type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text


def _wait(fd: int, event: int, end: float) -> None:
    poller = select.poll()
    poller.register(fd, event)
    left = end - time.monotonic()
    if left <= 0 or not poller.poll(math.ceil(left * 1000)):
        raise _Failed("no answer in time")


def _text(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _backend_of(record: str) -> int | None:
    for line in record.splitlines():
        key, _, value = line.partition(" ")
        if key == "backend_pid" and value.isdigit():
            return int(value)
    return None


def _where(url: str) -> tuple[str | None, str]:
    """The password in ``url``, if any, and ``HOST:PORT/DB`` to name the database by."""
    params: dict[str, Any] = {}
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
    except Exception:  # no psycopg, or not a URL it reads: try_acquire says which
        from urllib.parse import urlsplit

        if not url.startswith(("postgresql://", "postgres://")):
            return None, "the database"  # keywords, perhaps a password among them
        try:
            parts = urlsplit(url)
            params = {"host": parts.hostname, "port": parts.port, "dbname": parts.path[1:]}
            params["password"] = parts.password
        except ValueError:
            return None, "the database"
    env = os.environ
    host = params.get("host") or env.get("PGHOST") or "localhost"
    port = params.get("port") or env.get("PGPORT") or "5432"
    dbname = params.get("dbname") or env.get("PGDATABASE") or params.get("user") or "?"
    return params.get("password") or None, f"{host}:{port}/{dbname}"


__all__ = ["KEY_VERSION", "MISSING", "DatabaseUnusable", "FleetState", "PgLock", "key_hash"]
