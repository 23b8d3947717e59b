#!/usr/bin/env python3
"""Throughput of the full policy chain against the empty chain, measured in one run.

Two mailgate processes in front of the same Dovecot:
  (e) the empty chain (what bench/throughput.py measures as (a));
  (f) bounce -> blocklist -> rules -> vacation on the SQLite store.
The same load goes to both: smtp-source, N messages of SIZE bytes, S sessions, R recipients per
message (bench-TAG, 2bench-TAG, ... at example.test). For (f), the first recipient forwards to
an external address with a local copy (through the relay: Postfix's smtp-sink on loopback), the
second is on vacation (one reply per sender, then the store remembers), the third has a
blocklist pattern that does not match; the rest have no rule. A run is timed from the start of
smtp-source until every recipient's maildir holds all N messages. The paths alternate, order
rotated per round; the ratio of the medians is written into BENCHMARKS.md (target: >= 0.8).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median
from types import SimpleNamespace
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from peers import Dovecot, Mailgate, free_port, port_open, wait_until  # noqa: E402
import probes  # noqa: E402

DOMAIN, SENDER, FRIEND = "example.test", "bench@client.test", "friend@elsewhere.test"
TARGET = 0.8
FULL_CHAIN = "bounce,blocklist,rules,vacation"
SECTION_START, SECTION_END = "<!-- bench/policy_chain.py -->", "<!-- /bench/policy_chain.py -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=500, help="per run (default 500)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (e)(f) (default 3)")
    p.add_argument("--sessions", type=int, default=4, help="smtp-source -s (default 4)")
    p.add_argument("--recipients", type=int, default=5, help="per message, >= 3 (default 5)")
    p.add_argument("--size", type=int, default=2048, help="smtp-source -l, bytes (default 2048)")
    p.add_argument("--warmup", type=int, default=100, help="messages per path first (default 100)")
    p.add_argument("--filters", default=FULL_CHAIN, help=f"chain of (f) (default {FULL_CHAIN})")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if min(args.messages, args.rounds, args.sessions, args.size) < 1 or args.recipients < 3:
        p.error("--messages, --rounds, --sessions, --size must be positive, --recipients >= 3")
    return args


def recipients(path: str, tag: str, count: int) -> list[str]:
    """What `smtp-source -r COUNT -t bench-PATH-TAG@` sends to: that, then 2..COUNT prefixed."""
    local = f"bench-{path}-{tag}"
    return [f"{n}{local}@{DOMAIN}" for n in ["", *range(2, count + 1)]]


def tags(rounds: int) -> list[str]:
    return ["warm", *map(str, range(1, rounds + 1))]


def gate_config(root: Path, dovecot: Dovecot, filters: list[str], relay: str) -> dict:
    return {"hostname": "mx.example.test", "domains": [DOMAIN], "data_dir": str(root / "data"),
            "listen": {"smtp": f"127.0.0.1:{free_port()}", "lmtp": "", "lookup": ""},
            "delivery": {"lmtp": f"127.0.0.1:{dovecot.lmtp_port}",
                         "maildir": dovecot.maildir_template},
            "metrics": {"listen": ""}, "health": {"listen": ""}, "log": {"level": "info"},
            "pipeline": {"filters": filters}, "relay": {"smtp": relay}}


def set_rules(gate: Mailgate, args: argparse.Namespace) -> None:
    """Through the store interface, as `mailgate rule set` / `block add` write them."""
    from mailgate.config import load
    from mailgate.store import Rule, open_store

    async def write() -> None:
        store = open_store(load(str(gate.config_path), environ={}))
        try:
            for tag in tags(args.rounds):
                first, second, third = recipients("f", tag, args.recipients)[:3]
                await store.set_rule(Rule(first, forward=(FRIEND,), keep_copy=True))
                await store.set_rule(Rule(second, vacation=True))
                await store.add_block(third, "*@spam.example")
        finally:
            await store.close()
    asyncio.run(write())


@contextmanager
def peers(root: Path, args: argparse.Namespace) -> Iterator[SimpleNamespace]:
    with ExitStack() as stack:
        users = [r for path in "ef" for tag in tags(args.rounds)
                 for r in recipients(path, tag, args.recipients)]
        dovecot = Dovecot(root, users)
        stack.callback(dovecot.stop)
        dovecot.start()
        sink_port = free_port()
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "64"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        stack.callback(lambda: (sink.terminate(), sink.wait(10)))
        wait_until(lambda: port_open(sink_port), 10, what="smtp-sink listening")
        relay = f"127.0.0.1:{sink_port}"
        empty = Mailgate(root / "empty", gate_config(root / "empty", dovecot, [], relay))
        full = Mailgate(root / "full", gate_config(root / "full", dovecot,
                                                   args.filters.split(","), relay))
        set_rules(full, args)
        for gate in (empty, full):
            stack.callback(gate.stop)
            gate.start()
        yield SimpleNamespace(dovecot=dovecot, gates={"e": empty, "f": full})


def count(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))


def send(env: SimpleNamespace, path: str, tag: str, messages: int,
         args: argparse.Namespace) -> float:
    """Seconds until smtp-source exited and every recipient's maildir held all messages."""
    budget = 60 + 0.2 * messages * args.recipients
    port = env.gates[path].smtp[1]
    maildirs = [env.dovecot.maildir(r) for r in recipients(path, tag, args.recipients)]
    cmd = ["smtp-source", "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size),
           "-r", str(args.recipients), "-f", SENDER, "-t", f"bench-{path}-{tag}@{DOMAIN}",
           "-M", "client.test", f"127.0.0.1:{port}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    wait_until(lambda: all(count(m) >= messages for m in maildirs), budget, interval=0.02,
               what=f"{messages} messages in each of {len(maildirs)} maildirs")
    return time.monotonic() - start


def measure(env: SimpleNamespace, path: str, tag: str, args: argparse.Namespace) -> dict:
    pid = env.gates[path].pid
    cpu0, stat0 = sum(probes.process_cpu(pid)), probes.system_ticks()
    seconds = send(env, path, tag, args.messages, args)
    cpu1, stat1 = sum(probes.process_cpu(pid)), probes.system_ticks()
    run = {"path": path, "round": tag, "rate": args.messages / seconds,
           "cpu_ms": 1000 * (cpu1 - cpu0) / args.messages,
           "busy": probes.busy_share(stat0, stat1)}
    print(f"round {tag} ({path}): {run['rate']:6.1f} msg/s, mailgate {run['cpu_ms']:.2f} ms "
          f"CPU/msg, cores busy {run['busy']:.0%}", file=sys.stderr)
    time.sleep(1.0)  # let Dovecot's processes finish logging before the next run
    return run


def report(args: argparse.Namespace, runs: list[dict], forwards: int, facts: dict) -> str:
    by = {p: [r for r in runs if r["path"] == p] for p in "ef"}
    rate = {p: median(r["rate"] for r in by[p]) for p in "ef"}
    ratio = rate["f"] / rate["e"]
    lines = [SECTION_START, "### Policy chain: full chain vs empty chain", "",
             f"Written by `bench/policy_chain.py` (its docstring says what it measures); "
             f"{facts['date']}, {facts['machine']}, mailgate {facts['mailgate']}.", "",
             f"- load: `smtp-source -s {args.sessions} -m {args.messages} -l {args.size} "
             f"-r {args.recipients}`; (f) = `{args.filters}` on SQLite, rules for 3 of "
             f"{args.recipients} recipients (forward + copy, vacation, blocklist pattern).",
             f"- forwards mailgate handed to the relay (warm-up included): {forwards}; cores "
             f"busy {min(r['busy'] for r in runs):.0%}–{max(r['busy'] for r in runs):.0%}.", "",
             "| round | (e) empty msg/s | (f) full msg/s | f/e | CPU ms/msg e / f |",
             "|---|---|---|---|---|"]
    for e, f in zip(by["e"], by["f"]):
        lines.append(f"| {e['round']} | {e['rate']:.0f} | {f['rate']:.0f} | "
                     f"{f['rate'] / e['rate']:.2f} | {e['cpu_ms']:.2f} / {f['cpu_ms']:.2f} |")
    lines += [f"| **median** | **{rate['e']:.0f}** | **{rate['f']:.0f}** | **{ratio:.2f}** | |",
              "", f"Target f/e ≥ {TARGET}: **{'met' if ratio >= TARGET else 'missed'}**.",
              SECTION_END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    probes.write_notes_section(path, section, SECTION_START, SECTION_END)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-policy-"))
    root.chmod(0o755)  # Dovecot's lmtp runs as vmail and must reach ROOT/mail
    try:
        facts = probes.describe(root)
        with peers(root, args) as env:
            for path in "ef":
                send(env, path, "warm", args.warmup, args)
            runs = []
            for rnd in range(1, args.rounds + 1):
                order = "ef" if rnd % 2 else "fe"
                runs += [measure(env, path, str(rnd), args) for path in order]
            forwards = len(re.findall(r"to <friend@elsewhere\.test>: sent",
                                      env.gates["f"].log_text()))
        write_section(args.output, report(args, runs, forwards, facts))
        print(f"wrote {args.output}", file=sys.stderr)
    except BaseException:
        print(f"kept {root}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
