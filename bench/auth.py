#!/usr/bin/env python3
"""What the `auth` filter costs: mailgate with auth vs the empty chain vs Dovecot direct, one run.

The same load goes into the same Dovecot by three paths: (u) mailgate with `filters = ["auth"]`,
(e) mailgate with the empty chain, (d) Dovecot LMTP directly. The load is DKIM-signed 2 KB
messages from several sender domains, each with SPF, DKIM and DMARC records on a loopback DNS
server (tests/dnsserver.py): one smtp-source per domain, the sessions shared out among them.
The auth mailgate does not trust 127.0.0.1 (no "local mail" shortcut): SPF runs on every
message, against records that permit 127.0.0.1. The cache is warm after the warm-up, as in
production where the same senders repeat. Each run is checked: a sample of delivered messages
must carry spf=pass, dkim=pass and dmarc=pass. Results replace the "## Auth filter" section of
BENCHMARKS.md; --profile adds where the auth mailgate's CPU goes (py-spy). --baseline DIR adds
path (o): the auth mailgate from another checkout (a git worktree of an older commit), so that
two builds are compared in the same rounds, on the same host in the same state.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median
from types import SimpleNamespace
from typing import Iterator

import dkim

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dnsserver import DnsServer, dkim_key  # noqa: E402
from peers import Dovecot, Mailgate, free_port, wait_until  # noqa: E402
import probes  # noqa: E402
from throughput import Run, count_messages, scratch, set_fsync, wait_quiet  # noqa: E402

DOMAIN = "example.test"
PATHS = "ued"   # and "o" with --baseline
TARGET = 0.7
SECTION = "## Auth filter"
SETTLE_SECONDS = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1000, help="per run (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (u)(e)(d) (default 3)")
    p.add_argument("--sessions", type=int, default=4, help="in all, shared out (default 4)")
    p.add_argument("--domains", type=int, default=4, help="sender domains (default 4)")
    p.add_argument("--size", type=int, default=2048, help="message bytes (default 2048)")
    p.add_argument("--warmup", type=int, default=300, help="messages per path first (300)")
    p.add_argument("--reuse", action="store_true", help="smtp-source -d: each session keeps "
                   "its connection for the next message, as Postfix's connection cache does "
                   "when mail queues up (default: a new connection per message)")
    p.add_argument("--fsync", choices=("optimized", "never"), default="optimized")
    p.add_argument("--profile", action="store_true", help="one more (u) run under py-spy")
    p.add_argument("--baseline", type=Path, help="another checkout of mailgate (say, a git "
                   "worktree of an older commit): its auth runs as path (o) in the same rounds")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    if args.sessions % args.domains or args.messages % args.domains:
        p.error("--sessions and --messages must be multiples of --domains")
    return args


# ---------------------------------------------------------------- the load

def sender_domain(k: int) -> str:
    return f"sender{k}.bench.example"


def publish(dns: DnsServer, domains: int) -> list[bytes]:
    """SPF, DKIM and DMARC records for each sender domain; its private key."""
    keys = []
    for k in range(domains):
        key, domain = dkim_key(), sender_domain(k)
        dns.txt(domain, "v=spf1 ip4:127.0.0.1 -all")
        dns.txt(f"bench._domainkey.{domain}", key.record)
        dns.txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")
        keys.append(key.pem)
    return keys


def message_files(root: Path, keys: list[bytes], size: int) -> list[Path]:
    """One signed message per domain, LF lines (smtp-source -F sends them with CRLF)."""
    files = []
    for k, pem in enumerate(keys):
        head = (f"From: Bench <news@{sender_domain(k)}>\r\nTo: <bench@{DOMAIN}>\r\n"
                f"Subject: auth benchmark {k}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                f"Message-ID: <bench-{k}@{sender_domain(k)}>\r\n\r\n").encode()
        line = b"x" * 70 + b"\r\n"
        data = head + line * max(1, (size - len(head) - 500) // len(line))
        signed = dkim.sign(data, b"bench", sender_domain(k).encode(), pem,
                           include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        files.append(root / f"message-{k}.eml")
        files[-1].write_bytes((signed + data).replace(b"\r\n", b"\n"))
    return files


def mailgate_config(root: Path, dovecot: Dovecot, dns: DnsServer, auth: bool) -> dict:
    """As bench/throughput.py runs it; with auth: the filter, our DNS, no trusted peers."""
    config = {"hostname": "mx.example.test", "domains": [DOMAIN], "data_dir": str(root / "data"),
              "listen": {"smtp": f"127.0.0.1:{free_port()}", "lmtp": "", "lookup": ""},
              "delivery": {"lmtp": f"127.0.0.1:{dovecot.lmtp_port}",
                           "maildir": dovecot.maildir_template},
              "metrics": {"listen": f"127.0.0.1:{free_port()}"},
              "health": {"listen": f"127.0.0.1:{free_port()}"}, "log": {"level": "info"}}
    if auth:
        config["listen"]["trusted_networks"] = []
        config["pipeline"] = {"filters": ["auth"]}
        config["dns"] = {"nameservers": [dns.address]}
    return config


def paths(args: argparse.Namespace) -> str:
    return PATHS + ("o" if args.baseline else "")


def recipients(args: argparse.Namespace) -> list[str]:
    tags = ["warm", "profile", *range(1, args.rounds + 1)]
    return [f"bench-{path}-{tag}@{DOMAIN}" for tag in tags for path in paths(args)]


@contextmanager
def peers(root: Path, args: argparse.Namespace) -> Iterator[SimpleNamespace]:
    with ExitStack() as stack:
        dns = DnsServer().start()
        stack.callback(dns.stop)
        keys = publish(dns, args.domains)
        dovecot = Dovecot(root, recipients(args))
        set_fsync(dovecot.conf, args.fsync)
        stack.callback(dovecot.stop)
        dovecot.start()
        gates = {}
        gated = [(path, auth) for path, auth in (("u", True), ("e", False), ("o", True))
                 if path in paths(args)]
        for path, auth in gated:
            env = {"PYTHONPATH": str(args.baseline.resolve())} if path == "o" else {}
            gates[path] = Mailgate(root / f"mailgate-{path}",
                                   mailgate_config(root / f"mailgate-{path}", dovecot, dns, auth),
                                   env=env)
            stack.callback(gates[path].stop)
            gates[path].start()
        yield SimpleNamespace(dns=dns, dovecot=dovecot, gates=gates,
                              files=message_files(root, keys, args.size))


# ---------------------------------------------------------------- runs

def send(env: SimpleNamespace, path: str, rcpt: str, messages: int,
         args: argparse.Namespace) -> tuple[float, float]:
    """One smtp-source per sender domain at once; seconds until they exited, and until all
    `messages` were in rcpt's maildir."""
    port, lmtp = (env.dovecot.lmtp_port, True) if path == "d" else (env.gates[path].smtp[1], False)
    budget = 60 + 0.1 * messages
    started = time.monotonic()
    procs = [subprocess.Popen(
        ["smtp-source", *(["-L"] if lmtp else []), *(["-d"] if args.reuse else []),
         "-s", str(args.sessions // args.domains),
         "-m", str(messages // args.domains), "-F", str(eml), "-f", f"bounce@{sender_domain(k)}",
         "-t", rcpt, "-M", "client.test", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for k, eml in enumerate(env.files)]
    for proc in procs:
        _, err = proc.communicate(timeout=budget)
        if proc.returncode != 0:
            raise RuntimeError(f"smtp-source ({path}) exited {proc.returncode}: {err.strip()}")
    source_seconds = time.monotonic() - started
    maildir = env.dovecot.maildir(rcpt)
    wait_until(lambda: count_messages(maildir) >= messages, budget, interval=0.02,
               what=f"{messages} messages in {maildir}")
    return time.monotonic() - started, source_seconds


def verify(env: SimpleNamespace, path: str, rcpt: str) -> None:
    """The run measured what it claims: auth results on (u) all pass; none on the others."""
    maildir = env.dovecot.maildir(rcpt)
    sample = [p.read_bytes() for p in sorted((maildir / "new").iterdir())[:5]]
    for data in sample:
        header = re.search(rb"Authentication-Results: mx\.example\.test;(.*(?:\n[ \t].*)*)", data)
        if path in "uo" and (header is None or [w for w in (b"spf=pass", b"dkim=pass", b"dmarc=pass")
                                               if w not in header[1]]):
            raise RuntimeError(f"(u) delivered without passing auth results:\n{data[:1500]!r}")
        if path not in "uo" and header is not None:
            raise RuntimeError(f"({path}) has auth results it should not have")


def measure(env: SimpleNamespace, path: str, rnd: int, order: str, rcpt: str,
            args: argparse.Namespace) -> Run:
    pid = env.gates[path].pid if path in env.gates else None
    cpu0, stat0 = probes.process_cpu(pid) if pid else (0.0, 0.0), probes.system_ticks()
    seconds, source_seconds = send(env, path, rcpt, args.messages, args)
    cpu1, stat1 = probes.process_cpu(pid) if pid else (0.0, 0.0), probes.system_ticks()
    verify(env, path, rcpt)
    run = Run(path, rnd, order, args.messages, seconds, source_seconds,
              probes.busy_share(stat0, stat1), probes.busy_seconds(stat0, stat1),
              cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], 0.0)
    print(f"round {rnd} ({path}): {run.rate:6.1f} msg/s, cores busy {run.busy:.0%}, "
          f"mailgate cpu {run.gate_cpu:.2f} s", file=sys.stderr)
    time.sleep(SETTLE_SECONDS)  # Dovecot's processes finish logging
    wait_quiet()
    return run


def rounds(env: SimpleNamespace, args: argparse.Namespace) -> list[Run]:
    for path in paths(args) if args.warmup else "":
        send(env, path, f"bench-{path}-warm@{DOMAIN}", args.warmup, args)
    runs = []
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(paths(args))
        order = paths(args)[shift:] + paths(args)[:shift]
        runs += [measure(env, p, rnd, order, f"bench-{p}-{rnd}@{DOMAIN}", args) for p in order]
    return runs


def profile(env: SimpleNamespace, root: Path, args: argparse.Namespace) -> dict | None:
    spy = probes.PySpy(env.gates["u"].pid, root / "py-spy")
    if not spy.available():
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    with spy:
        run = measure(env, "u", 0, "u", f"bench-u-profile@{DOMAIN}", args)
    return {"run": run, **spy.tally()}


# ---------------------------------------------------------------- the report

def _cpu_ms(run: Run) -> float:
    return 1000 * run.gate_cpu / run.messages


def _machine_ms(run: Run) -> float:
    """CPU of all processes on the machine per message: smtp-source, mailgate, Dovecot, kernel."""
    return 1000 * run.machine_cpu / run.messages


def table(runs: list[Run]) -> list[str]:
    by = {p: [r for r in runs if r.path == p] for p in PATHS + "o"}
    base = bool(by["o"])   # --baseline: (o), u/o and its CPU as three more columns
    lines = ["| round | order | (u) auth | (e) empty | (d) direct | u/d | u/e "
             "| CPU ms/msg (u) | CPU ms/msg (e) | machine ms/msg u / e / d |"
             + (" (o) baseline | u/o | CPU ms/msg (o) |" if base else ""),
             "|---" * (13 if base else 10) + "|"]
    for u, e, d, *o in zip(by["u"], by["e"], by["d"], *([by["o"]] if base else [])):
        lines.append(f"| {u.round} | {u.order} | {u.rate:.0f} | {e.rate:.0f} | {d.rate:.0f} "
                     f"| {u.rate / d.rate:.2f} | {u.rate / e.rate:.2f} | {_cpu_ms(u):.2f} "
                     f"| {_cpu_ms(e):.2f} | {_machine_ms(u):.2f} / {_machine_ms(e):.2f} / "
                     f"{_machine_ms(d):.2f} |"
                     + (f" {o[0].rate:.0f} | {u.rate / o[0].rate:.2f} | {_cpu_ms(o[0]):.2f} |"
                        if o else ""))
    med = {p: median(r.rate for r in by[p]) for p in by if by[p]}
    cpu = {p: median(_cpu_ms(r) for r in by[p]) for p in by if by[p]}
    machine = {p: median(_machine_ms(r) for r in by[p]) for p in PATHS}
    lines.append(f"| **median** | | **{med['u']:.0f}** | **{med['e']:.0f}** | **{med['d']:.0f}** "
                 f"| **{med['u'] / med['d']:.2f}** | **{med['u'] / med['e']:.2f}** "
                 f"| **{cpu['u']:.2f}** | **{cpu['e']:.2f}** | **{machine['u']:.2f} / "
                 f"{machine['e']:.2f} / {machine['d']:.2f}** |"
                 + (f" **{med['o']:.0f}** | **{med['u'] / med['o']:.2f}** | **{cpu['o']:.2f}** |"
                    if base else ""))
    ratio = med["u"] / med["d"]
    cores = os.cpu_count() or 1
    ceiling = {p: 1000 * cores / machine[p] for p in "ue"}
    return lines + ["", f"Target: (u) ≥ {TARGET} × (d) by the medians: {ratio:.2f}, "
                    f"**{'met' if ratio >= TARGET else 'missed'}**. The filter's own cost is "
                    f"the CPU difference (u) − (e): {cpu['u'] - cpu['e']:.2f} ms per message.",
                    "", f"Ceiling: with all {cores} cores 100 % busy, the machine CPU per message "
                    f"allows (u) at most {ceiling['u']:.0f} msg/s = {ceiling['u'] / med['d']:.2f} "
                    f"× (d), and (e) {ceiling['e']:.0f} msg/s = {ceiling['e'] / med['d']:.2f} × "
                    "(d) (the cores were " + "/".join(f"{median(r.busy for r in by[p]):.0%}"
                                                       for p in PATHS)
                    + " busy in (u)/(e)/(d)).", ""]


def profile_lines(prof: dict | None) -> list[str]:
    if prof is None:
        return ["Not profiled in this run (`--profile` adds it).", ""]
    total, per_msg = prof["samples"] or 1, _cpu_ms(prof["run"])
    lines = [f"py-spy record --gil during one more (u) run ({prof['run'].messages} messages, "
             f"{per_msg:.2f} ms of mailgate CPU per message, shared out by samples; own time):",
             "", "| function | own % | ms/msg |", "|---|---|---|"]
    lines += [f"| `{frame}` | {100 * n / total:.1f} | {per_msg * n / total:.3f} |"
              for frame, n in prof["own"].most_common(20)]
    return lines + [""]


def section(facts: dict, args: argparse.Namespace, runs: list[Run], prof: dict | None) -> str:
    lines = [f"{SECTION}: mailgate + auth vs empty chain vs Dovecot direct", "",
             "Written by `bench/auth.py` (its docstring says what it measures); "
             "`bench/throughput.py` keeps this section.", "",
             f"- date: {facts['date']}; machine: {facts['machine']}",
             f"- versions: mailgate {facts['mailgate']}, Python {facts['python']}, "
             f"Dovecot {facts['dovecot']}", f"- command: `{facts['command']}`",
             f"- load: {args.messages} DKIM-signed (RSA-2048, relaxed/simple) messages of "
             f"{args.size} bytes per run from {args.domains} sender domains (SPF, DKIM, DMARC "
             f"p=reject on the loopback DNS server), {args.sessions} sessions in all, "
             f"{'each keeping its connection' if args.reuse else 'a new connection per message'}"
             f"; {args.warmup} warm-up messages per path first (the DNS "
             f"cache is warm); Dovecot `mail_fsync = {args.fsync}`; log level info.",
             "- the (u) mailgate trusts no peer, so SPF runs for every message; each run's "
             "delivered messages were checked for spf=pass, dkim=pass, dmarc=pass.",
             *([f"- (o): the same auth mailgate from {baseline(args.baseline)}, in the same "
                "rounds"] if args.baseline else []), "",
             "Rates in msg/s:", ""]
    lines += table(runs) + profile_lines(prof)
    return "\n".join(lines)


def baseline(checkout: Path) -> str:
    """The baseline checkout's commit, as the report names it."""
    commit = probes.revision(checkout)
    return f"commit {commit}" if commit else f"`{checkout}`"


def write(path: Path, text: str) -> None:
    """Replace our section of BENCHMARKS.md (or put it before the notes)."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + 1)
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    else:
        notes = old.find("\n## Notes")
        new = (old[:notes + 1] + text + old[notes + 1:]) if notes >= 0 else old + "\n" + text
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch("mailgate-bench-auth-", args.keep) as root:
        facts = probes.describe(root)
        facts["command"] = "python3 bench/auth.py " + " ".join(argv or sys.argv[1:])
        with peers(root, args) as env:
            runs = rounds(env, args)
            prof = profile(env, root, args) if args.profile else None
        write(args.output, section(facts, args, runs, prof))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
