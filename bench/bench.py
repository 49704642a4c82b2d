"""Benchmark taskrunner: start-up cost, --wait hand-over latency, storms of runners.

Run from the repository root (standard library only; --quick for a shorter run):

    python bench/bench.py [--quick]

It installs taskrunner (non-editable, byte-compiled) into a virtual environment under
bench/results/venv, prints a report and writes it as JSON to bench/results/latest.json.
It exits 1 when a storm's correctness check fails; the speed targets are only reported.
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
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV = RESULTS / "venv"
BUSY = 75
STARTUP_TARGET = 1.15  # taskrunner -c true -l L vs. the empty console script
HANDOVER_TARGET_MS = 5.0
STORM_SIZES = (100, 500)
LAUNCHER_IMPORT = "from taskrunner.cli import entrypoint"

# The environment of the install and of every run: byte-code caches allowed.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
DEVNULL = os.open(os.devnull, os.O_RDWR)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=ENV).stdout


def setup_venv() -> tuple[Path, Path]:
    """Install taskrunner into the venv; returns its launcher and the empty console script."""
    cfg = VENV / "pyvenv.cfg"
    exe = os.path.realpath(sys.executable)
    if not (cfg.exists() and f"executable = {exe}\n" in cfg.read_text()):
        shutil.rmtree(VENV, ignore_errors=True)
        sh(sys.executable, "-m", "venv", str(VENV))
    python = VENV / "bin" / "python"
    sh(str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(ROOT))
    site = Path(
        sh(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    package = site / "taskrunner"
    tag = sys.implementation.cache_tag
    missing = [
        p.name
        for p in package.glob("*.py")
        if not (package / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()
    ]
    if missing or not (package / "cli.py").exists():
        sys.exit(f"bench: no byte-code in {package}/__pycache__ for {missing or 'cli.py'}")
    launcher = VENV / "bin" / "taskrunner"
    text = launcher.read_text()
    if LAUNCHER_IMPORT + "\n" not in text:
        sys.exit(f"bench: {launcher} has no line {LAUNCHER_IMPORT!r}")
    empty = VENV / "bin" / "taskrunner-empty"
    empty.write_text(text.replace(LAUNCHER_IMPORT + "\n", "def entrypoint(): return 0\n"))
    empty.chmod(0o755)
    return launcher, empty


def spawn(argv: list[str], stderr: int | None = None) -> int:
    """Start ``argv`` (a path, no PATH search) with stdin and stdout on /dev/null."""
    actions = [(os.POSIX_SPAWN_DUP2, DEVNULL, 0), (os.POSIX_SPAWN_DUP2, DEVNULL, 1)]
    if stderr is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
    return os.posix_spawn(argv[0], argv, ENV, file_actions=actions)


def reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall and user+sys CPU seconds of one run of ``argv``, which must exit 0."""
    start = time.perf_counter()
    pid = spawn(argv)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {shlex.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def quantile(data: list[float], q: int) -> float:
    """The q-th percentile (q a multiple of 10)."""
    return statistics.quantiles(data, n=10, method="inclusive")[q // 10 - 1]


def startup(taskrunner: Path, empty: Path, tmp: Path, rounds: int) -> dict[str, dict[str, float]]:
    lock, lock2 = str(tmp / "L"), str(tmp / "L2")
    flock = shutil.which("flock") or sys.exit("bench: flock(1) (util-linux) not found")
    cases = {
        "taskrunner -c true -l L": [str(taskrunner), "-c", "true", "-l", lock],
        "taskrunner -l L -- true": [str(taskrunner), "-l", lock, "--", "true"],
        "empty console script": [str(empty)],
        "python -c pass": [str(VENV / "bin" / "python"), "-c", "pass"],
        "flock -n L2 true": [flock, "-n", lock2, "true"],
    }
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for n in range(rounds + 3):  # the first 3 rounds warm the caches and are not counted
        random.shuffle(names)
        for name in names:
            wall, cpu = timed(cases[name])
            if n >= 3:
                walls[name].append(wall * 1e3)
                cpus[name].append(cpu * 1e3)
    base_wall = statistics.median(walls["empty console script"])
    base_cpu = statistics.median(cpus["empty console script"])
    result = {}
    for name in cases:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        result[name] = {
            "wall_median_ms": wall,
            "wall_p10_ms": quantile(walls[name], 10),
            "cpu_median_ms": cpu,
            "wall_ratio": wall / base_wall,
            "cpu_ratio": cpu / base_cpu,
        }
    return result


def wait_until(ready: Callable[[], object], pid: int, what: str) -> None:
    """Poll ``ready()`` every 0.5 ms for 10 s; fail if process ``pid`` exits first."""
    deadline = time.monotonic() + 10
    while not ready():
        if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
            sys.exit(f"bench: gave up waiting for {what}")
        time.sleep(0.0005)


def handover(taskrunner: Path, tmp: Path, reps: int) -> dict[str, dict[str, float]]:
    flock = shutil.which("flock") or "flock"
    samples: dict[str, list[float]] = {"taskrunner": [], "flock(1)": []}
    for rep in range(reps):
        for tool in random.sample(list(samples), 2):
            d = tmp / f"wait-{rep}-{tool[:5]}"
            d.mkdir()
            lock, end, start = str(d / "L"), d / "END", d / "START"
            hold = f"sleep 0.2; date +%s%N > {shlex.quote(str(end))}"
            wait = f"date +%s%N > {shlex.quote(str(start))}"
            if tool == "taskrunner":
                holder = spawn([str(taskrunner), "-l", lock, "--", "sh", "-c", hold])
                wait_until(Path(lock).exists, holder, "the holder's lock file")
                waiter = spawn(
                    [str(taskrunner), "-l", lock, "--wait", "10", "--", "sh", "-c", wait]
                )
            else:
                holder = spawn([flock, lock, "sh", "-c", hold])
                children = Path(f"/proc/{holder}/task/{holder}/children")
                wait_until(children.read_text, holder, "flock's command")
                waiter = spawn([flock, "-w", "10", lock, "sh", "-c", wait])
            if reap(holder) or reap(waiter):
                sys.exit(f"bench: {tool}'s holder or waiter failed")
            latency = (int(start.read_text()) - int(end.read_text())) / 1e6
            samples[tool].append(latency)
    return {
        tool: {"median_ms": statistics.median(ms), "p90_ms": quantile(ms, 90)}
        for tool, ms in samples.items()
    }


# $1 is the log, $2 the file GO: wait for it, polling every 10 ms, at most 30 s.
STORM_SCRIPT = (
    'echo start >> "$1"; i=0; '
    'while [ ! -e "$2" ] && [ "$i" -lt 3000 ]; do sleep 0.01; i=$((i + 1)); done; '
    'echo end >> "$1"'
)


def storm(taskrunner: Path, tmp: Path, n: int) -> dict[str, object]:
    lockdir, aux = tmp / f"storm-{n}", tmp / f"storm-{n}-aux"
    lockdir.mkdir()
    aux.mkdir()
    lock, counter, log, go = lockdir / "L", lockdir / "C", aux / "LOG", aux / "GO"
    opts = ["-l", str(lock), "-t", "100000", "-f", str(counter)]
    argv = [str(taskrunner), *opts, "--", "sh", "-c", STORM_SCRIPT, "sh", str(log), str(go)]
    errors = os.open(aux / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = time.perf_counter()
    pids = {spawn(argv, stderr=errors) for _ in range(n)}
    codes: list[int] = []
    while pids:
        pid, status = os.wait()
        pids.discard(pid)
        codes.append(os.waitstatus_to_exitcode(status))
        if len(codes) == n - 1:  # every refused runner is gone: let the winner finish
            go.touch()
    wall = time.perf_counter() - start
    os.close(errors)
    ran = log.read_text().split().count("start") if log.exists() else 0
    refused = codes.count(BUSY)
    count = int(counter.read_text() or 0) if counter.exists() else 0
    leftovers = sorted(p.name for p in lockdir.iterdir() if p != counter)
    checks = {
        "exactly one ran": ran == 1,
        "n-1 exited 75": refused == n - 1,
        "counter equals refusals": count == refused == n - 1,
        "nothing else left in lock dir": not leftovers,
    }
    stderr = (aux / "stderr").read_text().splitlines()
    return {
        "n": n,
        "wall_s": wall,
        "runs_per_s": n / wall,
        "ran": ran,
        "exit_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
        "exited_75": refused,
        "counter": count,
        "leftovers": leftovers,
        "checks": checks,
        "passed": all(checks.values()),
        "stderr_sample": sorted(set(stderr))[:5],
    }


def machine() -> dict[str, object]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return {
        "uname": sh("uname", "-srm").strip(),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def report(res: dict[str, Any]) -> bool:
    m, args = res["machine"], res["args"]
    print(f"\nmachine: {m['uname']} | {m['cpu']} | nproc {m['nproc']} | {m['python']}")
    start: dict[str, dict[str, float]] = res["startup"]
    print(
        f"\nstart-up, {args['rounds']} interleaved rounds (ms; x = median / empty console "
        "script's median)"
    )
    print(f"  {'case':<26}{'wall med':>9}{'wall p10':>9}{'cpu med':>9}{'wall x':>8}{'cpu x':>7}")
    for name, r in start.items():
        print(
            f"  {name:<26}{r['wall_median_ms']:>9.2f}{r['wall_p10_ms']:>9.2f}"
            f"{r['cpu_median_ms']:>9.2f}{r['wall_ratio']:>8.2f}{r['cpu_ratio']:>7.2f}"
        )
    ratio = start["taskrunner -c true -l L"]["wall_ratio"]
    print(
        f"  target: taskrunner -c true -l L at most {STARTUP_TARGET:.2f}x the empty console "
        f"script: {ratio:.2f}x {'MET' if ratio <= STARTUP_TARGET else 'MISSED'}"
    )
    wait: dict[str, dict[str, float]] = res["handover"]
    print(f"\n--wait hand-over latency, {args['reps']} reps (ms, START - END)")
    print(f"  {'':<12}{'median':>8}{'p90':>8}")
    for tool, r in wait.items():
        print(f"  {tool:<12}{r['median_ms']:>8.2f}{r['p90_ms']:>8.2f}")
    med = wait["taskrunner"]["median_ms"]
    print(
        f"  target: taskrunner under {HANDOVER_TARGET_MS:g} ms: {med:.2f} ms "
        f"{'MET' if med < HANDOVER_TARGET_MS else 'MISSED'}"
    )
    print("\nstorms against one lock, with counting")
    ok = True
    for s in res["storms"]:
        print(
            f"  n={s['n']}: {s['wall_s']:.2f} s, {s['runs_per_s']:.0f} runs/s; ran {s['ran']}, "
            f"exited 75: {s['exited_75']}, counter {s['counter']}, exit codes "
            f"{s['exit_codes']}, left in lock dir: {s['leftovers'] or 'nothing'}"
        )
        for check, passed in s["checks"].items():
            print(f"    {'PASS' if passed else 'FAIL'}  {check}")
        if not s["passed"]:
            ok = False
            for line in s["stderr_sample"]:
                print(f"    stderr: {line}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    opts = parser.parse_args()
    rounds, reps = (60, 8) if opts.quick else (300, 30)
    RESULTS.mkdir(parents=True, exist_ok=True)
    print("installing taskrunner into", VENV.relative_to(ROOT), flush=True)
    taskrunner, empty = setup_venv()
    tmp = Path(tempfile.mkdtemp(prefix="taskrunner-bench-", dir="/tmp"))
    try:
        print(f"start-up: {rounds} rounds", flush=True)
        res: dict[str, Any] = {"machine": machine(), "args": {"rounds": rounds, "reps": reps}}
        res["startup"] = startup(taskrunner, empty, tmp, rounds)
        print(f"hand-over: {reps} reps", flush=True)
        res["handover"] = handover(taskrunner, tmp, reps)
        print(f"storms: {', '.join(map(str, STORM_SIZES))} runners", flush=True)
        res["storms"] = [storm(taskrunner, tmp, n) for n in STORM_SIZES]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = report(res)
    (RESULTS / "latest.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten: {(RESULTS / 'latest.json').relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
