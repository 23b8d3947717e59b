"""What the benchmark reads about processes and the machine: /proc counters, versions, py-spy.

CPU time comes from /proc/PID/stat (utime + stime of all the process's threads, in clock ticks,
so 10 ms resolution: enough over a run of seconds). py-spy samples from outside the process
(ptrace), so mailgate runs unmodified; time spent in C (uvloop, socket calls, re) is charged to
the Python frame that called it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYSPY_RATE = 250  # samples per second; py-spy's own CPU stays small on 2 cores
# --gil: with the process paused for each sample (the default, consistent stacks) every thread
# looks busy to py-spy here, idle ones included; a thread waiting in epoll/select has released
# the GIL, so "holds the GIL" is the test for "was running Python or C called from it".


# ---------------------------------------------------------------- /proc

def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds, all threads, the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime: fields 14, 15


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds of these processes and of their children they reaped (cutime, cstime):
    summed over a process tree, the total survives children that exit in between."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(v) for v in fields[11:15])
    times = os.times()  # this process and the children it waited for (smtp-source, postqueue)
    return total / CLK_TCK + times.user + times.system + times.children_user + times.children_system


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def system_ticks() -> tuple[int, int, int]:
    """(busy, total, irq + softirq) clock ticks of all CPUs since boot; idle and iowait are not
    busy. Interrupt time (loopback TCP is mostly softirq) is not charged to any process."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), ticks[5] + ticks[6]


def busy_share(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def busy_seconds(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    """CPU seconds all processes and interrupts used between two system_ticks()."""
    return (after[0] - before[0]) / CLK_TCK


def others_share(before: tuple[int, ...], after: tuple[int, ...], ours: float) -> float:
    """Share of all CPUs busy with neither interrupts nor `ours` (CPU seconds we know of)."""
    total = after[1] - before[1]
    foreign = (after[0] - before[0]) - (after[2] - before[2]) - ours * CLK_TCK
    return max(0.0, foreign / total) if total else 0.0


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of these processes (those that still exist)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass  # the thread ended meanwhile


@contextmanager
def isolated(pid: int, others: Callable[[], list[int]]) -> Iterator[bool]:
    """`pid` alone on the last CPU; we, our children and `others()` on the rest. A process
    that is runnable but preempted looks busy to a sampler: alone on a CPU, it is never that."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        yield False
        return
    alone = {max(cpus)}
    pin([pid], alone)
    pin([os.getpid(), *others()], cpus - alone)
    try:
        yield True
    finally:
        pin([pid, os.getpid(), *others()], cpus)


# ---------------------------------------------------------------- facts for the report

def _command(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.strip()


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    return found.group(1) if found else platform.processor() or "unknown"


def revision(checkout: Path = REPO) -> str:
    """The checkout's commit, and whether its mailgate/ differs from it."""
    commit = _command("git", "-C", str(checkout), "rev-parse", "--short", "HEAD")
    dirty = _command("git", "-C", str(checkout), "status", "--porcelain", "--", "mailgate")
    return commit + (" + uncommitted changes in mailgate/" if dirty else "")


def describe(root: Path) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} × {_cpu_model()}, "
                   f"{platform.system()} {platform.release()}, "
                   f"{_command('sh', '-c', '. /etc/os-release && echo $PRETTY_NAME')}",
        "filesystem": _command("df", "--output=fstype", str(root)).splitlines()[-1],
        "mailgate": f"{_package('mailgate')} (git {revision()})",
        "python": platform.python_version(),
        "uvloop": _package("uvloop"),
        "dovecot": _command("dovecot", "--version"),
        "postfix": _command("postconf", "-dh", "mail_version"),
        "command": "python3 bench/throughput.py " + " ".join(sys.argv[1:]),
    }


# ---------------------------------------------------------------- py-spy

def _shorten(frame: str, prefixes: list[str]) -> str:
    """"f (/abs/site-packages/aiosmtpd/smtp.py:12)" -> "f (aiosmtpd/smtp.py:12)"."""
    for prefix in prefixes:
        frame = frame.replace(prefix, "")
    return frame


COMPONENTS = (("aiosmtpd/", "aiosmtpd"), ("mailgate/", "mailgate"), ("logging/", "logging"),
              ("email/", "email (address parsing)"), ("asyncio/", "asyncio"),
              ("uvloop/", "uvloop"),
              ("prometheus_client/", "prometheus_client"), ("inspect.py", "inspect"))


def component(frame: str) -> str:
    if frame.startswith("Runner.run ("):  # uvloop's C loop under asyncio.Runner
        return "event loop internals (uvloop C: epoll, accept, recv, callbacks)"
    where = frame.rpartition(" (")[2]
    return next((name for prefix, name in COMPONENTS if where.startswith(prefix)),
                "other stdlib / threads")


class PySpy:
    """`py-spy record` attached to `pid` while the `with` block runs; then tally()."""

    def __init__(self, pid: int, directory: Path):
        self.pid, self.dir = pid, directory
        self.raw, self.log = directory / "collapsed.txt", directory / "py-spy.log"
        self.proc: subprocess.Popen | None = None

    def available(self) -> bool:
        return _command("sh", "-c", "command -v py-spy") != ""

    def __enter__(self) -> "PySpy":
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = ["py-spy", "record", "--pid", str(self.pid), "--rate", str(PYSPY_RATE),
               "--function", "--gil", "--format", "raw", "--output", str(self.raw)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while "Sampling" not in self.log.read_text() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"py-spy exited at start: {self.log.read_text()}")
            time.sleep(0.05)  # bounded by `deadline`
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tally(self) -> dict:
        """Samples by function: own (leaf) time, inclusive time, own time per component."""
        prefixes = [sysconfig.get_paths()["purelib"] + "/", sysconfig.get_paths()["stdlib"] + "/",
                    str(REPO) + "/"]
        own, inclusive, components, total = Counter(), Counter(), Counter(), 0
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_shorten(f, prefixes) for f in stack.split(";")]
            total += int(count)
            own[frames[-1]] += int(count)
            components[component(frames[-1])] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
        return {"samples": total, "own": own, "inclusive": inclusive, "components": components,
                "rate": PYSPY_RATE}


# ---------------------------------------------------------------- BENCHMARKS.md

def write_notes_section(path: Path, section: str, start: str, end: str) -> None:
    """`section` (which opens with the marker `start` and closes with `end`) into `## Notes`,
    which bench/throughput.py carries over, replacing an earlier one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text,
                      flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + ("\n\n" if "## Notes" in text else "\n\n## Notes\n\n") + section
    path.write_text(text.rstrip("\n") + "\n")
