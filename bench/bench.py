"""Benchmark taskrunner against the tools people would use instead, side by side.

Run from the repository root (--quick for a shorter run):

    python bench/bench.py [--quick] [--chart PATH.svg]

It installs taskrunner (non-editable, byte-compiled) and the peers it is measured against
(the ``bench`` extra: filelock, fasteners) into a virtual environment under
bench/results/venv, then measures, every ratio from one run on one machine:

- the command: ``taskrunner -c true -l L`` against ``python -c pass`` and ``flock -n``;
- the library: acquire-and-release pairs per second of ``taskrunner.Lock`` against
  filelock's SoftFileLock and FileLock and fasteners' InterProcessLock, on the file system
  of /tmp and on tmpfs (/dev/shm);
- the ``--wait`` hand-over against flock(1)'s, and storms of 100 and 500 runners.

It prints a report, writes it as JSON to bench/results/latest.json, and with --chart draws
the library's numbers as an SVG bar chart. It exits 1 when a storm's correctness check
fails; the speed targets are only reported.
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
STARTUP_TARGET = 1.15  # taskrunner -c true -l L vs. an empty console script of pip's
SOFT_TARGET = 3.0  # taskrunner.Lock vs. filelock.SoftFileLock, pairs per second
FILELOCK_TARGET = 1.0  # taskrunner.Lock vs. filelock.FileLock: faster still
LOCK_ITERATIONS = 2000
# What the chart shows; bench/locks.py also times taskrunner.Lock without its fdatasync.
PEERS = ("taskrunner.Lock", "filelock.SoftFileLock", "filelock.FileLock",
         "fasteners.InterProcessLock")  # fmt: skip
HANDOVER_TARGET_MS = 5.0
STORM_SIZES = (100, 500)
LAUNCHER_IMPORT = "from taskrunner.cli import entrypoint"

# The environment of the install and of every run: byte-code caches allowed.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
DEVNULL = os.open(os.devnull, os.O_RDWR)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=ENV).stdout


def setup_venv() -> tuple[Path, Path]:
    """Install taskrunner and the peers into the venv; returns the taskrunner script and a
    console-script launcher of the kind pip writes, each with a twin that does nothing."""
    cfg = VENV / "pyvenv.cfg"
    exe = os.path.realpath(sys.executable)
    if not (cfg.exists() and f"executable = {exe}\n" in cfg.read_text()):
        shutil.rmtree(VENV, ignore_errors=True)
        sh(sys.executable, "-m", "venv", str(VENV))
    python = VENV / "bin" / "python"
    sh(str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[bench]")
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
    # What pip writes for a console_scripts entry point (taskrunner was installed so), and
    # each of the two scripts with an entry point that does nothing.
    pip_style = VENV / "bin" / "taskrunner-console-script"
    pip_style.write_text(
        f"#!{python}\nimport re\nimport sys\n{LAUNCHER_IMPORT}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(entrypoint())\n"
    )
    scripts = {"": launcher, "-console-script": pip_style}
    for suffix, script in scripts.items():
        empty = VENV / "bin" / f"taskrunner{suffix}-empty"
        empty.write_text(
            script.read_text().replace(LAUNCHER_IMPORT + "\n", "def entrypoint(): return 0\n")
        )
        empty.chmod(0o755)
    pip_style.chmod(0o755)
    return launcher, pip_style


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


def startup(
    taskrunner: Path, pip_style: Path, tmp: Path, rounds: int
) -> dict[str, dict[str, float]]:
    lock, lock2, lock3 = str(tmp / "L"), str(tmp / "L2"), str(tmp / "L3")
    flock = shutil.which("flock") or sys.exit("bench: flock(1) (util-linux) not found")
    cases = {
        "taskrunner -c true -l L": [str(taskrunner), "-c", "true", "-l", lock],
        "taskrunner -l L -- true": [str(taskrunner), "-l", lock, "--", "true"],
        "the same, pip launcher": [str(pip_style), "-c", "true", "-l", lock3],
        "empty console script": [str(VENV / "bin" / "taskrunner-console-script-empty")],
        "script doing nothing": [str(VENV / "bin" / "taskrunner-empty")],
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
    base_wall = statistics.median(walls["python -c pass"])
    base_cpu = statistics.median(cpus["python -c pass"])
    flock_wall = statistics.median(walls["flock -n L2 true"])
    empty_wall = statistics.median(walls["empty console script"])
    result = {}
    for name in cases:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        result[name] = {
            "wall_median_ms": wall,
            "wall_p10_ms": quantile(walls[name], 10),
            "cpu_median_ms": cpu,
            "wall_ratio": wall / base_wall,
            "cpu_ratio": cpu / base_cpu,
            "vs_flock": wall / flock_wall,
            "vs_empty": wall / empty_wall,
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
        f"\nthe command, {args['rounds']} interleaved rounds (ms; x = median / the median of "
        "python -c pass, or of flock -n)"
    )
    print(
        f"  {'case':<26}{'wall med':>9}{'wall p10':>9}{'cpu med':>9}{'wall x':>8}{'cpu x':>7}"
        f"{'x flock':>9}"
    )
    for name, r in start.items():
        print(
            f"  {name:<26}{r['wall_median_ms']:>9.2f}{r['wall_p10_ms']:>9.2f}"
            f"{r['cpu_median_ms']:>9.2f}{r['wall_ratio']:>8.2f}{r['cpu_ratio']:>7.2f}"
            f"{r['vs_flock']:>9.2f}"
        )
    ratio = start["taskrunner -c true -l L"]["vs_empty"]
    print(
        f"  target: taskrunner -c true -l L at most {STARTUP_TARGET:.2f}x an empty console "
        f"script: {ratio:.2f}x {'MET' if ratio <= STARTUP_TARGET else 'MISSED'}"
    )
    print("\nthe library: acquire + release pairs per second, uncontended (x = taskrunner / peer)")
    for where in res["library"]:
        print(f"  {where['directory']} ({where['fstype']}), {args['lock_rounds']} rounds:")
        ours = where["locks"]["taskrunner.Lock"]["pairs_per_s"]
        for name, r in where["locks"].items():
            x = "" if name == "taskrunner.Lock" else f"{ours / r['pairs_per_s']:>8.2f}x"
            took = f"({1e6 / r['pairs_per_s']:.1f} us)"
            print(f"    {name:<28}{r['pairs_per_s']:>10.0f}/s {took:>12}{x}")
        soft = ours / where["locks"]["filelock.SoftFileLock"]["pairs_per_s"]
        hard = ours / where["locks"]["filelock.FileLock"]["pairs_per_s"]
        print(
            f"    targets: >= {SOFT_TARGET:g}x SoftFileLock: {soft:.2f}x "
            f"{'MET' if soft >= SOFT_TARGET else 'MISSED'}; faster than FileLock: {hard:.2f}x "
            f"{'MET' if hard > FILELOCK_TARGET else 'MISSED'}"
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


def fstype(directory: Path) -> str:
    """The type of the file system ``directory`` is on, as the mount table names it."""
    if shutil.which("findmnt"):
        # The first line: the mount that holds the directory, if others are stacked on it.
        lines = sh("findmnt", "-n", "-o", "FSTYPE", "--target", str(directory)).split()
        return lines[0] if lines else "?"
    return sh("stat", "-f", "-c", "%T", str(directory)).strip()


def library(tmp: Path, rounds: int) -> list[dict[str, Any]]:
    """The library's rate against its peers', in a directory on /tmp's file system and in
    one on tmpfs, each measured by bench/locks.py in the venv."""
    places = [tmp / "locks"]
    if Path("/dev/shm").is_dir():
        places.append(Path(tempfile.mkdtemp(prefix="taskrunner-bench-", dir="/dev/shm")))
    found = []
    try:
        for place in places:
            place.mkdir(exist_ok=True)
            out = sh(
                str(VENV / "bin" / "python"),
                str(ROOT / "bench" / "locks.py"),
                str(place),
                str(LOCK_ITERATIONS),
                str(rounds),
            )
            found.append({"directory": str(place), "fstype": fstype(place), **json.loads(out)})
    finally:
        for place in places[1:]:
            shutil.rmtree(place, ignore_errors=True)
    return found


def chart(res: dict[str, Any]) -> str:
    """The library's numbers as a small horizontal bar chart (SVG), one group a directory."""
    rows: list[tuple[str, str, float]] = []
    for where in res["library"]:
        for name, r in where["locks"].items():
            if name in PEERS:
                rows.append((where["fstype"], name, r["pairs_per_s"]))
    top = max(rate for _, _, rate in rows)
    label_w, bar_w, row_h, head = 300, 340, 22, 34
    groups = list(dict.fromkeys(fs for fs, _, _ in rows))
    height = head + len(rows) * row_h + len(groups) * 24 + 28
    width = label_w + bar_w + 90
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="10" y="22" font-weight="bold">Acquire + release pairs per second, '
        "uncontended (more is better)</text>",
    ]
    y = head
    for group in groups:
        y += 18
        out.append(f'<text x="10" y="{y}" font-style="italic">lock directory on {group}</text>')
        y += 6
        for fs, name, rate in rows:
            if fs != group:
                continue
            w = max(1.0, bar_w * rate / top)
            colour = "#c0392b" if name == "taskrunner.Lock" else "#7f8c8d"
            out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{name}</text>')
            out.append(
                f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                f'fill="{colour}"/>'
            )
            out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{rate:,.0f}</text>')
            y += row_h
    m = res["machine"]
    out.append(
        f'<text x="10" y="{height - 10}" font-size="11" fill="#555">{m["cpu"]}, '
        f"{m['nproc']} CPUs, {m['uname']}, {m['python']}: python bench/bench.py</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    parser.add_argument("--chart", type=Path, help="also draw the library's numbers as SVG")
    opts = parser.parse_args()
    rounds, reps = (60, 8) if opts.quick else (300, 30)
    lock_rounds = 5 if opts.quick else 15
    RESULTS.mkdir(parents=True, exist_ok=True)
    print("installing taskrunner into", VENV.relative_to(ROOT), flush=True)
    taskrunner, pip_style = setup_venv()
    tmp = Path(tempfile.mkdtemp(prefix="taskrunner-bench-", dir="/tmp"))
    try:
        print(f"start-up: {rounds} rounds", flush=True)
        args = {"rounds": rounds, "reps": reps, "lock_rounds": lock_rounds}
        res: dict[str, Any] = {"machine": machine(), "args": args}
        res["startup"] = startup(taskrunner, pip_style, tmp, rounds)
        print(f"library: {lock_rounds} rounds of {LOCK_ITERATIONS} pairs", flush=True)
        res["library"] = library(tmp, lock_rounds)
        print(f"hand-over: {reps} reps", flush=True)
        res["handover"] = handover(taskrunner, tmp, reps)
        print(f"storms: {', '.join(map(str, STORM_SIZES))} runners", flush=True)
        res["storms"] = [storm(taskrunner, tmp, n) for n in STORM_SIZES]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = report(res)
    (RESULTS / "latest.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten: {(RESULTS / 'latest.json').relative_to(ROOT)}")
    if opts.chart is not None:
        opts.chart.parent.mkdir(parents=True, exist_ok=True)
        opts.chart.write_text(chart(res))
        print(f"written: {opts.chart}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
