#!/usr/bin/env python3
"""One large message among small ones: what it costs the small ones, and mailgate's memory.

While S sessions send small messages back to back (one recipient each), one session sends a
message of SIZE bytes. Reported per round and path (Dovecot over LMTP; the maildir fallback
with Dovecot stopped): the small messages' time from the end of their DATA to our 250 (p50, p99,
max) while the large one was in flight, and their p99 in the second before it (the machine's own
noise), the large one's times, the event loop's lag p99 (mailgate's metric), and mailgate's peak
RSS (VmHWM) against the target 2 x SIZE + 100 MiB. Issue 6's bar: small p99 under 100 ms, peak
RSS within the target. Dovecot runs with mail_fsync = never (the test config); the fallback
fsyncs every file, and on ext4 a small file's fsync can wait for the large file's data.
Prints a Markdown table; --keep keeps logs and maildirs.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import multiprocessing
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import base_config, merge  # noqa: E402
from faultkit import Raw, big_body, message  # noqa: E402
from peers import Dovecot, Mailgate  # noqa: E402
import probes  # noqa: E402

MiB = 1 << 20
USERS = ["small@example.test", "large@example.test"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=30 * MiB, help="the large message, bytes")
    p.add_argument("--sessions", type=int, default=4, help="sessions sending small messages")
    p.add_argument("--small", type=int, default=2048, help="small message size, bytes")
    p.add_argument("--rounds", type=int, default=3, help="rounds per path (default 3)")
    p.add_argument("--paths", default="dovecot,fallback", help="dovecot, fallback or both")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    return p.parse_args(argv)


@contextmanager
def peers(root: Path, args: argparse.Namespace, path: str) -> Iterator[Mailgate]:
    """A fresh Dovecot and mailgate for one round (peak RSS is per process)."""
    dovecot = Dovecot(root / "dovecot", USERS)
    dovecot.start()
    gate = Mailgate(root / "gate", merge(base_config(root / "gate", dovecot),
                                         {"limits": {"message_size": 2 * args.size}}))
    try:
        gate.start()
        if path == "fallback":
            dovecot.stop()
        yield gate
    finally:
        gate.stop()
        dovecot.stop()


def transaction(session: Raw, rcpt: str, wire: bytes) -> float:
    """One transaction on an open session; seconds from the end of DATA to the 250."""
    session.sock.sendall(f"MAIL FROM:<bench@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    for expected in (250, 250, 354):
        code, text = session.reply()
        assert code == expected, (code, text)
    session.sock.sendall(wire[:-3])
    started = time.perf_counter()
    session.sock.sendall(wire[-3:])
    code, text = session.reply()
    assert code == 250, (code, text)
    return time.perf_counter() - started


def open_session(gate: Mailgate) -> Raw:
    session = Raw(gate.smtp, timeout=300)
    # The final ".\r\n" goes alone (the timer starts there): without NODELAY, Nagle holds it
    # for the peer's delayed ACK, 40 ms that are the client's, not mailgate's.
    session.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert session.reply()[0] == 220 and session.command("EHLO bench.test")[0] == 250
    return session


def small_sender(gate: Mailgate, wire: bytes, stop, out) -> None:
    """Put [(finished at, seconds)] for the small messages sent until `stop` on `out`. A process
    of its own: threads of one client would time each other's GIL waits, not mailgate."""
    session, times = open_session(gate), []
    while not stop.is_set():
        seconds = transaction(session, USERS[0], wire)
        times.append((time.perf_counter(), seconds))  # CLOCK_MONOTONIC: one clock for all
    session.close()
    out.put(times)


def lag_p99(gate: Mailgate) -> float:
    """The event loop lag's p99 (upper bucket bound) since mailgate started."""
    host, port = gate.address("metrics", "listen")
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    buckets = [(float(line.split('le="')[1].split('"')[0]), float(line.split()[-1]))
               for line in text.splitlines()
               if line.startswith("mailgate_event_loop_lag_seconds_bucket")]
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= 0.99 * total)


def one_round(root: Path, args: argparse.Namespace, path: str, large: bytes, small: bytes) -> dict:
    with peers(root, args, path) as gate:
        for _ in range(20):  # warm: pool, caches, the parser's first imports
            transaction(open_session(gate), USERS[0], small)
        mp = multiprocessing.get_context("fork")
        stop, out = mp.Event(), mp.Queue()
        senders = [mp.Process(target=small_sender, args=(gate, small, stop, out))
                   for _ in range(args.sessions)]
        for sender in senders:
            sender.start()
        time.sleep(1)  # the small ones' steady state before the large one starts
        session = open_session(gate)
        began = time.perf_counter()
        large_seconds = transaction(session, USERS[1], large)
        ended = time.perf_counter()
        session.close()
        time.sleep(0.5)
        stop.set()
        results = [out.get(timeout=60) for _ in senders]
        for sender in senders:
            sender.join(60)
        during = sorted(s for out in results for done, s in out if began <= done - s <= ended)
        before = sorted(s for out in results for done, s in out if done < began)
        rss = probes.peak_rss_kib(gate.pid) / 1024
        lag = lag_p99(gate)
    return {"path": path, "small_n": len(during), "p50": median(during) if during else 0,
            "p99": during[int(0.99 * (len(during) - 1))] if during else 0,
            "max": during[-1] if during else 0, "before": before[int(0.99 * (len(before) - 1))],
            "upload": ended - began - large_seconds,
            "large": large_seconds, "rss": rss, "lag": lag}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    target = 2 * args.size / MiB + 100
    lines = [f"Large message {args.size / MiB:.0f} MiB, {args.sessions} sessions of "
             f"{args.small} B messages; RSS target {target:.0f} MiB; small p99 target 100 ms",
             "", "| path | small msgs during | p50 ms | p99 ms | max ms | p99 ms before | "
             "large: upload s | large: DATA end to 250 s | loop lag p99 ms | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['small_n']} | {1000 * r['p50']:.1f} | "
                     f"{1000 * r['p99']:.1f} | {1000 * r['max']:.1f} | "
                     f"{1000 * r['before']:.1f} | {r['upload']:.2f} | "
                     f"{r['large']:.2f} | {1000 * r['lag']:.0f} | {r['rss']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mg-bench-large-"))
    root.chmod(0o755)
    large = message("large", USERS[1], big_body(args.size, dots_every=1000)) + b".\r\n"
    large = large.replace(b"\r\n.Q", b"\r\n..Q")  # the wire form: those lines are stuffed
    small = message("small", USERS[0], big_body(args.small)) + b".\r\n"
    rows = []
    try:
        for path in args.paths.split(","):
            for rnd in range(args.rounds):
                rows.append(one_round(root / f"{path}-{rnd}", args, path, large, small))
                print(table(rows[-1:], args).splitlines()[-1], flush=True)
        print()
        print(table(rows, args))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
