"""Fleet mode from the command line: --lock-url and --key against the real PostgreSQL.

Skipped without a server, except in CI (see test_fleet_backend.py, whose set-up this shares).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# First: it skips the module when there is no server (or no psycopg).
from test_fleet_backend import (  # noqa: F401 (fixtures)
    URL,
    Proxy,
    admin,
    fleet,
    holding,
    key,
    psycopg,
    row,
)

from conftest import alive, children, finish, kill_group, overlaps, probe, run, start, wait_for


def command_of(runner: int) -> int:
    """The command the runner started: its child that is not the keeper of its session (a
    fork of the runner itself)."""
    itself = Path(f"/proc/{runner}/cmdline").read_bytes()
    (command,) = [c for c in children(runner) if Path(f"/proc/{c}/cmdline").read_bytes() != itself]
    return command


def test_a_second_run_is_refused_and_counted_once_for_the_fleet(key: str, admin, tmp_path: Path):
    go = tmp_path / "go"
    holder = holding(key, go)
    first = run(*fleet(key, "-t", "1"), "-c", "true")
    assert first.returncode == 75
    assert first.stderr == ""
    second = run(*fleet(key, "-t", "1"), "-c", "true")
    assert second.returncode == 76
    assert f"looks stuck: {key} on 127.0.0.1:5432/test is held by pid {holder.pid}" in second.stderr
    assert "refused 2 times in a row (threshold 1)" in second.stderr
    assert row(admin, key)[0] == 0, "the report reset the count"
    go.touch()
    assert finish(holder)[0] == 0


def test_the_command_gets_a_fencing_token_that_grows_and_no_lockfile(key: str, tmp_path: Path):
    seen = tmp_path / "env"
    tokens = []
    for _ in range(3):
        result = run(*fleet(key), "-c",
                     f'echo "$TASKRUNNER_FENCING_TOKEN ${{TASKRUNNER_LOCKFILE-none}} $TASKRUNNER_NAME" > {seen}')  # fmt: skip
        assert result.returncode == 0
        token, lockfile, name = seen.read_text().split()
        assert (lockfile, name) == ("none", key)
        tokens.append(int(token))
    assert tokens[1:] == [tokens[0] + 1, tokens[0] + 2]


def test_a_storm_of_40_runs_one_and_counts_39(key: str, admin, tmp_path: Path):
    log, go = tmp_path / "log", tmp_path / "go"
    runs = [start(*fleet(key, "-t", "1000"), "-c", probe(log, go)) for _ in range(40)]
    wait_for(lambda: sum(p.poll() is not None for p in runs) == 39, "39 refusals", timeout=60)
    go.touch()
    statuses = sorted(finish(p)[0] for p in runs)
    assert statuses == [0] + [75] * 39
    assert overlaps(log) == []
    assert row(admin, key)[0] == 39


def test_a_killed_runner_keeps_the_lock_until_its_command_ends(key: str, tmp_path: Path):
    go = tmp_path / "go"
    holder = holding(key, go)
    command = command_of(holder.pid)
    holder.kill()  # SIGKILL: the runner, not its command
    holder.wait()
    time.sleep(1.5)
    assert run(*fleet(key), "-c", "true").returncode == 75, "the command still holds the lock"
    go.touch()
    wait_for(lambda: not alive(command), "the command to end")
    wait_for(lambda: run(*fleet(key), "-c", "true").returncode == 0, "the lock to be free")


def test_a_terminated_session_stops_the_command_with_74(key: str, admin, tmp_path: Path):
    go = tmp_path / "go"
    holder = holding(key, go, "--kill-after", "1")
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (f"taskrunner {os.uname().nodename} {holder.pid}"[:63],),
    )
    status, _, err = finish(holder)
    assert status == 74
    assert f"lost {key} on 127.0.0.1:5432/test while the command ran" in err
    assert "status 143" in err, "the command got TERM"
    assert run(*fleet(key), "-c", "true").returncode == 0


def test_a_partition_stops_the_command_before_the_server_frees_the_lock(key: str, tmp_path: Path):
    """The proxy stops forwarding: the heartbeat's deadline fires and the command is stopped,
    while the server still holds the lock for the cut-off session, so no second run can start
    in between. The time from the cut to the command's end is the window in which another
    host would overlap, had the server freed the lock at the moment of the cut."""
    info = psycopg.conninfo.conninfo_to_dict(URL)
    proxy = Proxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    stopped = tmp_path / "stopped"
    try:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{info.get('dbname', 'test')}"
        holder = holding(key, tmp_path / "go", "--kill-after", "1", url=url)
        cut = time.monotonic()
        proxy.frozen.set()
        holder_status = None
        while holder_status is None and time.monotonic() - cut < 30:
            assert run(*fleet(key), "-c", "true").returncode == 75, "never two runs"
            holder_status = holder.poll()
        window = time.monotonic() - cut
        stopped.write_text(f"{window:.3f}\n")
        assert holder_status == 74
        print(f"partition: the command was stopped {window:.2f} s after the cut")
        assert window < 10
    finally:
        proxy.close()
    for pid in children(holder.pid):
        kill_group(pid)
    wait_for(lambda: run(*fleet(key), "-c", "true").returncode == 0, "the lock to be free")


def test_an_unreachable_server_is_71_and_nothing_runs(tmp_path: Path):
    ran = tmp_path / "ran"
    result = run("--lock-url", "postgresql://postgres@127.0.0.1:1/test", "--key", "k",
                 "-c", f"touch {ran}")  # fmt: skip
    assert result.returncode == 71
    assert not ran.exists()
    assert "connection" in result.stderr.lower()
    assert len(result.stderr.splitlines()) == 1


def test_fleet_usage_errors(tmp_path: Path):
    cases = [
        (["--lock-url", URL, "-c", "true"], "--lock-url and --key go together"),
        (["--key", "k", "-c", "true"], "--lock-url and --key go together"),
        (["--lock-url", URL, "--key", "k", "-l", str(tmp_path / "L"), "-c", "true"], "not both"),
        (["--lock-url", URL, "--key", "k", "-t", "1", "-f", str(tmp_path / "C"), "-c", "true"],
         "the count is in the database"),
        (["--lock-url", "mysql://x/y", "--key", "k", "-c", "true"], "not a postgresql:// URL"),
        (["--lock-url", URL, "--key", "", "-c", "true"], "--key is empty"),
    ]  # fmt: skip
    for args, expected in cases:
        result = run(*args)
        assert result.returncode == 2, args
        assert expected in result.stderr.splitlines()[-1], (args, result.stderr)


def test_a_signal_to_the_runner_reaches_the_command_and_releases(key: str, tmp_path: Path):
    go = tmp_path / "go"
    holder = holding(key, go)
    holder.send_signal(signal.SIGTERM)
    assert finish(holder)[0] == 128 + signal.SIGTERM
    assert run(*fleet(key), "-c", "true").returncode == 0


def test_a_url_asking_for_another_client_encoding_still_works(admin, tmp_path: Path):
    """Keys and records are UTF-8 whatever encoding the URL asks for: a non-ASCII key, a
    command with non-ASCII text, the record written while it runs."""
    for encoding in ("LATIN1", "SQL_ASCII", "EUC_JP"):
        url = f"{URL}?client_encoding={encoding}"
        name = f"ключ-{encoding}-{os.urandom(3).hex()}"
        result = run("--lock-url", url, "--key", name, "-c", "sleep 1.5; echo done ą")
        admin.execute("DELETE FROM taskrunner_locks WHERE name = %s", (name,))
        assert (result.returncode, result.stdout) == (0, "done ą\n"), (encoding, result.stderr)


def test_a_killed_runner_whose_command_closes_its_descriptors_keeps_the_lock(
    key: str, tmp_path: Path
):
    """The command closes every descriptor it inherited, the session's socket too, and its
    runner is killed: the lock still lasts as long as the command."""
    go, started = tmp_path / "go", tmp_path / "started"
    script = (
        "import os, time; os.closerange(3, 1 << 16); open(os.environ['STARTED'], 'w').close()\n"
        "while not os.path.exists(os.environ['GO']): time.sleep(0.01)"
    )
    holder = start(*fleet(key), "--", "python3", "-c", script,
                   env={**os.environ, "GO": str(go), "STARTED": str(started)})  # fmt: skip
    wait_for(started.exists, "the command to close its descriptors")
    command = command_of(holder.pid)
    holder.kill()
    holder.wait()
    time.sleep(1.0)
    for _ in range(3):
        assert run(*fleet(key), "-c", "true").returncode == 75, "never two runs"
    go.touch()
    wait_for(lambda: not alive(command), "the command to end")
    wait_for(lambda: run(*fleet(key), "-c", "true").returncode == 0, "the lock to be free")


def test_a_stalled_connection_while_waiting_ends_the_run_with_71(key: str, tmp_path: Path):
    """A proxy that stops forwarding while a run waits for the lock: no error comes by
    itself, and the run must not wait for ever: it gives up within the answer time (10 s)."""
    info = psycopg.conninfo.conninfo_to_dict(URL)
    proxy = Proxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    go = tmp_path / "go"
    try:
        holder = holding(key, go)
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{info.get('dbname', 'test')}"
        waiter = start(*fleet(key, "--wait", "60", url=url), "-c", "true")
        time.sleep(1.0)  # it polls the lock through the proxy
        proxy.frozen.set()
        began = time.monotonic()
        status, _, err = finish(waiter)
        took = time.monotonic() - began
        assert status == 71
        assert "no answer from the server within 10s" in err
        assert took < 30
    finally:
        proxy.close()
        go.touch()
    assert finish(holder)[0] == 0
