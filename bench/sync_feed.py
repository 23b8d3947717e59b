#!/usr/bin/env python3
"""The SES feed's throughput: mailgate sync against the old workers' design, in one run.

The same load, N stored messages (SES-style headers, one recipient each) spread over Q domains,
each with its own bucket and queue, announced by real S3 -> SQS notifications in moto (server
mode, one process for both paths), goes into the same Dovecot:
  (s) mailgate sync --once  -> mailgate serve (SMTP, XFEED) -> Dovecot LMTP      (what we ship,
      processed = "tag": one more request per message than the loop makes)
  (k) the same with processed = "keep": the loop's requests (receive, get, delete), no more
  (l) one sequential loop over the queues: receive 10 -> for each: get object, LMTP to Dovecot,
      delete (the design of the workers sync replaces; one reused LMTP connection, favouring it)
Objects are stored before the clock starts. A run is timed until every message is in the maildir
and (for (s)) sync has exited, its start included. Paths alternate per round.

moto spends CPU where AWS spends network time (a receive costs about 1 ms of moto CPU per message
in the queue), so moto's CPU per message is reported too; --latency adds a delay to every request
(a proxy in front of moto) to stand for the network between a host and AWS. Results go to
BENCHMARKS.md's "## SES feed" section.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Dovecot, Mailgate, Moto, free_port, wait_until  # noqa: E402
from probes import process_cpu  # noqa: E402

DOMAIN, SECTION, NOTES = "example.test", "## SES feed", "## Notes"
TARGET = 5.0
PROCESSED = {"s": "tag", "k": "keep"}   # the sync paths and their sync.processed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1000, help="per run (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (s)(l) (default 3)")
    p.add_argument("--queues", type=int, default=4, help="domains, each with a bucket and a "
                   "queue (default 4)")
    p.add_argument("--latency", type=float, nargs="+", default=[0.0], metavar="MS",
                   help="milliseconds added to every request to moto; each value gets its own "
                        "rounds (default 0)")
    p.add_argument("--concurrency", type=int, default=8, help="sync.concurrency (default 8)")
    p.add_argument("--paths", default="skl", help="which of s, k, l to run (default skl)")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args()
    if set(args.paths) - set("skl") or "l" not in args.paths or not set(args.paths) & set("sk"):
        p.error("--paths: the loop (l) and at least one of s, k; nothing else")
    return args


def stored(mark: str, to: str) -> bytes:
    """About 2 KB, as SES stores it (its Received line names the recipient)."""
    head = (f"Return-Path: <bench@client.test>\r\n"
            f"Received: from client.test (client.test [192.0.2.7])\r\n"
            f" by inbound-smtp.us-east-1.amazonaws.com with SMTP id {mark[:12]}\r\n"
            f" for {to};\r\n Tue, 24 Nov 2026 10:00:00 +0000 (UTC)\r\n"
            f"X-SES-Spam-Verdict: PASS\r\nX-SES-Virus-Verdict: PASS\r\n"
            f"From: <bench@client.test>\r\nTo: <{to}>\r\nSubject: bench {mark}\r\n\r\n")
    return head.encode() + (b"y" * 76 + b"\r\n") * 22


def domain(k: int) -> str:
    return f"d{k}.{DOMAIN}"


def prepare(moto: Moto, run: str, args) -> tuple[list[str], list[str]]:
    """Per domain: a bucket and queue named run-K with notifications, its share of the objects
    stored; the queue names and the recipients."""
    s3, sqs = moto.client("s3"), moto.client("sqs")
    names, recipients = [f"{run}-{k}" for k in range(args.queues)], []
    for k, name in enumerate(names):
        s3.create_bucket(Bucket=name)
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
        recipients.append(f"{run}@{domain(k)}")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(
            Bucket=names[i % args.queues], Key=f"in/{i:06d}",
            Body=stored(uuid.uuid4().hex, recipients[i % args.queues])), range(args.messages)))
    urls = [sqs.get_queue_url(QueueName=n)["QueueUrl"] for n in names]
    wait_until(lambda: sum(int(sqs.get_queue_attributes(QueueUrl=u, AttributeNames=[
        "ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"])
        for u in urls) >= args.messages, 120, what=f"{args.messages} notifications")
    return names, recipients


def run_sync(gate: Mailgate, moto: Moto, endpoint: str, names: list[str], processed: str) -> None:
    env = {**moto.env, "PYTHONPATH": str(REPO), "MAILGATE_SYNC_QUEUES": ",".join(names),
           "MAILGATE_SYNC_BUCKETS": ",".join(names), "MAILGATE_SYNC_METRICS": "",
           "MAILGATE_SYNC_ENDPOINT_URL": endpoint, "MAILGATE_SYNC_PROCESSED": processed}
    proc = subprocess.run([sys.executable, "-m", "mailgate", "sync", "-c", str(gate.config_path),
                           "--once"], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"sync exited {proc.returncode}: {proc.stderr[-2000:]}")


def run_loop(moto: Moto, endpoint: str, names: list[str], dovecot: Dovecot) -> None:
    """The old workers: receive a batch, then get, deliver, delete one message at a time."""
    import boto3
    kwargs = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
    s3, sqs = boto3.client("s3", **kwargs), boto3.client("sqs", **kwargs)
    urls = [sqs.get_queue_url(QueueName=n)["QueueUrl"] for n in names]
    lmtp = smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=30)
    try:
        for _ in range(100_000):  # bounded; ends when a pass over the queues found nothing
            if not sum(deliver_batch(s3, sqs, url, lmtp) for url in urls):
                return
    finally:
        lmtp.quit()


def deliver_batch(s3, sqs, url: str, lmtp: smtplib.LMTP) -> int:
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                              WaitTimeSeconds=1).get("Messages", [])
    for message in got:
        for record in json.loads(message["Body"]).get("Records", []):
            key = urllib.parse.unquote_plus(record["s3"]["object"]["key"])
            data = s3.get_object(Bucket=record["s3"]["bucket"]["name"], Key=key)["Body"].read()
            to = data.split(b" for ", 1)[1].split(b";", 1)[0].decode()
            lmtp.sendmail("bench@client.test", [to], data)
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return len(got)


class Delay:
    """A TCP proxy in front of moto that delivers every chunk a client sends `ms` after it
    arrived, in order and pipelined, as a network does (a request sent in two writes is late by
    `ms` once, not twice)."""

    def __init__(self, target: int, ms: float):
        self.target, self.delay, self.port = target, ms / 1000, free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, up_writer, self.delay),
                             self._pipe(up_reader, writer, 0), return_exceptions=True)

    @staticmethod
    async def _pipe(src, dst, delay: float) -> None:
        loop, chunks = asyncio.get_running_loop(), asyncio.Queue()

        async def deliver() -> None:
            while (chunk := await chunks.get()) is not None:
                due, data = chunk
                await asyncio.sleep(max(due - loop.time(), 0))
                dst.write(data)
                await dst.drain()

        writer = asyncio.ensure_future(deliver())
        try:
            while data := await src.read(65536):
                chunks.put_nowait((loop.time() + delay, data))
        finally:
            chunks.put_nowait(None)
            await asyncio.gather(writer, return_exceptions=True)
            dst.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def measure(path: str, rnd: str, peers, args) -> tuple[float, float, float]:
    """(messages per second, moto's and the client's CPU ms per message). The client is the
    sync process (reaped child) or the loop's thread (the proxy's thread not counted)."""
    moto, gate, dovecot, endpoint = peers
    names, recipients = prepare(moto, f"feed-{path}-{rnd}", args)
    for to in recipients:
        dovecot.add_user(to)
    cpu = sum(process_cpu(moto.proc.pid))
    started = time.monotonic()
    if path in PROCESSED:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_sync(gate, moto, endpoint, names, PROCESSED[path])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    else:
        client = time.thread_time()
        run_loop(moto, endpoint, names, dovecot)
        client = time.thread_time() - client
    wait_until(lambda: sum(len(list((dovecot.maildir(to) / "new").iterdir()))
                           for to in recipients) >= args.messages,
               600, interval=0.05, what=f"{args.messages} messages delivered")
    seconds = time.monotonic() - started
    moto_ms = (sum(process_cpu(moto.proc.pid)) - cpu) * 1000 / args.messages
    return args.messages / seconds, moto_ms, client * 1000 / args.messages


Rates = dict[tuple[float, str], list[tuple[float, float, float]]]


def table(rates: Rates, latency: float, paths: str) -> tuple[list[str], dict[str, float]]:
    """Rows for one latency, the median row last; and each sync path's ratio of the medians."""
    runs = list(zip(*(rates[latency, p] for p in paths)))
    med = {p: statistics.median(r[0] for r in rates[latency, p]) for p in paths}
    syncs = [p for p in paths if p in PROCESSED]
    ratios = {p: med[p] / med["l"] for p in syncs}
    rows = []
    for i, run in enumerate(runs):
        by = dict(zip(paths, run))
        rows.append(f"| {latency:g} ms | {i + 1} | " + " | ".join(f"{by[p][0]:.0f}" for p in paths)
                    + " | " + " | ".join(f"{by[p][0] / by['l'][0]:.2f}" for p in syncs) + " | "
                    + " / ".join(f"{by[p][1]:.1f}" for p in paths) + " | "
                    + " / ".join(f"{by[p][2]:.1f}" for p in paths) + " |")
    rows.append(f"| {latency:g} ms | **median** | " + " | ".join(f"**{med[p]:.0f}**" for p in paths)
                + " | " + " | ".join(f"**{ratios[p]:.2f}**" for p in syncs) + " | | |")
    return rows, ratios


def section(rates: Rates, args, command: str) -> str:
    paths = args.paths
    syncs = [p for p in paths if p in PROCESSED]
    rows, verdicts = [], []
    for latency in args.latency:
        more, ratios = table(rates, latency, paths)
        rows += more
        verdicts.append(f"{latency:g} ms: " + ", ".join(
            f"{p}/l {r:.2f} **{'met' if r >= TARGET else 'not met'}**" for p, r in ratios.items()))
    names = {"s": '(s) sync, processed = "tag"', "k": '(k) sync, processed = "keep"',
             "l": "(l) loop"}
    return "\n".join([
        f"{SECTION}: sync vs the sequential receive–get–deliver–delete loop", "",
        "Written by `bench/sync_feed.py` (its docstring says what it measures); kept when "
        "`bench/throughput.py` rewrites the rest.", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        f"- load: {args.messages} messages of about 2 KB per run, one recipient each, over "
        f"{args.queues} domains (a bucket and a queue each), stored in moto S3 (server mode) and "
        "announced by real S3 -> SQS notifications; the same moto, Dovecot (`mail_fsync = "
        "never`) and machine for every path, paths alternating. Latency: added to every "
        "request to moto by a proxy (0 = moto as it is).",
        f"- (s) and (k): `mailgate sync --once`, `concurrency = {args.concurrency}`, into "
        "`mailgate serve` (empty filter chain), process start included; (s) tags each object "
        "(the default, one S3 request more per message than the loop), (k) does not "
        "(`processed = \"keep\"`: the loop's requests exactly). (l): one loop, "
        "`MaxNumberOfMessages=10`, one reused LMTP connection straight to Dovecot, no tagging.",
        "",
        "| latency | round | " + " | ".join(f"{names[p]} msg/s" for p in paths) + " | "
        + " | ".join(f"{p}/l" for p in syncs) + " | moto CPU ms/msg " + " / ".join(paths)
        + " | client CPU ms/msg " + " / ".join(paths) + " |",
        "|" + "---|" * (4 + len(paths) + len(syncs)), *rows, "",
        f"Target ≥ {TARGET:g} × the loop (ratio of the medians): " + "; ".join(verdicts) + ".",
        ""])


def write(path: Path, text: str) -> None:
    """Replace the section (or put it before the notes), leaving the rest as it is."""
    old = path.read_text() if path.exists() else ""
    start = old.find("\n" + SECTION)
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start + 1] + (old[end + 1:] if end >= 0 else "")
    notes = old.find("\n" + NOTES)
    at = notes + 1 if notes >= 0 else len(old)
    path.write_text(old[:at] + text + "\n" + old[at:])


def main() -> None:
    args = parse_args()
    command = "python3 bench/sync_feed.py " + " ".join(sys.argv[1:])
    rates: Rates = {(ms, path): [] for ms in args.latency for path in args.paths}
    with tempfile.TemporaryDirectory(prefix="mg-bench-sync-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        dovecot, moto, gate = Dovecot(root), Moto(root / "moto"), None
        try:
            dovecot.start()
            moto.start()
            gate = start_gate(root, dovecot, moto, args)
            for ms in args.latency:
                rounds(ms, rates, (moto, gate, dovecot), args)
        finally:
            for peer in (gate, moto, dovecot):
                if peer is not None:
                    peer.stop()
    text = section(rates, args, command)
    print(text)
    if not args.no_write:
        write(args.output, text)


def rounds(ms: float, rates: Rates, peers, args) -> None:
    moto, gate, dovecot = peers
    delay = Delay(moto.port, ms) if ms else None
    endpoint = f"http://127.0.0.1:{delay.port}" if delay else moto.endpoint
    try:
        for rnd in range(1, args.rounds + 1):
            for path in (args.paths if rnd % 2 else args.paths[::-1]):
                run = f"{ms:g}".replace(".", "p") + f"-{rnd}"
                rate, moto_ms, client_ms = measure(path, run, (moto, gate, dovecot, endpoint),
                                                   args)
                rates[ms, path].append((rate, moto_ms, client_ms))
                print(f"latency {ms:g} ms, round {rnd} ({path}): {rate:.0f} msg/s, CPU ms/msg "
                      f"moto {moto_ms:.1f}, client {client_ms:.1f}", flush=True)
    finally:
        if delay is not None:
            delay.stop()


def start_gate(root: Path, dovecot: Dovecot, moto: Moto, args) -> Mailgate:
    smtp = f"127.0.0.1:{free_port()}"
    secret = root / "feed.secret"
    secret.write_text(uuid.uuid4().hex)
    moto.client("sqs").create_queue(QueueName="feed-dead-letters")
    return Mailgate(root / "gate", {
        "hostname": "mx.example.test", "data_dir": str(root / "data"),
        "domains": [domain(k) for k in range(args.queues)],
        "listen": {"smtp": smtp, "lmtp": "", "lookup": ""},
        "delivery": {"lmtp": f"127.0.0.1:{dovecot.lmtp_port}"},
        "metrics": {"listen": ""}, "health": {"listen": ""},
        "sync": {"region": "us-east-1", "inject": smtp, "secret_file": str(secret),
                 "wait_time": 1, "concurrency": args.concurrency,
                 "dead_letter_queue": "feed-dead-letters"}}).start()


if __name__ == "__main__":
    main()
