"""The library in fleet mode: taskrunner.run with lock_url and key, against PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

import taskrunner
from test_fleet_backend import URL, admin, key  # noqa: F401 (fixtures; skips without a server)

from conftest import finish, start, until, wait_for


def test_run_in_fleet_mode_runs_then_refuses_while_another_holds(key: str, tmp_path: Path):
    seen, go, running = tmp_path / "seen", tmp_path / "go", tmp_path / "running"
    result = taskrunner.run('echo "$TASKRUNNER_NAME $TASKRUNNER_FENCING_TOKEN" > ' + str(seen),
                            lock_url=URL, key=key)  # fmt: skip
    assert (result.status, result.ran) == (0, True)
    name, token = seen.read_text().split()
    assert name == key and int(token) > 0
    holder = start("--lock-url", URL, "--key", key, "-c", f"touch {running}; {until(go)}")
    try:
        wait_for(running.exists, "the holder's command")
        refused = taskrunner.run("true", lock_url=URL, key=key, threshold=1)
        stuck = taskrunner.run("true", lock_url=URL, key=key, threshold=1)
        assert (refused.status, refused.refused) == (75, True)
        assert (stuck.status, stuck.reported) == (76, True)
    finally:
        go.touch()
        assert finish(holder)[0] == 0


def test_run_in_fleet_mode_with_an_unreachable_server_raises_lockunusable(tmp_path: Path):
    ran = tmp_path / "ran"
    with pytest.raises(taskrunner.LockUnusable):
        taskrunner.run(f"touch {ran}", lock_url="postgresql://nobody@127.0.0.1:9/none",
                       key="k")  # fmt: skip
    assert not ran.exists()
