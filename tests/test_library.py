"""The library: ``taskrunner.Lock`` and ``taskrunner.run``, in real processes."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import taskrunner

from conftest import (
    HANG,
    alive,
    blocked_in_flock,
    finish,
    hold,
    leave_stale,
    overlaps,
    probe,
    run,
    start,
    wait_for,
)


def python(code: str, **kw: object) -> subprocess.Popen[str]:
    """Start a Python program that uses the library; its output goes to files."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", textwrap.dedent(code)], stdout=out, stderr=err, **kw
    )
    proc.outputs = (out, err)
    return proc  # type: ignore[no-any-return]


def holding(lock: Path, go: Path) -> subprocess.Popen[str]:
    """A Python process that holds ``lock`` with the library until ``go`` exists."""
    proc = python(f"""
        import os, time, taskrunner
        with taskrunner.Lock({str(lock)!r}):
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
    """)
    wait_for(lock.exists, "the library holder")
    return proc


# -- Lock ---------------------------------------------------------------------------------


def test_lock_file_exists_with_our_record_exactly_while_held(lockdir: Path):
    lock = lockdir / "job.lock"
    with taskrunner.Lock(lock) as held:
        assert held.locked
        record = lock.read_text()
        assert record.startswith("taskrunner-lock 1\n")
        assert f"pid {os.getpid()}\n" in record
        assert "command " in record
        assert oct(lock.stat().st_mode & 0o777) == "0o600"
    assert not held.locked
    assert list(lockdir.iterdir()) == []


def test_lock_is_released_when_the_body_raises(lockdir: Path):
    lock = lockdir / "job.lock"
    with pytest.raises(ZeroDivisionError), taskrunner.Lock(lock):
        1 / 0  # noqa: B018
    assert not lock.exists()
    with taskrunner.Lock(lock):  # and it can be taken again at once
        pass


def test_acquire_and_release_by_hand(lockdir: Path):
    lock = taskrunner.Lock(str(lockdir / "job.lock"))
    assert lock.acquire() is lock
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()  # one object is one hold, not re-entrant
    lock.release()
    lock.release()  # letting go of a lock not held does nothing
    assert not (lockdir / "job.lock").exists()


def test_busy_lock_raises_lockbusy_naming_the_holding_process(lockdir: Path, tmp_path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    holder = holding(lock, go)
    procs.append(holder)
    with pytest.raises(taskrunner.LockBusy) as busy:
        taskrunner.Lock(lock).acquire()
    assert busy.value.holder is not None
    assert busy.value.holder.pid == holder.pid
    assert not busy.value.manual
    assert str(lock) in str(busy.value)
    assert lock.exists()  # the refusal changed nothing
    go.touch()
    assert finish(holder)[0] == 0
    assert not lock.exists()


def test_two_lock_objects_in_one_process_exclude_each_other(lockdir: Path):
    lock = lockdir / "job.lock"
    with taskrunner.Lock(lock), pytest.raises(taskrunner.LockBusy) as busy:
        taskrunner.Lock(lock).acquire()
    assert busy.value.holder is not None and busy.value.holder.pid == os.getpid()


def test_library_and_command_line_exclude_each_other(lockdir: Path, tmp_path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    with taskrunner.Lock(lock):
        refused = run("-l", str(lock), "-c", "true")
        assert refused.returncode == 75
        assert f"pid {os.getpid()}" in refused.stderr
    runner = hold(lock, go)
    procs.append(runner)
    with pytest.raises(taskrunner.LockBusy) as busy:
        taskrunner.Lock(lock).acquire()
    assert busy.value.holder is not None and busy.value.holder.pid == runner.pid
    go.touch()
    assert finish(runner)[0] == 0


def test_wait_takes_the_lock_once_the_holder_lets_go(lockdir: Path, tmp_path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    holder = holding(lock, go)
    procs.append(holder)
    threading.Timer(0.3, go.touch).start()
    with taskrunner.Lock(lock, wait=HANG) as waited:
        assert waited.locked
        assert go.exists()  # not before the holder was told to let go
        assert f"pid {os.getpid()}\n" in lock.read_text()
    assert finish(holder)[0] == 0


def test_wait_gives_up_with_lockbusy_after_its_time(lockdir: Path, tmp_path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(holding(lock, go))
    began = time.monotonic()
    with pytest.raises(taskrunner.LockBusy):
        taskrunner.Lock(lock, wait=0.3).acquire()
    assert time.monotonic() - began >= 0.3
    go.touch()


def test_stale_lock_is_taken_over_and_its_dead_holder_kept(lockdir: Path, procs, caplog):
    lock = lockdir / "job.lock"
    holder = holding(lock, lockdir / "never")
    procs.append(holder)
    holder.kill()  # kill -9: the file stays, its flock dies with the process
    holder.wait()
    assert lock.exists()
    caplog.set_level(logging.WARNING, logger="taskrunner")
    with taskrunner.Lock(lock) as taken:
        assert taken.recovered is not None
        assert taken.recovered.pid == holder.pid
        assert f"pid {os.getpid()}\n" in lock.read_text()
    assert [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert f"pid {holder.pid}" in caplog.records[-1].getMessage()


def test_stale_lock_of_a_killed_command_line_run_is_taken_over(lockdir: Path):
    lock = lockdir / "job.lock"
    dead = leave_stale(lock)
    with taskrunner.Lock(lock) as taken:
        assert taken.recovered is not None and taken.recovered.pid == dead


def test_manual_hold_is_busy_at_once_whatever_the_wait(lockdir: Path):
    lock = lockdir / "job.lock"
    lock.write_text("")  # an operator's touch
    began = time.monotonic()
    with pytest.raises(taskrunner.LockBusy) as busy:
        taskrunner.Lock(lock, wait=30).acquire()
    assert time.monotonic() - began < 10  # a guard against waiting out the 30s, not a speed claim
    assert busy.value.manual and busy.value.holder is None
    assert lock.exists() and lock.read_text() == ""


@pytest.mark.parametrize("plant", ["symlink", "directory", "no-directory"])
def test_unusable_path_raises_lockunusable(lockdir: Path, tmp_path, plant):
    lock = lockdir / "job.lock"
    if plant == "symlink":
        target = tmp_path / "target"
        lock.symlink_to(target)
    elif plant == "directory":
        lock.mkdir()
    else:
        lock = lockdir / "missing" / "job.lock"
    with pytest.raises(taskrunner.LockUnusable) as unusable:
        taskrunner.Lock(lock).acquire()
    assert str(lock) in str(unusable.value)
    if plant == "symlink":
        assert not (tmp_path / "target").exists()  # never created through the link


@pytest.mark.parametrize("wait", [-1, float("nan"), float("inf"), True, "5"])
def test_bad_wait_is_refused(lockdir: Path, wait):
    with pytest.raises((ValueError, TypeError), match="wait"):
        taskrunner.Lock(lockdir / "job.lock", wait=wait)


def test_forked_child_does_not_release_its_parents_lock(lockdir: Path):
    lock = lockdir / "job.lock"
    with taskrunner.Lock(lock) as held:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            held.release()  # as leaving the with block in the child would
            os._exit(0 if not held.locked else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert lock.exists()
        assert held.locked
        assert run("-l", str(lock), "-c", "true").returncode == 75
    assert not lock.exists()


def test_lock_storm_of_library_and_command_line_runs_one_at_a_time(lockdir: Path, tmp_path, procs):
    lock, log = lockdir / "job.lock", tmp_path / "log"
    code = f"""
        import os, sys, taskrunner
        try:
            with taskrunner.Lock({str(lock)!r}):
                with open({str(log)!r}, "a") as f:
                    f.write(f"start py{{os.getpid()}}\\n")
                with open({str(log)!r}, "a") as f:
                    f.write(f"end py{{os.getpid()}}\\n")
        except taskrunner.LockBusy:
            sys.exit(75)
    """
    contenders = []
    for i in range(60):
        if i % 2:
            contenders.append(python(code))
        else:
            contenders.append(start("-l", str(lock), "-c", probe(log)))
    procs.extend(contenders)
    statuses = [finish(p)[0] for p in contenders]
    assert set(statuses) <= {0, 75}
    assert statuses.count(0) >= 1
    assert log.read_text().count("start ") == statuses.count(0)
    assert overlaps(log) == []
    assert list(lockdir.iterdir()) == []


def test_library_prints_nothing_even_when_it_takes_over_a_stale_lock(lockdir: Path):
    lock = lockdir / "job.lock"
    leave_stale(lock)
    taker = python(f"""
        import taskrunner
        with taskrunner.Lock({str(lock)!r}) as held:
            assert held.recovered is not None
            # The command line would warn of this refusal on stderr.
            assert taskrunner.run("true", {str(lock)!r}).status == 75
        try:
            taskrunner.run("true", {str(lockdir / "missing" / "x.lock")!r})
        except taskrunner.LockUnusable:
            pass
    """)
    status, out, err = finish(taker)
    assert (status, out, err) == (0, "", "")


# -- run ----------------------------------------------------------------------------------


def test_run_returns_the_commands_status(lockdir: Path, capfd):
    lock = lockdir / "job.lock"
    result = taskrunner.run("echo out; echo err >&2; exit 3", lock)
    assert result.status == 3
    assert result.ran and not result.refused
    assert result.duration is not None and result.started is not None
    assert capfd.readouterr() == ("out\n", "err\n")  # the command's output is its own
    assert not lock.exists()


def test_run_a_program_directly_with_the_lock_in_its_environment(lockdir: Path, tmp_path):
    lock, seen = lockdir / "job.lock", tmp_path / "seen"
    script = 'echo "$TASKRUNNER_LOCKFILE $TASKRUNNER_NAME $1" > "$0"'
    result = taskrunner.run(["sh", "-c", script, str(seen), "a b"], lock, name="nightly")
    assert result.status == 0
    assert seen.read_text() == f"{lock} nightly a b\n"


def test_run_refused_is_a_result_not_an_exception(lockdir: Path, tmp_path, caplog):
    lock, counter = lockdir / "job.lock", tmp_path / "count"
    caplog.set_level(logging.INFO, logger="taskrunner")
    with taskrunner.Lock(lock):
        first = taskrunner.run("true", lock, threshold=1, counter_file=counter)
        second = taskrunner.run("true", lock, threshold=1, counter_file=counter)
    assert (first.status, first.refused, first.reported, first.ran) == (75, True, False, False)
    assert (second.status, second.refused, second.reported) == (76, True, True)
    assert not counter.exists()  # the report reset the count to 0
    events = [getattr(r, "taskrunner_event", None) for r in caplog.records]
    assert events == ["busy", "stuck"]
    assert caplog.records[1].levelno == logging.ERROR


def test_run_timeout_gives_124(lockdir: Path):
    result = taskrunner.run(["sleep", "30"], lockdir / "job.lock", timeout=0.2, kill_after=0)
    assert result.status == 124
    assert result.duration is not None and result.duration < HANG


@pytest.mark.parametrize(
    ("command", "status"), [(["no-such-program-here"], 127), (["/dev/null"], 126)]
)
def test_run_raises_cannotrun(lockdir: Path, command, status):
    with pytest.raises(taskrunner.CannotRun) as cannot:
        taskrunner.run(command, lockdir / "job.lock")
    assert cannot.value.status == status
    assert not (lockdir / "job.lock").exists()


def test_run_raises_lockunusable_and_does_not_run(lockdir: Path, tmp_path):
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(taskrunner.LockUnusable):
        taskrunner.run(f"touch {ran}", lock)
    assert not ran.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no lock"),
        ({"lockfile": "a.lock", "lock_url": "postgresql://x/y", "key": "k"}, "not both"),
        ({"lock_url": "postgresql://x/y"}, "go together"),
        ({"lock_url": "mysql://x/y", "key": "k"}, "postgresql://"),
        ({"lockfile": "a.lock", "threshold": 3}, "counter_file"),
        ({"lockfile": "a.lock", "threshold": -1}, "threshold"),
        ({"lockfile": "a.lock", "threshold": True}, "threshold"),
        ({"lockfile": "a.lock", "cumulative": True}, "cumulative"),
        ({"lockfile": "a.lock", "timeout": -1}, "timeout"),
        ({"lockfile": "a.lock", "wait": float("nan")}, "wait"),
        ({"lockfile": "a.lock", "wait": "5"}, "wait"),
        ({"lockfile": "a.lock", "hook_timeout": 0}, "hook_timeout"),
        ({"lockfile": "a.lock", "name": ""}, "name"),
        ({"lockfile": "a.lock", "notify_url": "ftp://x"}, "notify_url"),
        ({"lockfile": "a.lock", "threshold": 1, "counter_file": "a.lock"}, "counter_file"),
        ({"lockfile": ""}, "lockfile"),
        ({"lockfile": "a.lock", "counter_file": "count"}, "go together"),
        ({"lockfile": "a\0.lock"}, "NUL"),
        ({"lockfile": "a.lock", "name": "a\0b"}, "NUL"),
        ({"lockfile": "a.lock", "name": "\ud800"}, "no bytes"),
        ({"lockfile": 5}, "lockfile"),
        ({"lock_url": 5, "key": "k"}, "lock_url"),
        ({"lockfile": "a.lock", "quiet_success": "yes"}, "quiet_success"),
    ],
)
def test_run_refuses_bad_arguments_with_invalidjob(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(taskrunner.InvalidJob, match=message) as bad:
        taskrunner.run("touch ran", **kwargs)
    assert isinstance(bad.value, ValueError)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("command", ["", [], [""], b"true", [1], 5, "a\0b", ["echo", "\ud800"]])
def test_run_refuses_a_bad_command(lockdir: Path, command):
    with pytest.raises(taskrunner.InvalidJob, match="command"):
        taskrunner.run(command, lockdir / "job.lock")


def test_run_from_another_thread_is_refused(lockdir: Path):
    caught: list[BaseException] = []

    def job() -> None:
        try:
            taskrunner.run("true", lockdir / "job.lock")
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(HANG)
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError)


def test_run_restores_the_callers_signal_handlers(lockdir: Path):
    def mine(signum: int, frame: object) -> None:
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCHLD, signal.SIGALRM)}
    try:
        for s in saved:
            signal.signal(s, mine)
        assert taskrunner.run("true", lockdir / "job.lock").status == 0
        assert all(signal.getsignal(s) is mine for s in saved)
    finally:
        for s, old in saved.items():
            signal.signal(s, old)


def test_run_passes_a_termination_signal_on_to_the_command(lockdir: Path, tmp_path):
    lock, started = lockdir / "job.lock", tmp_path / "started"
    caller = python(f"""
        import sys, taskrunner
        result = taskrunner.run("touch {started}; exec sleep 30", {str(lock)!r})
        print(result.status, result.ran)
    """)
    wait_for(started.exists, "the command")
    caller.send_signal(signal.SIGTERM)
    status, out, err = finish(caller)
    assert (status, out, err) == (0, "143 True\n", "")
    assert not lock.exists()


@pytest.mark.parametrize("handler", ["default", "own"])
def test_a_signal_while_run_waits_stops_it_and_reaches_the_caller(lockdir: Path, tmp_path, handler):
    """TERM before the command starts: it never runs, and the caller gets the signal back
    once its handlers are: with Python's default it dies of it; a handler of its own runs,
    and run() then raises Interrupted."""
    lock, ran = lockdir / "job.lock", tmp_path / "ran"
    own = "signal.signal(signal.SIGTERM, lambda *a: print('handler'))" if handler == "own" else ""
    with taskrunner.Lock(lock):
        caller = python(f"""
            import signal, taskrunner
            {own}
            try:
                taskrunner.run("touch {ran}", {str(lock)!r}, wait=60)
            except taskrunner.Interrupted as stopped:
                print("interrupted", stopped.signum)
        """)
        wait_for(lambda: blocked_in_flock(caller.pid), "the caller to wait for the lock")
        caller.send_signal(signal.SIGTERM)
        status, out, err = finish(caller)
    if handler == "default":
        assert (status, out, err) == (-signal.SIGTERM, "", "")
    else:
        assert (status, out, err) == (0, f"handler\ninterrupted {signal.SIGTERM}\n", "")
    assert not ran.exists()


# -- the package --------------------------------------------------------------------------


def test_command_line_does_not_import_the_library():
    code = (
        "import sys, taskrunner.cli, taskrunner; "
        "print(sorted(m for m in sys.modules if m.startswith('taskrunner')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip() == "['taskrunner', 'taskrunner.cli']"


def test_public_names_are_documented_and_typed():
    assert set(taskrunner.__all__) <= set(dir(taskrunner))
    for name in taskrunner.__all__:
        value = getattr(taskrunner, name)
        if name != "__version__":
            assert value.__doc__, f"taskrunner.{name} has no docstring"
    for error in ("LockBusy", "LockUnusable", "CounterUnusable", "CannotRun", "InvalidJob"):
        assert issubclass(getattr(taskrunner, error), taskrunner.TaskrunnerError)
    assert (Path(taskrunner.__file__).parent / "py.typed").exists()
    with pytest.raises(AttributeError):
        taskrunner.no_such_name  # noqa: B018


# -- what a library caller's process is left with -----------------------------------------


def test_a_lock_left_to_the_commands_processes_is_free_once_they_end(lockdir: Path, tmp_path):
    """The record says the run ended; once nothing holds its flock, the next run takes the
    file over, although the process that wrote it lives on (this one)."""
    lock = lockdir / "job.lock"
    result = taskrunner.run("sleep 2 & exit 0", lock)  # the sleep keeps the lock
    assert (result.status, result.held) == (0, True)
    assert "\nended " in lock.read_text()
    again = taskrunner.run("true", lock, wait=HANG)
    assert (again.status, again.ran) == (0, True)
    assert not lock.exists()


def test_an_exception_from_the_callers_handler_stops_the_command(lockdir: Path, tmp_path):
    lock, started = lockdir / "job.lock", tmp_path / "started"
    caller = python(f"""
        import os, signal, taskrunner
        def time_up(*args):
            raise TimeoutError
        signal.signal(signal.SIGALRM, time_up)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            taskrunner.run("touch {started}; exec sleep 30", {str(lock)!r})
        except TimeoutError:
            print("timed out", os.path.exists({str(lock)!r}))
        print("again", taskrunner.run("true", {str(lock)!r}).status)
    """)
    status, out, err = finish(caller)
    assert (status, out, err) == (0, "timed out False\nagain 0\n", "")
    assert started.exists()


def test_a_holders_forked_child_keeps_the_lock_until_it_ends(lockdir: Path):
    """As with flock(1): a process forked while the lock is held shares its open files, so
    if the holder dies first, the lock is held until that process ends too, and is stale
    (taken over) after."""
    lock, pids = lockdir / "job.lock", lockdir.parent / "pids"
    holder = python(f"""
        import os, time, taskrunner
        with taskrunner.Lock({str(lock)!r}):
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            open({str(pids)!r}, "w").write(str(child))
            time.sleep(30)
    """)
    wait_for(pids.exists, "the holder's child")
    wait_for(pids.read_text, "the child's pid")
    child = int(pids.read_text())
    try:
        holder.kill()
        holder.wait()
        with pytest.raises(taskrunner.LockBusy):
            taskrunner.Lock(lock).acquire()
    finally:
        os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(child), "the child to die")
    with taskrunner.Lock(lock) as taken:
        assert taken.recovered is not None and taken.recovered.pid == holder.pid


def test_run_in_a_program_with_threads_sees_its_command_end(lockdir: Path):
    """Another thread that does not block SIGCHLD takes it, and drops it, when the command
    ends before run() waits for it: run() must still see the end."""
    lock = lockdir / "job.lock"
    caller = python(f"""
        import threading, time, taskrunner
        from taskrunner.lockfile import FileLock
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        note = FileLock.note_command
        def slow_note(self, pid):  # the command ends meanwhile
            time.sleep(0.3)
            note(self, pid)
        FileLock.note_command = slow_note
        print(taskrunner.run(["true"], {str(lock)!r}).status)
    """)
    assert finish(caller) == (0, "0\n", "")


def test_an_ended_record_whose_command_is_unknown_is_held_while_the_command_runs(
    lockdir: Path, procs
):
    """A run that ended without knowing its command's pid (cut short between starting it
    and writing it down) leaves a record that says it ended: the command, found by the
    lock path in its environment, still keeps the lock, whoever else lives or not."""
    lock = lockdir / "job.lock"
    record = taskrunner.Holder.current("the job", str(lock))
    record.ended = time.time()
    lock.write_bytes(record.encode())
    lock.chmod(0o600)
    env = {**os.environ, "TASKRUNNER_LOCKFILE": str(lock)}
    command = subprocess.Popen(["sleep", "60"], env=env)
    try:
        wait_for(lambda: Path(f"/proc/{command.pid}/cmdline").read_bytes().startswith(b"sleep"),
                 "the command to exec")  # fmt: skip
        assert run("-l", str(lock), "-c", "true").returncode == 75
    finally:
        command.kill()
        command.wait()
    assert run("-l", str(lock), "-c", "true").returncode == 0
    assert not lock.exists()


def test_run_leaves_the_signal_mask_as_it_found_it_when_spawning_fails(lockdir: Path, monkeypatch):
    def refuse(*args: object, **kwargs: object) -> int:
        raise ValueError("refused")

    monkeypatch.setattr(os, "posix_spawn", refuse)
    monkeypatch.setattr(os, "posix_spawnp", refuse)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(ValueError, match="refused"):
        taskrunner.run(["true"], lockdir / "job.lock")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert not (lockdir / "job.lock").exists()


def test_run_keeps_the_callers_interval_timer(lockdir: Path, tmp_path, procs):
    lock, go = lockdir / "job.lock", tmp_path / "go"
    procs.append(holding(lock, go))
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        result = taskrunner.run("true", lock, wait=0.3)  # waits with a timer of its own
        assert result.refused
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left < 30
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        wait_for(lambda: fired, "the caller's SIGALRM")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        go.touch()


def test_quiet_success_holds_no_descriptors_after_a_program_that_cannot_run(lockdir: Path):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(taskrunner.CannotRun):
        taskrunner.run(["no-such-program-here"], lockdir / "job.lock", quiet_success=True)
    assert len(os.listdir("/proc/self/fd")) == before


def test_exceptions_and_locks_cross_process_boundaries(lockdir: Path):
    holder = taskrunner.Holder(4242, "web1", 1.5, "backup.sh")
    for error in (
        taskrunner.LockBusy("/x.lock", holder, 1.5),
        taskrunner.LockBusy("/x.lock", None, 2.5),
        taskrunner.LockUnusable("/x.lock", "is a directory"),
        taskrunner.CannotRun("prog", "command not found", 127),
        taskrunner.Interrupted(15),
        taskrunner.InvalidJob("bad"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert (type(back), str(back)) == (type(error), str(error))
    assert pickle.loads(pickle.dumps(taskrunner.LockBusy("/x", holder, 1.5))).holder.pid == 4242
    with taskrunner.Lock(lockdir / "job.lock", wait=2) as held:
        for twin in (pickle.loads(pickle.dumps(held)), copy.copy(held)):
            assert (twin.path, twin.wait, twin.locked) == (held.path, 2.0, False)
            with pytest.raises(taskrunner.LockBusy):
                twin.acquire()
        assert held.locked


def test_library_names_are_checked_by_mypy(tmp_path: Path):
    mypy = pytest.importorskip("mypy.api")
    use = tmp_path / "use.py"
    use.write_text(
        "import taskrunner\n"
        "lock: taskrunner.Lock = taskrunner.Lock('/tmp/x.lock', wait=1.5)\n"
        "result: taskrunner.Result = taskrunner.run(['true'], '/tmp/x.lock')\n"
        "taskrunner.LockBusyy\n"
    )
    out, _, status = mypy.run(["--strict", "--no-incremental", str(use)])
    assert status == 1
    assert out.count("error:") == 1 and 'no attribute "LockBusyy"' in out
