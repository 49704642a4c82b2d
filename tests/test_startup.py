"""An uncontended run costs about what starting Python costs: it imports only what it needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG, TASKRUNNER

# Each costs milliseconds to import, more than the rest of an uncontended run; none is
# needed on its path. re and enum come with pip's console-script launcher.
HEAVY = ("re", "enum", "typing", "argparse", "logging", "json", "tempfile", "subprocess")
LIBRARY = ("taskrunner.api", "taskrunner.lock", "taskrunner.logsink", "taskrunner.manpage")


def imported(argv: list[str], cwd: Path) -> set[str]:
    """The modules ``argv`` (a Python program) imports, as -X importtime reports them."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    return {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.skipif(not TASKRUNNER[0].endswith("/taskrunner"), reason="no installed command")
def test_installed_command_imports_nothing_it_does_not_need(tmp_path: Path):
    # The interpreter's own start-up imports some of these anyway; those are not ours.
    baseline = imported([sys.executable, "-c", "pass"], tmp_path)
    ours = imported([*TASKRUNNER, "-l", str(tmp_path / "job.lock"), "-c", "true"], tmp_path)
    assert "taskrunner.cli" in ours  # the report is read right
    extra = ours - baseline
    assert sorted(m for m in extra if m in HEAVY or m in LIBRARY) == []


def test_installed_command_is_not_a_console_script_launcher():
    script = Path(sys.executable).parent / "taskrunner"
    if not script.exists():
        pytest.skip("no installed command")
    text = script.read_text()
    assert text.startswith("#!") and "import re" not in text
