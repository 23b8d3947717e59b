#!/usr/bin/env python3
"""Throughput of mailgate against its two yardsticks, measured in one run on one machine.

The same load (smtp-source: N messages of SIZE bytes, one recipient each, S parallel sessions)
goes into the same Dovecot by three paths:
  (a) smtp-source     -> mailgate SMTP listener -> Dovecot LMTP   (what we ship)
  (b) smtp-source -L  -> Dovecot LMTP directly                    (the ceiling: Dovecot's own cost)
  (c) smtp-source     -> Postfix -> lmtp:inet Dovecot             (what operators run today)
A run is timed from the start of smtp-source until it has exited AND all N messages are in the
recipient's maildir (Postfix queues, so (c) is time to delivery, not to 250). Every run gets a
fresh recipient. The machine is shared and noisy, so the paths alternate within each round (order
rotated), each run waits for the cores to be quiet, and a round during which other processes took
CPU is measured again. BENCHMARKS.md gets per-round rates, medians, ratios of medians, mailgate's
CPU per message and peak RSS; --profile adds one more (a) run under py-spy: where mailgate's CPU
goes.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (Dovecot, Mailgate, Postfix, descendants, free_port, read_pid,  # noqa: E402
                   wait_until)
import probes  # noqa: E402
import report  # noqa: E402

DOMAIN = "example.test"
SENDER = "bench@client.test"
PATHS = "abc"
SETTLE_SECONDS = 1.0  # after each run: Dovecot's and Postfix's processes finish logging
QUIET_WAIT, QUIET_BUSY = 120, 0.10  # the machine is shared: wait for others' load to pass
MAX_OTHERS, ROUND_ATTEMPTS = 0.15, 3  # and measure a round again if it came during a run


@dataclass
class Run:
    path: str
    round: int
    order: str
    messages: int
    seconds: float          # until smtp-source exited and all messages were in the maildir
    source_seconds: float   # until smtp-source exited (for (c): Postfix said 250 to all)
    busy: float             # share of all cores busy during the run, 0..1
    machine_cpu: float      # CPU seconds all processes used during the run
    gate_user: float        # mailgate's user CPU seconds during the run
    gate_sys: float         # mailgate's system CPU seconds during the run
    others: float           # share of all cores busy with processes this benchmark did not start
    attempt: int = 1        # of this round (again when others were busy)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def gate_cpu(self) -> float:
        return self.gate_user + self.gate_sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1000, help="per run (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a)(b)(c) (default 3)")
    p.add_argument("--sessions", type=int, default=4, help="smtp-source -s (default 4)")
    p.add_argument("--size", type=int, default=2048, help="smtp-source -l, bytes (default 2048)")
    p.add_argument("--warmup", type=int, default=300,
                   help="messages per path before the rounds, not counted (default 300)")
    p.add_argument("--reuse", action="store_true",
                   help="smtp-source -d: keep each connection for the next message "
                        "(default: a new connection per message)")
    p.add_argument("--fsync", choices=("optimized", "never"), default="optimized",
                   help="Dovecot mail_fsync (default: Dovecot's own default, optimized)")
    p.add_argument("--profile", action="store_true",
                   help="one more (a) run under py-spy; top functions go to BENCHMARKS.md")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, maildirs)")
    args = p.parse_args(argv)
    if min(args.messages, args.rounds, args.sessions, args.size) < 1 or args.warmup < 0:
        p.error("--messages, --rounds, --sessions, --size must be positive, --warmup not negative")
    return args


# ---------------------------------------------------------------- peers

def recipient(path: str, tag: str | int) -> str:
    return f"bench-{path}-{tag}@{DOMAIN}"


def all_recipients(rounds: int) -> list[str]:
    tags = ["warm", "profile",
            *(f"{r}-{a}" for r in range(1, rounds + 1) for a in range(1, ROUND_ATTEMPTS + 1))]
    return [recipient(path, tag) for tag in tags for path in PATHS]


def set_fsync(conf: Path, mode: str) -> None:
    """Replace the peer's mail_fsync line (tests use `never`) with the mode being measured."""
    text = re.sub(r"(?m)^mail_fsync\s*=.*\n", "", conf.read_text())
    conf.write_text(text + f"mail_fsync = {mode}\n")


def mailgate_config(root: Path, dovecot: Dovecot) -> dict:
    """As an operator runs it: log level info, metrics and health on, maildir fallback on."""
    return {
        "hostname": "mx.example.test",
        "domains": [DOMAIN],
        "data_dir": str(root / "data"),
        "listen": {"smtp": f"127.0.0.1:{free_port()}", "lmtp": "", "lookup": ""},
        "delivery": {"lmtp": f"127.0.0.1:{dovecot.lmtp_port}",
                     "maildir": dovecot.maildir_template},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info"},
    }


@contextmanager
def peers(root: Path, args: argparse.Namespace) -> Iterator[SimpleNamespace]:
    """Dovecot, Postfix -> Dovecot and mailgate -> Dovecot; all stopped on the way out."""
    with ExitStack() as stack:
        dovecot = Dovecot(root, all_recipients(args.rounds))
        set_fsync(dovecot.conf, args.fsync)
        stack.callback(dovecot.stop)  # registered first: a failed start may leave a daemon
        dovecot.start()
        postfix = Postfix(root, (DOMAIN,), f"lmtp:inet:127.0.0.1:{dovecot.lmtp_port}")
        stack.callback(postfix.stop)
        postfix.start()
        gate = Mailgate(root / "mailgate", mailgate_config(root / "mailgate", dovecot))
        stack.callback(gate.stop)
        gate.start()
        yield SimpleNamespace(dovecot=dovecot, postfix=postfix, mailgate=gate)


# ---------------------------------------------------------------- one run

def smtp_source(port: int, rcpt: str, messages: int, args: argparse.Namespace,
                lmtp: bool) -> list[str]:
    return ["smtp-source", *(["-L"] if lmtp else []), *(["-d"] if args.reuse else []),
            "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size),
            "-f", SENDER, "-t", rcpt, "-M", "client.test", f"127.0.0.1:{port}"]


def target(env: SimpleNamespace, path: str) -> tuple[int, bool]:
    """(port, speaks LMTP) where smtp-source connects for `path`."""
    return {"a": (env.mailgate.smtp[1], False),
            "b": (env.dovecot.lmtp_port, True),
            "c": (env.postfix.smtpd_port, False)}[path]


def count_messages(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))


def send(env: SimpleNamespace, path: str, rcpt: str, messages: int,
         args: argparse.Namespace) -> tuple[float, float]:
    """Seconds until smtp-source exited, and until all `messages` were in rcpt's maildir."""
    budget = 60 + 0.1 * messages  # 10 msg/s would be a broken setup, not a slow one
    maildir = env.dovecot.maildir(rcpt)
    port, lmtp = target(env, path)
    cmd = smtp_source(port, rcpt, messages, args, lmtp)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget,
                          stdin=subprocess.DEVNULL)
    source_seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    # Every 20 ms: listing 1000 names takes 0.3 ms, ~2 % of a core taken from the peers.
    wait_until(lambda: count_messages(maildir) >= messages, budget, interval=0.02,
               what=f"{messages} messages in {maildir}")
    seconds = time.monotonic() - start
    if count_messages(maildir) != messages:
        raise RuntimeError(f"{maildir}: {count_messages(maildir)} messages, sent {messages}")
    return seconds, source_seconds


def settle(env: SimpleNamespace) -> None:
    """Start the next run on a quiet machine: Postfix's queue empty, stragglers done, and
    (for up to QUIET_WAIT seconds) no one else keeping the cores busy."""
    wait_until(env.postfix.queue_empty, 120, interval=0.2, what="postfix queue empty")
    time.sleep(SETTLE_SECONDS)
    wait_quiet()


def wait_quiet() -> None:
    """Up to QUIET_WAIT seconds for other processes to stop keeping the cores busy."""
    deadline, told = time.monotonic() + QUIET_WAIT, False
    while time.monotonic() < deadline:
        before = probes.system_ticks()
        time.sleep(0.5)  # bounded by `deadline`
        busy = probes.busy_share(before, probes.system_ticks())
        if busy < QUIET_BUSY:
            return
        if not told:
            print(f"machine {busy:.0%} busy between runs: waiting up to {QUIET_WAIT} s",
                  file=sys.stderr)
            told = True


def measure(env: SimpleNamespace, path: str, rnd: int, order: str, rcpt: str,
            args: argparse.Namespace) -> Run:
    pid, ours = env.mailgate.pid, [env.mailgate.pid, *peer_processes(env)]
    cpu0, tree0, stat0 = probes.process_cpu(pid), probes.tree_cpu(ours), probes.system_ticks()
    seconds, source_seconds = send(env, path, rcpt, args.messages, args)
    ours = {*ours, *peer_processes(env)}  # processes started meanwhile began at 0
    cpu1, tree1, stat1 = probes.process_cpu(pid), probes.tree_cpu(ours), probes.system_ticks()
    others = probes.others_share(stat0, stat1, tree1 - tree0)
    run = Run(path, rnd, order, args.messages, seconds, source_seconds,
              probes.busy_share(stat0, stat1), probes.busy_seconds(stat0, stat1),
              cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], others)
    print(f"round {rnd} ({path}): {run.rate:6.1f} msg/s in {seconds:.2f} s, cores busy "
          f"{run.busy:.0%} (others {others:.0%}), mailgate cpu {run.gate_cpu:.2f} s",
          file=sys.stderr)
    settle(env)
    return run


# ---------------------------------------------------------------- the benchmark

def warm_up(env: SimpleNamespace, args: argparse.Namespace) -> None:
    """Spawn Dovecot's and Postfix's worker processes, fill mailgate's pool; not counted."""
    for path in PATHS if args.warmup > 0 else "":
        send(env, path, recipient(path, "warm"), args.warmup, args)
        settle(env)


def one_round(env: SimpleNamespace, rnd: int, args: argparse.Namespace) -> list[Run]:
    """(a)(b)(c) in rotated order; again (a bounded number of times) if others were busy."""
    shift = (rnd - 1) % len(PATHS)
    order = PATHS[shift:] + PATHS[:shift]  # so that no path always runs first
    for attempt in range(1, ROUND_ATTEMPTS + 1):
        runs = [measure(env, path, rnd, order, recipient(path, f"{rnd}-{attempt}"), args)
                for path in order]
        for run in runs:
            run.attempt = attempt
        worst = max(run.others for run in runs)
        if worst <= MAX_OTHERS:
            break
        print(f"round {rnd}: other processes took {worst:.0%} of the cores in a run"
              f"{'; measuring it again' if attempt < ROUND_ATTEMPTS else ''}", file=sys.stderr)
    return sorted(runs, key=lambda run: run.path)


def rounds(env: SimpleNamespace, args: argparse.Namespace) -> list[Run]:
    return [run for rnd in range(1, args.rounds + 1) for run in one_round(env, rnd, args)]


def peer_processes(env: SimpleNamespace) -> list[int]:
    """Dovecot's and Postfix's processes, masters first."""
    masters = [env.dovecot.master_pid, read_pid(env.postfix.pid_file)]
    return [p for m in masters if m for p in (m, *descendants(m))]


def profile(env: SimpleNamespace, root: Path, args: argparse.Namespace) -> dict | None:
    """One (a) run with py-spy attached to mailgate, which has a CPU to itself meanwhile."""
    spy = probes.PySpy(env.mailgate.pid, root / "py-spy")
    if not spy.available():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    with probes.isolated(env.mailgate.pid, lambda: peer_processes(env)) as alone, spy:
        run = measure(env, "a", 0, "a", recipient("a", "profile"), args)
    return {"run": run, "alone": alone, **spy.tally()}


def delivery_relays(env: SimpleNamespace) -> dict[str, int]:
    """How mailgate delivered, from its log: the fallback must not flatter the numbers."""
    text = env.mailgate.log_text()
    return {relay: len(re.findall(rf"relay={relay}\b[^\n]*status=sent", text))
            for relay in ("dovecot", "maildir")}


@contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    """A temp dir for the peers; removed afterwards unless `keep` or the run failed."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # Dovecot's lmtp runs as vmail and must reach ROOT/mail
    try:
        yield root
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch("mailgate-bench-", args.keep) as root:
        facts = probes.describe(root)  # before mailgate starts: the revision it runs
        with peers(root, args) as env:
            warm_up(env, args)
            runs = rounds(env, args)
            prof = profile(env, root, args) if args.profile else None
            rss = probes.peak_rss_kib(env.mailgate.pid)
            relays = delivery_relays(env)
        args.output.write_text(report.render(facts, args, runs, rss, relays, prof, args.output))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
