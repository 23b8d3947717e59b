#!/usr/bin/env python3
"""What one `Auth.check` costs in machine instructions, counted by valgrind: a figure the host's
speed does not move.

bench/auth.py measures the filter end to end, in messages per second against Dovecot direct;
on a shared 2-core host its figures swing by a third between runs. This counts instead: the
instructions (callgrind's Ir) a Python process executes to check N distinct DKIM-signed 2 KB
messages with a warm DNS cache (the load bench/auth.py sends, one signature per message,
relaxed/simple, RSA-2048, SPF, DKIM and DMARC records on the loopback DNS server of
tests/dnsserver.py), minus the same process checking none. The difference over N is the filter's
cost per message, split by the library it is spent in. Two runs of the same build agree within
a fraction of a per cent. --baseline DIR counts another checkout (a git worktree of an older
commit) the same way, so a change is judged by what it saves, not by the host's mood.
Instructions are not time: RSA's are cheaper per instruction than the interpreter's.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import probes  # noqa: E402

SECTION_START, SECTION_END = "<!-- bench/auth_cost.py -->", "<!-- /bench/auth_cost.py -->"
WARMUP = 50
SIGNER = "sender.bench.example"
# Where the instructions go, by what callgrind names: the object file, or for code inlined
# into another, only the C source
PLACES = (("_rust.abi3.so", "RSA (`cryptography`'s OpenSSL)"),
          ("libcrypto", "hashing (hashlib: OpenSSL)"), ("_sre/", "regular expressions"),
          ("libpython", "Python interpreter"), ("/Python-3", "Python interpreter"),  # inlined
          ("libc.so", "C library"))

# The process valgrind runs: the filter of the checkout on PYTHONPATH, checking the messages.
CHILD = r"""
import asyncio, pickle, sys
sys.path.insert(0, sys.argv[3])
from dnsserver import DnsServer
from mailgate import config as C
from mailgate.filters.auth import Auth
from mailgate.message import Client, Envelope, Message
from mailgate.resources import Resources

record, raws, signer, warmup = pickle.load(open(sys.argv[1], "rb"))
count = int(sys.argv[2])
dns = DnsServer().start()
dns.txt(signer, "v=spf1 ip4:127.0.0.1 -all")
dns.txt(f"bench._domainkey.{signer}", record)
dns.txt(f"_dmarc.{signer}", "v=DMARC1; p=reject")
config = C.Config(hostname="mx.example.test", domains=("example.test",),
                  dns=C.Dns(nameservers=(dns.address,)))


async def main():
    resources = Resources(config)
    auth = Auth(config, resources)
    env = Envelope("BENCH", f"bounce@{signer}", ("bench@example.test",),
                   Client("127.0.0.1", helo=f"mail.{signer}"), 0.0)
    for raw in raws[:warmup]:          # the DNS cache warm, every code path run once
        result = await auth.check(Message(env, raw))
    assert b"dkim=pass" in result.headers[0] and b"dmarc=pass" in result.headers[0], result
    for raw in raws[warmup:warmup + count]:
        await auth.check(Message(env, raw))
    await resources.close()

asyncio.run(main())
dns.stop()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=300, help="messages counted (default 300)")
    p.add_argument("--size", type=int, default=2048, help="message bytes (default 2048)")
    p.add_argument("--baseline", type=Path, help="another checkout of mailgate, counted alike")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    return p.parse_args(argv)


def messages(count: int, size: int) -> tuple[str, list[bytes]]:
    """Distinct signed messages (a Message-ID each), as bench/auth.py's load, and the key record."""
    import dkim
    from dnsserver import dkim_key
    key = dkim_key()
    out = []
    for n in range(count):
        head = (f"From: Bench <news@{SIGNER}>\r\nTo: <bench@example.test>\r\n"
                f"Subject: auth benchmark\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                f"Message-ID: <bench-{n}@{SIGNER}>\r\n\r\n").encode()
        line = b"x" * 70 + b"\r\n"
        data = head + line * max(1, (size - len(head) - 500) // len(line))
        out.append(dkim.sign(data, b"bench", SIGNER.encode(), key.pem,
                             include_headers=[b"from", b"to", b"subject", b"date",
                                              b"message-id"]) + data)
    return key.record, out


def count(checkout: Path, load: Path, child: Path, messages: int, out: Path) -> None:
    """callgrind's output for the child checking `messages` of the load."""
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                           sys.executable, str(child), str(load), str(messages),
                           str(REPO / "tests")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"valgrind ({checkout}, {messages}): {done.stderr[-2000:]}")


def by_place(out: Path) -> Counter:
    """Instructions by PLACES, the rest under "other"."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)],
                          capture_output=True, text=True, check=True).stdout
    places = Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(\S.*)", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        where = m[2]
        place = next((name for key, name in PLACES if key in where), "other")
        places[place] += int(m[1].replace(",", ""))
    return places


def measure(checkout: Path, root: Path, load: Path, child: Path, n: int) -> Counter:
    """Instructions per check, by place (and "total")."""
    name = re.sub(r"\W", "_", str(checkout.resolve()))
    outs = [root / f"{name}-{k}.out" for k in (0, n)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: count(checkout, load, child, *args), zip((0, n), outs)))
    empty, full = by_place(outs[0]), by_place(outs[1])
    per = Counter({place: (full[place] - empty[place]) / n for place in set(empty) | set(full)})
    per["total"] = sum(per.values())
    return per


def section(facts: dict, args: argparse.Namespace, rows: list[tuple[str, Counter]]) -> str:
    places = sorted({p for _, per in rows for p in per if p != "total"},
                    key=lambda p: -rows[0][1][p])
    lines = [SECTION_START, "### Auth filter: instructions per message (valgrind)", "",
             "Written by `bench/auth_cost.py` (its docstring says what it counts and why); "
             "kept when `bench/throughput.py` rewrites the rest.", "",
             f"- date: {facts['date']}; Python {facts['python']}; command: "
             f"`python3 bench/auth_cost.py {' '.join(sys.argv[1:])}`",
             f"- load: {args.messages} distinct DKIM-signed messages of {args.size} bytes "
             "(RSA-2048, relaxed/simple), SPF, DKIM and DMARC passing, the DNS cache warm "
             f"({WARMUP} messages first); `Auth.check` called in-process.", "",
             "| build | instructions per message | " + " | ".join(places) + " |",
             "|---|---|" + "---|" * len(places)]
    for build, per in rows:
        lines.append(f"| {build} | **{per['total'] / 1e6:.2f} M** | "
                     + " | ".join(f"{per[p] / 1e3:.0f} k ({100 * per[p] / per['total']:.0f} %)"
                                  for p in places) + " |")
    if len(rows) == 2:
        lines += ["", f"{rows[0][0]} executes {rows[0][1]['total'] / rows[1][1]['total']:.2f} × "
                  f"the instructions of {rows[1][0]} per message."]
    return "\n".join(lines + ["", SECTION_END])


def write_section(path: Path, section: str) -> None:
    probes.write_notes_section(path, section, SECTION_START, SECTION_END)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        print("valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-cost-"))
    try:
        record, raws = messages(WARMUP + args.messages, args.size)
        load, child = root / "load.pickle", root / "child.py"
        load.write_bytes(pickle.dumps((record, raws, SIGNER, WARMUP)))
        child.write_text(CHILD)
        checkouts = [REPO] + ([args.baseline] if args.baseline else [])
        rows = []
        for checkout in checkouts:
            per = measure(checkout, root, load, child, args.messages)
            rows.append((f"{probes.revision(checkout)}" + (" (this checkout)" if checkout == REPO
                                                   else " (--baseline)"), per))
            print(f"{checkout}: {per['total']:.0f} instructions per message", file=sys.stderr)
        write_section(args.output, section(probes.describe(root), args, rows))
        print(f"wrote {args.output}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
