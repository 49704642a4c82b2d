"""Soak: thousands of contended runs on one lock, with runners and commands killed at random.

Run from the repository root (standard library only; about two minutes per 10,000 runs):

    python bench/soak.py [--runs 10000] [--parallel 12] [--seed 1] [--control]

--control runs the same load, without kills, under a lock that checks for the file and then
creates it (the home-grown kind taskrunner replaces; a 5 ms pause between the two widens the
race), to show that the overlap check finds overlaps: it reports dozens.

Every run uses the same lock and a --cumulative counter; some wait for the lock, most do not.
At random, a runner or its command is killed with SIGKILL a moment after it starts. Each
command notes in one log when it starts and ends, and at its start whether the command that
started before it is still running and has not ended: that is an overlap. Printed at the end
(all must be 0): overlaps, by that look and by reading the log whole afterwards; lost
increments (runs that exited 75, refused and counted, beyond the count) and increments beyond
the refusals and the runners killed; stuck locks (a run that could not take the lock once
everything had ended); and how long it all took. Exits 1 if any is not 0.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ENV, setup_venv

# $1 log; notes an overlap if the last command to start has not ended and still runs.
COMMAND = r"""
last=$(grep '^start ' "$1" 2>/dev/null | tail -n 1 | cut -d' ' -f2)
if [ -n "$last" ] && ! grep -q "^end $last\$" "$1" && kill -0 "$last" 2>/dev/null; then
    echo "overlap $$ $last" >> "$1"
fi
echo "start $$" >> "$1"
sleep 0.0$(( $$ % 5 ))
echo "end $$" >> "$1"
"""


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def intervals_overlapping(text: str, killed: set[int]) -> int:
    """Starts that came while another command had started and not ended, not counting
    commands killed on purpose (they never write their end)."""
    found, running = 0, None
    for line in text.splitlines():
        what, _, pid = line.partition(" ")
        if what == "start":
            if running is not None and int(running) not in killed:
                found += 1
            running = pid
        elif what == "end" and pid == running:
            running = None
    return found


def commands_of(log: Path) -> list[int]:
    """The commands still running that write ``log``."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.fsencode(log) in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--parallel", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--control", action="store_true", help="a broken lock, for contrast")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    taskrunner, _ = setup_venv()
    tmp = Path(tempfile.mkdtemp(prefix="taskrunner-soak-"))
    lock, counter, log = tmp / "L", tmp / "C", tmp / "log"
    base = [str(taskrunner), "-q", "-l", str(lock), "-t", "1000000000", "-f", str(counter),
            "--cumulative"]  # fmt: skip
    devnull = os.open(os.devnull, os.O_RDWR)
    running: dict[int, tuple[float, str]] = {}  # pid -> (when to kill, what) or (0, "")
    stats = {"ran": 0, "refused": 0, "killed runners": 0, "killed commands": 0, "other": 0}
    killed_commands: set[int] = set()
    started = time.monotonic()
    launched = 0
    while launched < opts.runs or running:
        while launched < opts.runs and len(running) < opts.parallel:
            wait = ["--wait", "0.2"] if rng.random() < 0.2 else []
            argv = [*base, *wait, "--", "sh", "-c", COMMAND, "sh", str(log)]
            if opts.control:
                naive = f'[ -e "$2" ] && exit 75\nsleep 0.005\n: > "$2"\n{COMMAND}\nrm -f "$2"\n'
                argv = ["/bin/sh", "-c", naive, "sh", str(log), str(lock)]
            actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
            pid = os.posix_spawn(argv[0], argv, ENV, file_actions=actions, setsid=True)
            roll = rng.random() if not opts.control else 1.0  # the control: races alone
            what = "runner" if roll < 0.05 else "command" if roll < 0.10 else ""
            running[pid] = (time.monotonic() + rng.uniform(0, 0.05), what)
            launched += 1
        for pid, (when, what) in list(running.items()):
            if what and time.monotonic() >= when:
                target = pid if what == "runner" else next(iter(children(pid)), 0)
                if target:
                    os.kill(target, signal.SIGKILL)
                    stats[f"killed {what}s"] += 1
                    if what == "command":
                        killed_commands.add(target)
                # A command may not have started yet: try again a little later, if it runs.
                running[pid] = (0.0, "") if target or what == "runner" else (when + 0.005, what)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            time.sleep(0.002)
            continue
        running.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        stats["ran" if code == 0 else "refused" if code == 75 else "other"] += 1
    # Wait for commands whose runners were killed, then a run must take the lock at once.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and commands_of(log):
        time.sleep(0.05)
    final = os.waitstatus_to_exitcode(os.system(f"{taskrunner} -l {lock} -c true 2>/dev/null"))
    took = time.monotonic() - started
    text = log.read_text() if log.exists() else ""
    count = int(counter.read_text() or 0) if counter.exists() else 0
    # Two checks of overlap: each command's own look at its start, and the log read whole
    # (a start while another command has started and not ended, unless we killed that one).
    overlaps = text.count("overlap ") + intervals_overlapping(text, killed_commands)
    # Every refusal that exited 75 had counted; a killed runner may or may not have.
    lost = max(0, stats["refused"] - count)
    extra = max(0, count - stats["refused"] - stats["killed runners"])
    stuck = 0 if final == 0 else 1
    print(f"runs: {opts.runs} in {took:.1f} s ({opts.runs / took:.0f}/s), {opts.parallel} at once")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"commands started: {text.count('start ')}, count: {count}")
    print(f"overlaps: {overlaps}")
    print(f"lost increments: {lost}, increments beyond the refusals: {extra}")
    print(f"stuck locks: {stuck}")
    return 0 if overlaps == lost == extra == stuck == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
