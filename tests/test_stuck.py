"""Being told about stuck jobs: --stuck-after, the --on-stuck and --on-recover hooks, and
--notify-url against a real HTTP(S) server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import HANG, TASKRUNNER, alive, finish, hold, leave_stale, run, start, wait_for

HOST = os.uname().nodename


def env_of(path: Path) -> dict[str, str]:
    """The TASKRUNNER_ variables a hook wrote with ``env > path``."""
    wait_for(path.exists, "the hook's output")
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.startswith("TASKRUNNER_"))


# -- --stuck-after ---------------------------------------------------------------------


def test_stuck_after_reports_an_old_hold_without_a_counter(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(hold(lock, go))
    young = run("-l", str(lock), "--stuck-after", "1.5", "-c", "true")
    assert young.returncode == 75
    assert "looks stuck" not in young.stderr
    time.sleep(1.6)
    for _ in range(2):  # every refusal past the age reports
        old = run("-l", str(lock), "--stuck-after", "1.5", "-c", "true")
        assert old.returncode == 76, old.stderr
        assert "looks stuck" in old.stderr
        assert f"pid {procs[0].pid} on {HOST}" in old.stderr
        assert "longer than --stuck-after 1.5s" in old.stderr
    go.touch()


def test_stuck_after_and_the_count_whichever_comes_first(lockdir: Path, tmp_path: Path, procs):
    lock, go, counter = lockdir / "job.lock", tmp_path / "go", tmp_path / "count"
    procs.append(hold(lock, go))
    options = ("-l", str(lock), "-t", "5", "-f", str(counter), "--stuck-after", "1")
    assert run(*options, "-c", "true").returncode == 75
    time.sleep(1.1)
    aged = run(*options, "-c", "true")
    assert aged.returncode == 76
    assert "refused 2 times in a row (threshold 5)" in aged.stderr
    # A report by age does not reset the count: the count still says how many in a row.
    assert counter.read_text() == "2\n"
    go.touch()


def test_stuck_after_counts_a_manual_hold_from_its_mtime(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.write_text("paused by hand\n")
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    result = run("-l", str(lock), "--stuck-after", "30m", "-c", "true")
    assert result.returncode == 76
    assert "held by hand for 1h00m" in result.stderr
    assert run("-l", str(lock), "--stuck-after", "2h", "-c", "true").returncode == 75


@pytest.mark.parametrize("value", ["", "soon", "-1", "5x"])
def test_stuck_after_takes_a_duration(lockdir: Path, value: str):
    result = run("-l", str(lockdir / "job.lock"), "--stuck-after", value, "-c", "true")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("taskrunner: error: --stuck-after")


# -- hooks -----------------------------------------------------------------------------


def test_on_stuck_hook_gets_the_event(lockdir: Path, tmp_path: Path, procs):
    lock, go, counter, seen = (
        lockdir / "job.lock",
        tmp_path / "go",
        tmp_path / "c",
        tmp_path / "env",
    )
    before = time.time()
    procs.append(hold(lock, go))
    options = ("-l", str(lock), "-t", "1", "-f", str(counter), "--name", "backup")
    hook = ("--on-stuck", f"env > {seen}")
    assert run(*options, *hook, "-c", "true").returncode == 75
    assert not seen.exists(), "a quiet refusal runs no hook"
    assert run(*options, *hook, "-c", "true").returncode == 76
    env = env_of(seen)
    assert env["TASKRUNNER_EVENT"] == "stuck"
    assert env["TASKRUNNER_NAME"] == "backup"
    assert env["TASKRUNNER_LOCKFILE"] == str(lock)
    assert env["TASKRUNNER_COUNT"] == "2"
    assert env["TASKRUNNER_HOLDER_PID"] == str(procs[0].pid)
    assert env["TASKRUNNER_HOLDER_HOST"] == HOST
    since = datetime.fromisoformat(env["TASKRUNNER_HOLDER_SINCE"]).timestamp()
    assert before - 1 <= since <= time.time()
    go.touch()


def test_on_recover_hook_runs_on_a_stale_takeover(lockdir: Path, tmp_path: Path):
    lock, seen, ran = lockdir / "job.lock", tmp_path / "env", tmp_path / "ran"
    dead = leave_stale(lock)
    result = run("-l", str(lock), "--on-recover", f"env > {seen}", "-c", f"touch {ran}")
    assert result.returncode == 0
    assert ran.exists()
    env = env_of(seen)
    assert env["TASKRUNNER_EVENT"] == "stale"
    assert env["TASKRUNNER_HOLDER_PID"] == str(dead)
    assert env["TASKRUNNER_HOLDER_HOST"] == HOST
    assert env["TASKRUNNER_LOCKFILE"] == str(lock)
    # A run that finds no dead holder runs no hook.
    seen.unlink()
    assert run("-l", str(lock), "--on-recover", f"env > {seen}", "-c", "true").returncode == 0
    assert not seen.exists()


def test_a_failing_hook_never_changes_the_status(lockdir: Path, tmp_path: Path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(hold(lock, go))
    result = run("-l", str(lock), "--stuck-after", "0.001", "--on-stuck", "echo from the hook; exit 9",
                 "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert result.stdout == "", "the run's stdout is the command's alone"
    assert "from the hook" in result.stderr
    assert "taskrunner: warning: job.lock: --on-stuck hook failed with status 9" in result.stderr
    go.touch()


def test_a_hanging_hook_is_cut_off_with_what_it_started(lockdir: Path, tmp_path: Path, procs):
    lock, go, pids = lockdir / "job.lock", tmp_path / "go", tmp_path / "pids"
    procs.append(hold(lock, go))
    hook = f"sleep 300 & echo $! > {pids}; echo $$ >> {pids}; wait"
    result = run("-l", str(lock), "--stuck-after", "0.001", "--on-stuck", hook,
                 "--hook-timeout", "0.5", "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert "--on-stuck hook cut off after 0.5s" in result.stderr
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda pid=pid: not alive(pid), f"hook process {pid} to be gone", timeout=5)
    go.touch()


def test_a_hanging_recover_hook_still_lets_the_command_run(lockdir: Path, tmp_path: Path):
    lock = lockdir / "job.lock"
    leave_stale(lock)
    result = run("-l", str(lock), "--on-recover", "sleep 300", "--hook-timeout", "0.3",
                 "-c", "exit 5")  # fmt: skip
    assert result.returncode == 5
    assert "--on-recover hook cut off after 0.3s" in result.stderr
    assert not lock.exists()


# -- --notify-url ----------------------------------------------------------------------


class Receiver(http.server.ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that keeps what is posted to it."""

    daemon_threads = True

    def __init__(self, answer: int = 200, hang: bool = False) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.answer, self.hang = answer, hang
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}/hook/abc"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.posts.append((self.path, dict(self.headers), body))
        if self.server.hang:
            self.server.release.wait(60)
        self.send_response(self.server.answer)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver(request):
    server = Receiver(**getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def posted(server: Receiver) -> dict[str, object]:
    ((path, headers, body),) = server.posts
    assert path == "/hook/abc"
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)  # type: ignore[no-any-return]


def test_notify_url_posts_the_stuck_event(lockdir: Path, tmp_path: Path, procs, receiver):
    lock, go, counter = lockdir / "job.lock", tmp_path / "go", tmp_path / "c"
    procs.append(hold(lock, go))
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url",
                 receiver.url, "-c", "true")  # fmt: skip
    assert result.returncode == 76
    event = posted(receiver)
    assert event["event"] == "stuck"
    assert event["name"] == "job.lock"
    assert event["lockfile"] == str(lock)
    assert event["count"] == 0
    assert event["host"] == HOST
    holder = event["holder"]
    assert isinstance(holder, dict)
    assert holder["pid"] == procs[0].pid
    assert holder["host"] == HOST
    assert "sh -c" in holder["command"]
    datetime.fromisoformat(str(event["time"]))
    datetime.fromisoformat(str(holder["since"]))
    assert "looks stuck" in str(event["message"])

    receiver.posts.clear()
    result = run("-l", str(lock), "-t", "1", "-f", str(counter), "--notify-url", receiver.url,
                 "-c", "true")  # fmt: skip
    assert result.returncode == 75
    assert receiver.posts == [], "a quiet refusal posts nothing"
    assert run("-l", str(lock), "-t", "1", "-f", str(counter), "--notify-url", receiver.url,
               "-c", "true").returncode == 76  # fmt: skip
    assert posted(receiver)["count"] == 2
    go.touch()


def test_notify_url_posts_the_stale_event(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    dead = leave_stale(lock)
    result = run("-l", str(lock), "--notify-url", receiver.url, "-c", "exit 3")
    assert result.returncode == 3
    event = posted(receiver)
    assert event["event"] == "stale"
    holder = event["holder"]
    assert isinstance(holder, dict)
    assert holder["pid"] == dead


def test_notify_url_manual_hold_has_no_holder(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    lock.write_text("")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url", receiver.url,
                 "-c", "true")  # fmt: skip
    assert result.returncode == 76
    event = posted(receiver)
    assert event["holder"] is None
    datetime.fromisoformat(str(event["since"]))


@pytest.mark.parametrize("receiver", [{"answer": 500}], indirect=True)
def test_notify_url_error_answer_is_a_warning(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    lock.write_text("")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url", receiver.url,
                 "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert (
        f"taskrunner: warning: job.lock: {receiver.url}: the server answered 500" in result.stderr
    )


@pytest.mark.parametrize("receiver", [{"hang": True}], indirect=True)
def test_notify_url_that_never_answers_is_cut_off(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    lock.write_text("")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url", receiver.url,
                 "--hook-timeout", "0.5", "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert len(receiver.posts) == 1
    assert "no answer within 0.5s" in result.stderr or "timed out" in result.stderr


def test_notify_url_nobody_listening_is_a_warning(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.write_text("")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url",
                 "http://127.0.0.1:9/x", "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert "http://127.0.0.1:9/x: connection refused" in result.stderr.lower()


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com", "https://", ""])
def test_notify_url_must_be_http(lockdir: Path, url: str):
    result = run("-l", str(lockdir / "job.lock"), "--notify-url", url, "-c", "true")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("taskrunner: error: --notify-url")


@pytest.fixture
def tls_receiver(tmp_path: Path):
    """An HTTPS receiver with a certificate for 127.0.0.1 made for the test."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = Receiver()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, cert
    server.shutdown()
    server.server_close()


def test_notify_url_over_https(lockdir: Path, tls_receiver):
    server, cert = tls_receiver
    lock = lockdir / "job.lock"
    lock.write_text("")
    options = ("-l", str(lock), "--stuck-after", "0.001", "--notify-url", server.url, "-c", "true")
    trusted = run(*options, env={**os.environ, "SSL_CERT_FILE": str(cert)})
    assert trusted.returncode == 76
    assert posted(server)["event"] == "stuck"
    assert "warning" not in trusted.stderr
    # A certificate nobody vouches for is refused, as it should be, with one warning.
    server.posts.clear()
    untrusted = run(*options, env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"})
    assert untrusted.returncode == 76
    assert server.posts == []
    assert "certificate verify failed" in untrusted.stderr


def test_hooks_and_post_under_a_storm_stay_bounded(lockdir: Path, tmp_path: Path, procs, receiver):
    """Every refusal of 20 at once past the age posts once, and none waits on another."""
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(hold(lock, go))
    runs = [
        start("-l", str(lock), "--stuck-after", "0.001", "--notify-url", receiver.url, "-c", "true")
        for _ in range(20)
    ]
    assert [finish(p)[0] for p in runs] == [76] * 20
    assert len(receiver.posts) == 20
    go.touch()


def test_the_events_reach_the_log_file(lockdir: Path, tmp_path: Path, receiver):
    lock, log = lockdir / "job.lock", tmp_path / "events.log"
    lock.write_text("")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--on-stuck", "exit 4",
                 "--notify-url", receiver.url, "--log-file", str(log), "--log-format", "json",
                 "-c", "true")  # fmt: skip
    assert result.returncode == 76
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["stuck", "hook", "notify"]
    assert [r["level"] for r in records] == ["error", "warning", "info"]
    for record in records:
        assert record["pid"] == records[0]["pid"]
        datetime.fromisoformat(record["time"])


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("receiver", [{"hang": True}], indirect=True)
def test_an_abandoned_post_does_not_take_the_runners_signals(lockdir: Path, receiver):
    """The POST still waits when the command starts and ends. The command's SIGCHLD, and a
    TERM, must still reach the runner and not the thread of the POST. strace slows each
    pwrite (the record's update once the command has started) so that the command has ended
    before the runner waits for it."""
    lock = lockdir / "job.lock"
    leave_stale(lock)
    slow = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
            "-e", "inject=pwrite64:delay_exit=300000"]  # fmt: skip
    result = subprocess.run(
        [*slow, *TASKRUNNER, "-l", str(lock), "--notify-url", receiver.url,
         "--hook-timeout", "0.5", "-c", "exit 3"],
        capture_output=True, text=True, timeout=HANG, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == 3
    assert "no answer within 0.5s" in result.stderr


def test_a_signal_while_the_hook_runs_stops_it_and_ends_the_run(lockdir: Path, tmp_path: Path):
    lock, pids = lockdir / "job.lock", tmp_path / "pids"
    lock.write_text("")
    proc = start("-l", str(lock), "--stuck-after", "0.001", "--hook-timeout", "60",
                 "--on-stuck", f"sleep 300 & echo $! > {pids}; wait", "-c", "true")  # fmt: skip
    wait_for(lambda: pids.exists() and pids.read_text().strip(), "the hook to start")
    proc.send_signal(signal.SIGTERM)
    status, _, err = finish(proc)
    assert status == 128 + signal.SIGTERM
    assert "--on-stuck hook stopped: signal 15 arrived" in err
    wait_for(lambda: not alive(int(pids.read_text())), "the hook's process to be gone", timeout=5)


@pytest.mark.parametrize("receiver", [{"hang": True}], indirect=True)
def test_a_signal_while_the_post_waits_ends_the_run(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    lock.write_text("")
    proc = start("-l", str(lock), "--stuck-after", "0.001", "--hook-timeout", "60",
                 "--notify-url", receiver.url, "-c", "true")  # fmt: skip
    wait_for(lambda: receiver.posts, "the POST to arrive")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 128 + signal.SIGTERM


def test_what_the_hook_started_is_killed_even_if_the_hook_ends_at_term(
    lockdir: Path, tmp_path: Path
):
    lock, pids = lockdir / "job.lock", tmp_path / "pids"
    lock.write_text("")
    hook = f"(trap '' TERM; exec sleep 300) & echo $! > {pids}; wait"
    result = run("-l", str(lock), "--stuck-after", "0.001", "--on-stuck", hook,
                 "--hook-timeout", "0.5", "-c", "true")  # fmt: skip
    assert result.returncode == 76
    assert not alive(int(pids.read_text())), "KILL follows TERM for the rest of the group"


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://a b/", "http://127.0.0.1:abc/", "http:///x"]
)
def test_notify_url_malformed_is_a_usage_error(lockdir: Path, url: str):
    result = run("-l", str(lockdir / "job.lock"), "--notify-url", url, "-c", "true")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("taskrunner: error: --notify-url")


def test_notify_url_scheme_in_capitals(lockdir: Path, receiver):
    lock = lockdir / "job.lock"
    lock.write_text("")
    url = receiver.url.replace("http://", "HTTP://")
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url", url, "-c", "true")
    assert result.returncode == 76
    assert posted(receiver)["event"] == "stuck"


def _raw_server(answer: bytes) -> tuple[socket.socket, list[bytes]]:
    """A server on 127.0.0.1 that reads one request and sends ``answer``, whatever it is."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                requests.append(conn.recv(65536))
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener, requests


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HELLO THERE\r\n\r\n", "HELLO THERE"),
        (b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
         "the server answered 302 Found (redirects are not followed: give the final URL)"),
    ],
)  # fmt: skip
def test_notify_url_odd_answers_are_one_warning(lockdir: Path, answer: bytes, expected: str):
    listener, requests = _raw_server(answer)
    lock = lockdir / "job.lock"
    lock.write_text("")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
    result = run("-l", str(lock), "--stuck-after", "0.001", "--notify-url", url, "-v",
                 "-c", "true")  # fmt: skip
    listener.close()
    assert result.returncode == 76
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    assert "posted the stuck event" not in result.stderr
    assert len(requests) == 1, "a redirect is not followed"
    assert requests[0].startswith(b"POST /x ")


def test_an_event_from_a_crafted_record_still_runs_its_hook(lockdir: Path, tmp_path: Path):
    """A record whose host holds a NUL, and a manual hold from the year 10000: the hook runs
    and the status stays 76, with no internal error."""
    from taskrunner.holder import Holder
    from taskrunner.hooks import STUCK, Event

    holder = Holder(4242, "we\0b", 253402300800.0, "x")
    event = Event(STUCK, name="n", lockfile="/l", count=1, holder=holder,
                  since=253402300800.0, message="m")  # fmt: skip
    env = event.environ()
    assert env[b"TASKRUNNER_HOLDER_HOST"] == b"web"
    assert env[b"TASKRUNNER_HOLDER_SINCE"] == b""
    assert json.loads(json.dumps(event.payload()))["since"] is None


@pytest.mark.parametrize(
    "options",
    [
        ["-t", "1", "-f", "{d}/X", "--metrics-file", "{d}/X"],
        ["-t", "1", "-f", "{d}/X", "--log-file", "{d}/X"],
        ["--metrics-file", "{d}/X", "--log-file", "{d}/X"],
        ["--metrics-file", "{d}/job"],
        ["--metrics-file", "{d}/X", "--log-file", "{d}/X.lock"],
        ["--hook-timeout", "0"],
    ],
)
def test_files_that_would_clobber_each_other_and_hooks_without_a_bound(lockdir: Path, options):
    args = [o.replace("{d}", str(lockdir)) for o in options]
    result = run("-l", str(lockdir / "job.lock"), *args, "-c", "true")
    assert result.returncode == 2
    assert "must not be" in result.stderr or "more than 0" in result.stderr
    assert not (lockdir / "X").exists()
