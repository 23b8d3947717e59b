"""mailgate sync end to end: moto in server mode (S3, SQS, SNS over real HTTP) -> `mailgate sync`
(a subprocess) -> `mailgate serve` -> Dovecot.

The bucket -> queue notification is configured in moto, so a put_object produces the real event
(the queue's first message is s3:TestEvent). What a user would check is checked: the maildir
files (counted for exactly-once), the headers serve added, the object's tags, what is left in
the queue and what the dead-letter queue says.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import time
import urllib.parse
import urllib.request
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from conftest import register
from peers import REPO, Moto, PeerError, free_port, read_text, wait_until
from storefault import StoreFault

TESTS = Path(__file__).resolve().parent
BUCKET, ARCHIVE = "inbound", "archive"
QUEUE, DLQ = "example-test-queue", "sync-dead-letters"   # {domain}-queue for example.test
ALICE, BOB, DAVE = "alice@example.test", "bob@example.test", "dave@example.test"  # dave: unknown
CLIENT_IP, CLIENT_HELO = "192.0.2.7", "mail.remote.test"
SYNC_BOUND = 60.0   # seconds any one sync run or wait may take here


def stored(mark: str, to: str = ALICE, ses: bool = True, body: bytes = b"") -> bytes:
    """A message as SES stores it: its own headers on top (client, recipient, verdicts)."""
    top = (f"Return-Path: <bounce@remote.test>\r\n"
           f"Received: from {CLIENT_HELO} (mail-out.remote.test [{CLIENT_IP}])\r\n"
           f" by inbound-smtp.us-east-1.amazonaws.com with SMTP id {mark[:12]}\r\n"
           f" for {to};\r\n Tue, 24 Nov 2026 10:00:00 +0000 (UTC)\r\n"
           f"X-SES-Spam-Verdict: PASS\r\nX-SES-Virus-Verdict: PASS\r\n"
           f"Authentication-Results: amazonses.com;\r\n spf=pass (spfCheck: ok)"
           f" client-ip={CLIENT_IP}; envelope-from=bounce@remote.test;\r\n"
           f" dkim=pass header.i=@remote.test;\r\n dmarc=pass header.from=remote.test;\r\n"
           ) if ses else ""
    return (top + f"From: <sender@remote.test>\r\nTo: <{to}>\r\nSubject: sync {mark}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\nbody {mark}\r\n").encode() + body


def ses_notification(key: str, recipients: list[str], bucket: str = BUCKET) -> dict:
    return {"notificationType": "Received",
            "mail": {"source": "ses-sender@remote.test", "messageId": key.rpartition("/")[2]},
            "receipt": {"recipients": recipients, "spamVerdict": {"status": "FAIL"},
                        "virusVerdict": {"status": "PASS"}, "spfVerdict": {"status": "GRAY"},
                        "dkimVerdict": {"status": "PASS"}, "dmarcVerdict": {"status": "PASS"},
                        "action": {"type": "S3", "bucketName": bucket, "objectKey": key}}}


def s3_event(key: str, bucket: str = BUCKET) -> dict:
    """An ObjectCreated record as S3 sends it (key URL-encoded)."""
    return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3",
                         "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket},
                                "object": {"key": urllib.parse.quote_plus(key, safe="/")}}}]}


class Aws:
    """The SES side in moto: bucket -> queue notifications, a dead-letter queue, SNS."""

    def __init__(self, moto):
        self.moto = moto
        self.s3, self.sqs, self.sns = moto.client("s3"), moto.client("sqs"), moto.client("sns")
        for bucket in (BUCKET, ARCHIVE):
            self.s3.create_bucket(Bucket=bucket)
        self.queue = self.sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
        self.dlq = self.sqs.create_queue(QueueName=DLQ)["QueueUrl"]
        self.s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": self.arn(self.queue),
                                     "Events": ["s3:ObjectCreated:*"]}]})

    def arn(self, url: str) -> str:
        return self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]

    def drop_test_event(self) -> None:
        """Take s3:TestEvent out of the queue, for tests that count what is left."""
        got = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1)["Messages"]
        assert [json.loads(m["Body"])["Event"] for m in got] == ["s3:TestEvent"]
        self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=got[0]["ReceiptHandle"])

    def left(self, url: str) -> int:
        """Messages in the queue, visible or in flight. moto counts the visible ones a moment
        before those in flight: a message whose visibility timeout ends in between is in
        neither count, and a queue that holds it reads 0. It cannot end twice in a moment, so
        the second of two readings counts it; the larger is taken."""
        return max(self._counted(url), self._counted(url))

    def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight), as moto reads them now."""
        attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return (int(attrs["ApproximateNumberOfMessages"]),
                int(attrs["ApproximateNumberOfMessagesNotVisible"]))

    def _counted(self, url: str) -> int:
        attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return sum(int(v) for v in attrs.values())

    def dead_letters(self) -> list[dict]:
        out = []
        for _ in range(20):  # bounded: a handful of receives empties a test's DLQ
            got = self.sqs.receive_message(QueueUrl=self.dlq, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=0).get("Messages", [])
            if not got:
                return out
            out += [json.loads(m["Body"]) for m in got]
            self.sqs.delete_message_batch(QueueUrl=self.dlq, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
        return out

    def exists(self, key: str, bucket: str = BUCKET) -> bool:
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def tags(self, key: str, bucket: str = BUCKET) -> dict[str, str]:
        tags = self.s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        return {t["Key"]: t["Value"] for t in tags}


class Scene:
    """What a failed test leaves in moto and the maildirs, shown next to the peers' logs
    (conftest calls log_text() of every registered peer): each queue's counts, the dead
    letters (peeked, not taken), each object's status tag, and every maildir file."""

    def __init__(self, aws: Aws, dovecot):
        self.aws, self.dovecot = aws, dovecot

    def log_text(self) -> str:
        lines: list[str] = []
        for part in (self._queues, self._dead_letters, self._objects, self._maildirs):
            try:
                part(lines)
            except (BotoCoreError, ClientError, OSError) as e:
                lines.append(f"  ({part.__name__.strip('_')}: {type(e).__name__}: {e})")
        return "\n".join(lines) + "\n"

    def _queues(self, lines: list[str]) -> None:
        for url in self.aws.sqs.list_queues().get("QueueUrls", []):
            attrs = self.aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
                "Attributes"]
            counts = " ".join(f"{k[len('ApproximateNumberOfMessages'):] or 'Visible'}={v}"
                              for k, v in sorted(attrs.items())
                              if k.startswith("ApproximateNumberOfMessages"))
            lines.append(f"queue {url.rpartition('/')[2]}: {counts}")

    def _dead_letters(self, lines: list[str]) -> None:
        got = self.aws.sqs.receive_message(QueueUrl=self.aws.dlq, MaxNumberOfMessages=10,
                                           VisibilityTimeout=0).get("Messages", [])
        lines.append(f"dead letters (first {len(got)}, unless the test took them):")
        lines += [f"  {m['Body'][:500]}" for m in got]

    def _objects(self, lines: list[str]) -> None:
        for bucket in (BUCKET, ARCHIVE):
            for obj in self.aws.s3.list_objects_v2(Bucket=bucket, MaxKeys=60).get("Contents", []):
                status = self.aws.tags(obj["Key"], bucket).get("status", "(untagged)")
                lines.append(f"s3://{bucket}/{obj['Key']}: {status}")

    def _maildirs(self, lines: list[str]) -> None:
        for addr in (ALICE, BOB):
            for sub in ("tmp", "new", "cur"):
                d = self.dovecot.maildir(addr) / sub
                names = sorted(f.name for f in d.iterdir()) if d.is_dir() else []
                lines.append(f"maildir {addr} {sub}/: {len(names)} files")
                lines += [f"  {name}" for name in names[:60]]


class Sync:
    """`python -m mailgate sync -c FILE` with moto's credentials; log in ROOT/sync-N.log."""

    def __init__(self, gate, moto, name: str, env: dict[str, str] | None = None):
        self.gate, self.name = gate, name
        self.log_path = gate.root / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        host, port = gate.smtp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
        self.env.update(moto.env, PYTHONPATH=os.pathsep.join((str(REPO), str(TESTS))),
                        PYTHONUNBUFFERED="1",
                        MAILGATE_SYNC_INJECT=f"{host}:{port}",
                        MAILGATE_SYNC_METRICS=f"127.0.0.1:{free_port()}")
        self.env.update(env or {})  # a test's own values win, MAILGATE_SYNC_METRICS too

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mailgate", "sync", "-c", str(self.gate.config_path), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """One run to its end (`--once`, `replay ...`); its stderr is appended to the log."""
        proc = subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True,
                              timeout=SYNC_BOUND, stdin=subprocess.DEVNULL)
        with open(self.log_path, "a") as log:
            log.write(proc.stderr)
        return proc

    def start(self) -> "Sync":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: self.proc.poll() is not None or "mailgate sync ready" in
                       self.log_text(), SYNC_BOUND, what=f"{self.name} ready")
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise
        if self.proc.poll() is not None:
            raise PeerError(f"{self.name} exited {self.proc.returncode}:\n{self.log_text()}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(SYNC_BOUND)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(SYNC_BOUND)
            raise PeerError(f"{self.name} did not stop on {signal.Signals(sig).name}") from None

    def log_text(self) -> str:
        return read_text(self.log_path)


@pytest.fixture
def aws(moto) -> Aws:
    return Aws(moto)


@pytest.fixture
def filters() -> list[str]:
    """serve's filter chain for the test (a test may parametrize it)."""
    return ["sync_filters:ShowFeed"]


@pytest.fixture
def setup(aws, moto, dovecot, mailgate_factory, peer_root, request, filters):
    """serve (with the feed's secret and a filter that shows the feed's verdicts) and a factory
    of sync processes on the same config file; every sync is stopped at teardown. A failure
    shows the queues, dead letters, tags and maildirs (Scene) with the logs."""
    register(request, "queues, objects and maildirs", Scene(aws, dovecot))
    secret = peer_root / "feed.secret"
    secret.write_text(uuid.uuid4().hex + "\n")
    gate = mailgate_factory(
        {"pipeline": {"filters": filters},
         # no DNS answers here: the auth filter's own checks end as temperror, fast
         "dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": 0.2, "budget": 0.5},
         "sync": {"endpoint_url": moto.endpoint, "region": "us-east-1",
                  "buckets": [BUCKET, ARCHIVE], "dead_letter_queue": DLQ, "wait_time": 1,
                  "visibility_timeout": 3, "secret_file": str(secret)}},
        env={"PYTHONPATH": str(TESTS)})
    started: list[Sync] = []

    def sync(env: dict[str, str] | None = None) -> Sync:
        proc = Sync(gate, moto, f"sync-{len(started)}", env)
        started.append(proc)
        register(request, proc.name, proc)
        return proc
    try:
        yield gate, sync
    finally:
        for proc in started:
            proc.stop(signal.SIGKILL)


def once(sync) -> None:
    proc = sync().run("--once")
    assert proc.returncode == 0, proc.stderr


def headers(message: bytes, name: str) -> list[str]:
    """Every `name:` line of the header section, unfolded."""
    head = message.split(b"\n\n", 1)[0].decode()
    return [line for line in head.replace("\n\t", " ").replace("\n ", " ").splitlines()
            if line.lower().startswith(name.lower() + ":")]


def header(message: bytes, name: str) -> str:
    found = headers(message, name)
    return found[0] if found else ""


# ---------------------------------------------------------------- both formats, envelopes

def test_s3_event_delivers_with_what_ses_wrote(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    data = stored(mark)
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=data)
    once(sync)
    [delivered] = dovecot.maildir_messages(ALICE)
    assert delivered.endswith(data.replace(b"\r\n", b"\n"))  # SES's bytes, unchanged
    # serve's own Received (below Dovecot's) names SES's client, from XFORWARD
    [received] = [h for h in headers(delivered, "Received") if "(mailgate)" in h]
    assert received.startswith(f"Received: from {CLIENT_HELO} (mail-out.remote.test [{CLIENT_IP}])"
                               " by mx.example.test (mailgate) with ESMTP")
    assert header(delivered, "X-Test-Feed") == ("X-Test-Feed: x-ses-spam=pass; x-ses-virus=pass; "
                                               "x-ses-spf=pass; x-ses-dkim=pass; x-ses-dmarc=pass")
    assert header(delivered, "Return-Path") == "Return-Path: <bounce@remote.test>"
    tags = aws.tags(f"in/{mark}")
    assert (tags["processed"], tags["status"], tags["processed_by"]) == (
        "true", "delivered", "mx.example.test")
    assert tags["invalid_inboxes"] == "" and tags["processed_at"].endswith("Z")
    assert aws.left(aws.queue) == 0  # the s3:TestEvent went too, and nothing was dead
    assert aws.dead_letters() == []


@pytest.mark.parametrize("filters", [["auth"]])
def test_ses_verdicts_in_authentication_results_only_from_the_feed(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    once(sync)
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=15) as client:
        client.sendmail("a@remote.test", [BOB], stored(uuid.uuid4().hex, to=BOB))
    [from_feed] = dovecot.maildir_messages(ALICE)
    [from_client] = dovecot.maildir_messages(BOB)
    ours = [h for h in headers(from_feed, "Authentication-Results")
            if h.startswith("Authentication-Results: mx.example.test;")]
    assert len(ours) == 1
    for clause in ("x-ses-spam=pass", "x-ses-virus=pass", "x-ses-spf=pass", "x-ses-dkim=pass",
                   "x-ses-dmarc=pass"):
        assert f"; {clause}" in ours[0], clause
    assert "x-ses-" not in " ".join(h for h in headers(from_client, "Authentication-Results")
                                    if h.startswith("Authentication-Results: mx.example.test;"))


@pytest.mark.parametrize("filters", [["auth"]])
def test_without_ses_received_line_the_feed_is_still_not_local_mail(setup, aws, dovecot):
    """No SES Received line to read: no XFORWARD. serve must not take sync's session for local
    mail (no SPF, DMARC only annotated): SPF says none, with why; sync's address is not checked."""
    gate, sync = setup
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"ses/{mark}", Body=stored(mark, ses=False))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        ses_notification(f"ses/{mark}", [ALICE], ARCHIVE)))
    once(sync)
    [delivered] = dovecot.maildir_messages(ALICE)
    [ours] = [h for h in headers(delivered, "Authentication-Results")
              if h.startswith("Authentication-Results: mx.example.test;")]
    assert "spf=none (feed without the client's address, not checked)" in ours
    assert "local mail" not in ours and "127.0.0.1" not in ours


def test_ses_notification_through_sns_and_raw(setup, aws, dovecot):
    gate, sync = setup
    topic = aws.sns.create_topic(Name="ses-inbound")["TopicArn"]
    aws.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=aws.arn(aws.queue))
    marks = [uuid.uuid4().hex, uuid.uuid4().hex]
    for mark in marks:  # stored without SES's headers: the notification is the envelope
        aws.s3.put_object(Bucket=ARCHIVE, Key=f"ses/{mark}", Body=stored(mark, ses=False))
    aws.sns.publish(TopicArn=topic, Message=json.dumps(
        ses_notification(f"ses/{marks[0]}", [ALICE, BOB], ARCHIVE)))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        ses_notification(f"ses/{marks[1]}", [BOB], ARCHIVE)))
    once(sync)
    [to_alice] = dovecot.maildir_messages(ALICE)
    assert f"sync {marks[0]}".encode() in to_alice
    to_bob = dovecot.maildir_messages(BOB)
    assert sorted(header(m, "Subject") for m in to_bob) == sorted(
        f"Subject: sync {m}" for m in marks)
    assert header(to_alice, "Return-Path") == "Return-Path: <ses-sender@remote.test>"
    assert header(to_alice, "X-Test-Feed") == ("X-Test-Feed: x-ses-spam=fail; x-ses-virus=pass; "
                                              "x-ses-spf=neutral; x-ses-dkim=pass; "
                                              "x-ses-dmarc=pass")
    assert aws.tags(f"ses/{marks[1]}", ARCHIVE)["status"] == "delivered"
    assert aws.left(aws.queue) == 0


def test_url_encoded_key_and_lf_only_object(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    key = f"in/a b+c é {mark}.eml"   # the event carries it as in/a+b%2Bc+%C3%A9+....eml
    data = stored(mark)
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=data.replace(b"\r\n", b"\n"))
    once(sync)
    [delivered] = dovecot.maildir_messages(ALICE)
    assert delivered.endswith(data.replace(b"\r\n", b"\n"))
    assert aws.tags(key)["status"] == "delivered"


def test_line_of_2000_octets_arrives_byte_exact(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    data = stored(mark, body=b"x" * 1998 + b"\r\n" + "é".encode() * 700 + b"\r\n")
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=data)
    once(sync)
    [over_imap] = dovecot.fetch_imap(ALICE)
    assert over_imap.endswith(data)


def test_recipients_with_one_unknown_and_one_foreign(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"ses/{mark}", Body=stored(mark, ses=False))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        ses_notification(f"ses/{mark}", [ALICE, DAVE, "someone@elsewhere.test"], ARCHIVE)))
    once(sync)
    assert len(dovecot.maildir_messages(ALICE)) == 1
    tags = aws.tags(f"ses/{mark}", ARCHIVE)
    assert (tags["status"], tags["invalid_inboxes"]) == ("delivered", DAVE)
    assert aws.left(aws.queue) == 0 and aws.dead_letters() == []
    log = read_text(gate.root / "sync-0.log")
    assert "not our domains, not injected: someone@elsewhere.test" in log


def test_one_recipient_in_two_cases_is_delivered_once_not_deferred_as_busy(setup, aws, dovecot):
    """SES lists RCPT TO addresses as given: one mailbox written twice in different case is
    one recipient (the claims' key), not two that wait on each other's lock."""
    gate, sync = setup
    aws.drop_test_event()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"ses/{mark}", Body=stored(mark, ses=False))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        ses_notification(f"ses/{mark}", [ALICE, ALICE.capitalize()], ARCHIVE)))
    proc = sync().run("--once")
    assert proc.returncode == 0, proc.stderr
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert "being delivered by another sync process" not in proc.stderr
    assert aws.left(aws.queue) == 0   # finished on its first receive
    assert aws.tags(f"ses/{mark}", ARCHIVE)["status"] == "delivered"


# ---------------------------------------------------------------- nothing lost, nothing doubled

def test_listener_down_then_back_delivers_once(setup, aws, dovecot):
    gate, sync = setup
    aws.drop_test_event()
    gate.stop()
    feed = sync().start()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    wait_until(lambda: "deferred, it will come back" in feed.log_text(), SYNC_BOUND,
               what="a deferral while serve is down")
    assert aws.left(aws.queue) == 1 and dovecot.maildir_messages(ALICE) == []
    gate.start()
    # What the user sees first (the mail), then the queue: sync deletes only after the 250.
    wait_until(lambda: dovecot.maildir_messages(ALICE) and aws.left(aws.queue) == 0,
               SYNC_BOUND, what="delivered and the queue drained")
    assert feed.stop() == 0
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.left(aws.queue) == 0 and aws.dead_letters() == []
    assert aws.tags(f"in/{mark}")["status"] == "delivered"


def test_notification_delivered_twice_delivers_once(setup, aws, dovecot):
    gate, sync = setup
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    got = aws.sqs.receive_message(QueueUrl=aws.queue, MaxNumberOfMessages=10,
                                  WaitTimeSeconds=1, VisibilityTimeout=0)["Messages"]
    event = next(m["Body"] for m in got if "Records" in m["Body"])
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=event)  # SQS's at-least-once
    # The two copies may be in flight at once: one waits (visibility timeout) for the other.
    wait_until(lambda: sync().run("--once").returncode == 0 and aws.left(aws.queue) == 0,
               SYNC_BOUND, interval=1, what="both copies acknowledged")
    assert len(dovecot.maildir_messages(ALICE)) == 1


@pytest.mark.slow
def test_two_sync_processes_200_messages_twice_announced_each_exactly_once(setup, aws, dovecot):
    gate, sync = setup
    first, second = sync().start(), sync().start()
    marks = [uuid.uuid4().hex for _ in range(200)]
    for mark in marks:  # each announced twice (at-least-once): the event, and a copy of it
        aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
        aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(s3_event(f"in/{mark}")))
    wait_until(lambda: len(dovecot.maildir_messages(ALICE)) >= 200 and aws.left(aws.queue) == 0,
               3 * SYNC_BOUND, interval=0.2, what="200 messages delivered")
    assert first.stop() == 0 and second.stop() == 0
    delivered = dovecot.maildir_messages(ALICE)
    assert len(delivered) == 200
    assert sorted(header(m, "Subject")[len("Subject: sync "):] for m in delivered) == sorted(marks)
    for proc in (first, second):  # both took part
        assert "s3://inbound/in/" in proc.log_text()


@pytest.fixture
def dynamodb(peer_root, request) -> Iterator[Moto]:
    """A moto for the store alone, answering one request at a time: the threaded one lets two
    conditional claims of one key both win (DynamoDB lets one), which delivers twice."""
    server = Moto(peer_root / "moto-dynamodb", one_at_a_time=True)
    register(request, "moto-dynamodb", server)
    try:
        yield server.start()
    finally:
        server.stop()


def dynamodb_store(gate, sync, endpoint: str) -> dict[str, str]:
    """The environment that puts sync's store in DynamoDB at `endpoint`, its tables made."""
    env = {"MAILGATE_STORE_BACKEND": "dynamodb", "MAILGATE_STORE_REGION": "us-east-1",
           "MAILGATE_STORE_ENDPOINT_URL": endpoint}
    init = subprocess.run([sys.executable, "-m", "mailgate", "store", "init", "-c",
                           str(gate.config_path)], env={**sync().env, **env},
                          capture_output=True, text=True, timeout=SYNC_BOUND)
    assert init.returncode == 0, init.stderr
    return env


@pytest.mark.slow
def test_two_hosts_share_their_claims_in_dynamodb(setup, aws, dovecot, dynamodb, peer_root):
    gate, sync = setup
    dynamo = dynamodb_store(gate, sync, dynamodb.endpoint)
    # each "host" has its own data_dir (so its own SQLite): only DynamoDB is shared
    hosts = [sync({**dynamo, "MAILGATE_DATA_DIR": str(peer_root / f"host-{i}")}).start()
             for i in range(2)]
    marks = [uuid.uuid4().hex for _ in range(40)]
    for mark in marks:  # each announced twice
        aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
        aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(s3_event(f"in/{mark}")))
    wait_until(lambda: len(dovecot.maildir_messages(ALICE)) >= 40 and aws.left(aws.queue) == 0,
               3 * SYNC_BOUND, interval=0.2, what="40 messages delivered")
    assert [host.stop() for host in hosts] == [0, 0]
    delivered = Counter(header(m, "Subject")[len("Subject: sync "):]
                        for m in dovecot.maildir_messages(ALICE))
    missing = sorted(set(marks) - set(delivered))
    twice = {mark: n for mark, n in delivered.items() if n != 1 or mark not in marks}
    assert (missing, twice) == ([], {})


def test_store_failing_after_the_250_acknowledges_and_delivers_once(setup, aws, dovecot,
                                                                   dynamodb):
    """serve said 250, then the store would not record it: the message is still finished
    (tagged, deleted), not brought back to be injected again."""
    gate, sync = setup
    dynamo = dynamodb_store(gate, sync, dynamodb.endpoint)
    aws.drop_test_event()
    proxy = StoreFault(dynamodb.endpoint)
    try:
        proxy.fail("PutItem", "sync-done:")
        feed = sync({**dynamo, "MAILGATE_STORE_ENDPOINT_URL": proxy.endpoint}).start()
        mark = uuid.uuid4().hex
        aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
        wait_until(lambda: len(dovecot.maildir_messages(ALICE)) > 1 or (
            dovecot.maildir_messages(ALICE) and aws.left(aws.queue) == 0), SYNC_BOUND,
            what="delivered and acknowledged, or delivered twice")
        assert feed.stop() == 0
    finally:
        proxy.close()
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.left(aws.queue) == 0 and aws.dead_letters() == []
    assert aws.tags(f"in/{mark}")["status"] == "delivered"
    assert proxy.failed >= 2  # each try of the record was refused (botocore retries once)
    assert f"s3://{BUCKET}/in/{mark}: delivered to {ALICE}, but not recorded" in feed.log_text()


def test_sigkill_after_250_before_delete_no_duplicate(setup, aws, dovecot):
    gate, sync = setup
    aws.drop_test_event()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    crashed = sync(env={"SYNC_CRASH_POINT": "before-delete"}).run("--once")
    assert crashed.returncode == -signal.SIGKILL
    assert len(dovecot.maildir_messages(ALICE)) == 1 and aws.left(aws.queue) == 1
    # the message comes back after its visibility timeout (3 s here)
    wait_until(lambda: sync().run("--once").returncode == 0 and aws.left(aws.queue) == 0,
               SYNC_BOUND, interval=1, what="the message back and acknowledged")
    assert len(dovecot.maildir_messages(ALICE)) == 1


def test_several_queues_share_the_workers(setup, aws, dovecot):
    gate, sync = setup
    second = aws.sqs.create_queue(QueueName="second-queue")["QueueUrl"]
    marks = [uuid.uuid4().hex for _ in range(12)]
    for i, mark in enumerate(marks):
        aws.s3.put_object(Bucket=ARCHIVE, Key=f"in/{mark}", Body=stored(mark))
        aws.sqs.send_message(QueueUrl=(aws.queue, second)[i % 2],
                             MessageBody=json.dumps(s3_event(f"in/{mark}", ARCHIVE)))
    env = {"MAILGATE_SYNC_QUEUES": f"{QUEUE},second-queue", "MAILGATE_SYNC_CONCURRENCY": "1",
           "MAILGATE_SYNC_BATCH": "3"}
    assert sync(env).run("--once").returncode == 0
    assert len(dovecot.maildir_messages(ALICE)) == 12
    assert aws.left(aws.queue) == 0 and aws.left(second) == 0


# ---------------------------------------------------------------- poison, replay, trust

def test_poison_messages_dead_lettered_with_reason_queue_keeps_flowing(setup, aws, dovecot):
    gate, sync = setup
    for body in (json.dumps(s3_event("in/never-stored")), '{"Records": [{"eventName": "ObjectCr',
                 "this is not JSON", json.dumps(ses_notification("ses/x", []))):
        aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=body)
    refused = uuid.uuid4().hex  # stored, but for nobody Dovecot knows: a final 550 5.1.1
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"ses/{refused}", Body=stored(refused, ses=False))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        ses_notification(f"ses/{refused}", [DAVE], ARCHIVE)))
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    once(sync)
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.left(aws.queue) == 0
    dead = sorted(aws.dead_letters(), key=lambda d: d["error"])
    assert [d["error"].split(":")[0] for d in dead] == [
        "SES notification with empty or invalid receipt.recipients", DAVE, "not JSON",
        "not JSON", "object s3"]
    assert "in/never-stored does not exist (NoSuchKey)" in dead[4]["error"]
    assert dead[4]["key"] == "s3://inbound/in/never-stored"
    assert dead[1]["error"].startswith(f"{DAVE}: 550 5.1.1 ")
    assert dead[1]["key"] == f"s3://{ARCHIVE}/ses/{refused}"
    tags = aws.tags(f"ses/{refused}", ARCHIVE)
    assert (tags["status"], tags["invalid_inboxes"]) == ("invalid", DAVE)
    assert all(d["queue"].endswith(f"/{QUEUE}") and d["time"].endswith("Z") for d in dead)
    assert {d["body"] for d in dead[2:4]} == {'{"Records": [{"eventName": "ObjectCr',
                                              "this is not JSON"}


def test_malformed_notifications_are_dead_lettered_at_once(setup, aws, dovecot):
    """Shapes SES and S3 never send, and a bucket name botocore refuses to ask for: each is
    dead-lettered on its first receive, with the reason, instead of coming back for ever."""
    gate, sync = setup
    aws.drop_test_event()
    event = s3_event("in/x")
    record = event["Records"][0]["s3"]
    bodies = {
        "key 5": {"Records": [{**event["Records"][0], "s3": {**record, "object": {"key": 5}}}]},
        "key empty": {"Records": [{**event["Records"][0], "s3": {**record,
                                                                  "object": {"key": ""}}}]},
        "bucket list": {"Records": [{**event["Records"][0], "s3": {**record, "bucket": {
            "name": [BUCKET]}}}]},
        "action string": {**ses_notification("ses/x", [ALICE]), "receipt": {
            **ses_notification("ses/x", [ALICE])["receipt"], "action": "S3"}},
        "verdict string": {**ses_notification("ses/x", [ALICE]), "receipt": {
            **ses_notification("ses/x", [ALICE])["receipt"], "spamVerdict": "PASS"}},
        "bucket botocore refuses": ses_notification("ses/x", [ALICE], "no such/bucket"),
    }
    for why, body in bodies.items():  # "why" rides along: the dead letter keeps the body
        aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps({**body, "why": why}))
    proc = sync({"MAILGATE_SYNC_BUCKETS": ""}).run("--once")  # any bucket: botocore decides
    assert proc.returncode == 0, proc.stderr
    assert aws.left(aws.queue) == 0
    dead = {json.loads(d["body"])["why"]: d["error"] for d in aws.dead_letters()}
    not_strings = "S3 record whose s3.bucket.name or s3.object.key is not a non-empty string"
    assert dead == {
        "key 5": not_strings, "key empty": not_strings, "bucket list": not_strings,
        "action string": "SES notification without an S3 action (bucketName, objectKey)",
        "verdict string": "SES notification whose receipt.spamVerdict is not an object",
        "bucket botocore refuses": dead["bucket botocore refuses"]}
    assert dead["bucket botocore refuses"].startswith(
        "s3://no such/bucket/ses/x: not a valid S3 request: Parameter validation failed: "
        'Invalid bucket name "no such/bucket"')
    assert "internal error" not in proc.stderr


def test_a_poison_body_near_the_size_limit_is_still_set_aside(setup, aws, dovecot):
    """A dead letter holds the body and the reason, JSON-escaped: for a body near the queue's
    MaximumMessageSize it would not fit the dead-letter queue, and the poison message would come
    back for ever. The body is cut to fit (read from the queue at start), and says so."""
    gate, sync = setup
    aws.drop_test_event()
    limit = 262_144   # SQS's long-standing default MaximumMessageSize (256 KiB), both queues
    for url in (aws.queue, aws.dlq):
        aws.sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": str(limit)})
    body = "not JSON \u00e9\u0001" + "x" * (limit - 100)   # fits the queue it came from
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=body)
    feed = sync({"MAILGATE_SYNC_VISIBILITY_TIMEOUT": "1"}).start()
    try:
        wait_until(lambda: aws.left(aws.queue) == 0 and aws.left(aws.dlq) == 1, 30,
                   interval=0.2, what="the poison message set aside")
    finally:
        log = feed.log_text()
        feed.stop()
    assert "Traceback" not in log and "internal error" not in log
    [dead] = aws.dead_letters()
    whole = body.encode()
    assert dead["error"].startswith("not JSON: ") and dead["queue"].endswith(f"/{QUEUE}")
    assert (dead["truncated"], dead["body_length"], dead["body_sha256"]) == (
        True, len(whole), hashlib.sha256(whole).hexdigest())
    assert body.startswith(dead["body"]) and len(dead["body"]) > limit - 1024


def test_a_dead_letter_that_cannot_be_sent_is_one_line_and_comes_back(setup, aws, dovecot):
    """The dead-letter queue refusing the record (here: its MaximumMessageSize lowered after sync
    read it) is an AWS failure, one line, no traceback; the message comes back and is set aside
    once the queue takes it."""
    gate, sync = setup
    aws.drop_test_event()
    feed = sync({"MAILGATE_SYNC_VISIBILITY_TIMEOUT": "1"}).start()
    aws.sqs.set_queue_attributes(QueueUrl=aws.dlq, Attributes={"MaximumMessageSize": "1024"})
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody="not JSON " + "x" * 2000)
    wait_until(lambda: feed.log_text().count(
        f"not set aside into dead-letter queue {DLQ}: ") >= 2, SYNC_BOUND,
        what="the dead letter refused, twice: the message came back")
    assert aws.left(aws.queue) == 1 and aws.left(aws.dlq) == 0
    aws.sqs.set_queue_attributes(QueueUrl=aws.dlq, Attributes={"MaximumMessageSize": "262144"})
    wait_until(lambda: aws.left(aws.queue) == 0 and aws.left(aws.dlq) == 1, SYNC_BOUND,
               interval=0.2, what="set aside once the dead-letter queue takes it")
    assert feed.stop() == 0
    log = feed.log_text()
    assert "Traceback" not in log and "internal error" not in log
    assert "; it will come back" in log.split(f"not set aside into dead-letter queue {DLQ}: ")[1]
    [dead] = aws.dead_letters()
    assert dead["body"] == "not JSON " + "x" * 2000 and "truncated" not in dead


def test_a_bug_on_one_message_sets_it_aside_after_five_failures(setup, aws, dovecot):
    """An unexpected exception for a message (here a test hook raising) is logged and the
    message comes back; at its fifth failure it is dead-lettered, the object left alone."""
    gate, sync = setup
    aws.drop_test_event()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    feed = sync({"SYNC_CRASH_POINT": "raise-in-process",
                 "MAILGATE_SYNC_VISIBILITY_TIMEOUT": "1"}).start()
    wait_until(lambda: aws.left(aws.queue) == 0 and aws.left(aws.dlq) == 1, 30, interval=0.2,
               what="the message dead-lettered")
    assert feed.stop() == 0
    [dead] = aws.dead_letters()
    assert dead["error"] == ("internal error, failure 5: RuntimeError: "
                             "SYNC_CRASH_POINT=raise-in-process")
    assert urllib.parse.unquote_plus(json.loads(dead["body"])["Records"][0]["s3"]["object"][
        "key"]) == f"in/{mark}"
    log = feed.log_text()
    for receive in range(1, 5):
        assert f"internal error (failure {receive} of 5); it will come back" in log, receive
    assert "internal error (failure 5 of 5)\n" in log
    assert aws.exists(f"in/{mark}") and aws.tags(f"in/{mark}") == {}
    assert dovecot.maildir_messages(ALICE) == []


def test_processed_delete_deletes_only_what_was_delivered(setup, aws, dovecot):
    """processed = "delete": the delivered object goes; a refused one (the dead letter holds only
    the notification) is tagged, not deleted; one in a bucket outside sync.buckets is not
    touched at all, in either mode."""
    gate, sync = setup
    aws.drop_test_event()
    delivered, refused, outside = (uuid.uuid4().hex for _ in range(3))
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{delivered}", Body=stored(delivered))
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{refused}", Body=stored(refused, to=DAVE))
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"in/{outside}", Body=stored(outside))
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        s3_event(f"in/{outside}", ARCHIVE)))
    inbound_only = {"MAILGATE_SYNC_BUCKETS": BUCKET}
    proc = sync({**inbound_only, "MAILGATE_SYNC_PROCESSED": "delete"}).run("--once")
    assert proc.returncode == 0, proc.stderr
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.left(aws.queue) == 0
    assert sorted(d["key"] for d in aws.dead_letters()) == [f"s3://{ARCHIVE}/in/{outside}",
                                                            f"s3://{BUCKET}/in/{refused}"]
    assert not aws.exists(f"in/{delivered}")
    assert aws.tags(f"in/{refused}")["status"] == "invalid"
    assert aws.tags(f"in/{outside}", ARCHIVE) == {}
    # tag mode: the object outside sync.buckets is not tagged either
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(
        s3_event(f"in/{outside}", ARCHIVE)))
    assert sync(inbound_only).run("--once").returncode == 0
    assert [d["key"] for d in aws.dead_letters()] == [f"s3://{ARCHIVE}/in/{outside}"]
    assert aws.tags(f"in/{outside}", ARCHIVE) == {}


def test_processed_delete_a_repeated_notification_is_already_processed(setup, aws, dovecot):
    """The copy of a notification that comes after the delivered object was deleted is
    acknowledged with an info line, not dead-lettered as "does not exist"; an object that was
    never there still is."""
    gate, sync = setup
    aws.drop_test_event()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    delete = {"MAILGATE_SYNC_PROCESSED": "delete"}
    assert sync(delete).run("--once").returncode == 0
    assert not aws.exists(f"in/{mark}") and len(dovecot.maildir_messages(ALICE)) == 1
    for key in (f"in/{mark}", "in/never-stored"):  # SQS's at-least-once, and a real poison
        aws.sqs.send_message(QueueUrl=aws.queue, MessageBody=json.dumps(s3_event(key)))
    again = sync(delete)
    assert again.run("--once").returncode == 0
    assert aws.left(aws.queue) == 0 and len(dovecot.maildir_messages(ALICE)) == 1
    assert [d["key"] for d in aws.dead_letters()] == [f"s3://{BUCKET}/in/never-stored"]
    assert (f"]: queue {QUEUE} s3://{BUCKET}/in/{mark}: delivered: already processed "  # info
            "(delivered, then deleted)\n") in again.log_text()


def test_without_dead_letter_queue_the_redrive_policy_takes_poison(setup, aws, dovecot, moto):
    gate, sync = setup
    redrive = aws.sqs.create_queue(QueueName="redrive-dlq")["QueueUrl"]
    aws.sqs.set_queue_attributes(QueueUrl=aws.queue, Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": aws.arn(redrive), "maxReceiveCount": "2"})})
    aws.sqs.send_message(QueueUrl=aws.queue, MessageBody="not JSON at all")
    env = {"MAILGATE_SYNC_DEAD_LETTER_QUEUE": ""}
    for _ in range(3):  # each run receives it once; SQS moves it after the 2nd receive
        assert sync(env).run("--once").returncode == 0
    assert aws.left(aws.queue) == 0 and aws.left(redrive) == 1


def test_replay_of_a_prefix_with_the_same_idempotency(setup, aws, dovecot):
    gate, sync = setup
    marks = {p: uuid.uuid4().hex for p in ("2026/11/a", "2026/11/b", "2026/10/c")}
    for prefix, mark in marks.items():
        aws.s3.put_object(Bucket=ARCHIVE, Key=f"{prefix}/{mark}", Body=stored(mark))
    first = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/11/")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(": delivered") == 2
    subjects = sorted(header(m, "Subject") for m in dovecot.maildir_messages(ALICE))
    assert subjects == sorted(f"Subject: sync {marks[p]}" for p in ("2026/11/a", "2026/11/b"))
    again = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/11/")
    assert again.returncode == 0 and len(dovecot.maildir_messages(ALICE)) == 2
    to_bob = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/10/", "--to", BOB)
    assert to_bob.returncode == 0 and len(dovecot.maildir_messages(BOB)) == 1
    later = sync().run("replay", "--bucket", ARCHIVE, "--since", "2999-01-01")
    assert (later.returncode, later.stdout) == (0, "0 objects, 0 finished, 0 to retry\n")
    foreign = sync().run("replay", "--bucket", ARCHIVE, "--to", "x@elsewhere.test")
    assert foreign.returncode == 2
    assert "--to: 'x@elsewhere.test' is not an address in our domains" in foreign.stderr


def test_replay_of_mail_older_than_the_memory_does_not_deliver_it_again(setup, aws, dovecot):
    """The claims' "done" record lives 15 days (REMEMBER, sized for SQS's retention); replay
    reaches objects of any age: one tagged delivered is skipped, and says so."""
    gate, sync = setup
    mark = uuid.uuid4().hex
    key = f"2026/01/{mark}"
    aws.s3.put_object(Bucket=ARCHIVE, Key=key, Body=stored(mark))
    first = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/01/")
    assert first.returncode == 0, first.stderr
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.tags(key, ARCHIVE)["status"] == "delivered"
    # 16 days later: the store's memory of it has expired
    with sqlite3.connect(gate.root / "data" / "mailgate.sqlite3") as db:
        aged = db.execute("UPDATE state SET expires_at = ? WHERE state_key LIKE 'sync-done:%'",
                          (time.time() - 1,)).rowcount
    assert aged == 1
    again = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/01/")
    assert again.returncode == 0, again.stderr
    assert len(dovecot.maildir_messages(ALICE)) == 1   # the object is tagged delivered
    assert again.stdout.startswith(f"s3://{ARCHIVE}/{key}: delivered: already processed "
                                   "(tagged delivered at ")
    assert f"replay s3://{ARCHIVE}/{key}: delivered: already processed" in again.stderr
    # --to is an explicit copy for one mailbox: delivered whatever the tags say
    to_bob = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/01/", "--to", BOB)
    assert to_bob.returncode == 0 and len(dovecot.maildir_messages(BOB)) == 1


def test_replay_to_an_unknown_mailbox_keeps_the_delivered_tag(setup, aws, dovecot):
    """`--to` a mailbox in our domains that Dovecot does not know is refused (550 5.1.1) and
    said so on stdout; the object's tags still record its real delivery."""
    gate, sync = setup
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=ARCHIVE, Key=f"2026/02/{mark}", Body=stored(mark))
    first = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/02/")
    assert first.returncode == 0, first.stderr
    delivered = aws.tags(f"2026/02/{mark}", ARCHIVE)
    assert delivered["status"] == "delivered"
    typo = sync().run("replay", "--bucket", ARCHIVE, "--prefix", "2026/02/", "--to", DAVE)
    assert f"s3://{ARCHIVE}/2026/02/{mark}: invalid: {DAVE}: 550 5.1.1" in typo.stdout
    assert aws.tags(f"2026/02/{mark}", ARCHIVE) == delivered   # not re-tagged, not even the time
    assert len(dovecot.maildir_messages(ALICE)) == 1


def test_only_the_secret_makes_a_feed_session(setup, aws, dovecot):
    gate, sync = setup
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=15) as client:
        client.ehlo()
        assert client.has_extn("xfeed")
        code, text = client.docmd("XFEED", "SECRET=0123456789abcdef0123 x-ses-spam=pass")
        assert (code, text.split()[0]) == (535, b"5.7.8")
        data = stored(uuid.uuid4().hex)  # SES's headers written by any client: no verdicts
        client.sendmail("a@remote.test", [ALICE], data)
    [delivered] = dovecot.maildir_messages(ALICE)
    assert header(delivered, "X-Test-Feed") == "X-Test-Feed: none"


# ---------------------------------------------------------------- running as a service

@pytest.mark.parametrize("filters", [["filters_for_tests:Slow"]])  # 1.5 s per message
def test_slow_delivery_keeps_its_visibility(setup, aws, dovecot):
    gate, sync = setup
    feed = sync(env={"MAILGATE_SYNC_VISIBILITY_TIMEOUT": "1"}).start()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    wait_until(lambda: aws.left(aws.queue) == 0, SYNC_BOUND, what="the queue drained")
    assert feed.stop() == 0
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert "received again while in flight" not in feed.log_text()


@pytest.mark.parametrize("filters", [["filters_for_tests:Slow"]])  # 1.5 s per message
def test_sigterm_finishes_what_is_in_flight(setup, aws, dovecot):
    gate, sync = setup
    aws.drop_test_event()
    feed = sync().start()
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    # Begun, not only received (what is received but not begun is given back at SIGTERM):
    # serve logs the message's client= line once its DATA is in, then Slow holds it 1.5 s.
    gate.wait_log(r": client=", SYNC_BOUND)
    assert feed.stop() == 0  # SIGTERM while serve's Slow filter holds the message
    assert len(dovecot.maildir_messages(ALICE)) == 1 and aws.left(aws.queue) == 0


@pytest.mark.parametrize("filters", [["filters_for_tests:Slow"]])  # 1.5 s per message
def test_sigterm_gives_back_what_waits_for_a_worker(setup, aws, dovecot):
    """README: SIGTERM "finishes the messages in flight and gives back what it has not begun":
    received messages still waiting for a worker are made visible at once, not delivered
    during the shutdown (systemd's SIGKILL could land mid-injection)."""
    gate, sync = setup
    aws.drop_test_event()
    marks = [uuid.uuid4().hex for _ in range(3)]
    for mark in marks:  # all three in the queue before sync starts: one receive takes them
        aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    feed = sync({"MAILGATE_SYNC_CONCURRENCY": "1", "MAILGATE_SYNC_BATCH": "3",
                 "MAILGATE_SYNC_VISIBILITY_TIMEOUT": "30"}).start()
    wait_until(lambda: aws.counts(aws.queue) == (0, 3), SYNC_BOUND,
               what="the three messages received (one delivering, two waiting for the worker)")
    gate.wait_log(r": client=", SYNC_BOUND)   # the first begun, not only received
    assert feed.stop() == 0   # SIGTERM while the first is in serve's Slow filter
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert aws.counts(aws.queue) == (2, 0)   # given back: visible at once, for the next run
    assert feed.log_text().count("not begun; given back as sync stops") == 2


def test_wait_time_zero_does_not_poll_an_empty_queue_in_a_tight_loop(setup, aws, dovecot, moto):
    """wait_time = 0 is allowed (README: 0-20): an idle queue is asked about once a second,
    not in a tight loop, and mail still comes through."""
    gate, sync = setup
    aws.drop_test_event()

    def requests() -> int:
        return moto.log_text().count('"POST / HTTP')
    feed = sync({"MAILGATE_SYNC_WAIT_TIME": "0"}).start()
    before = requests()
    started = time.monotonic()
    try:
        wait_until(lambda: requests() - before >= 200, 5, interval=0.1,
                   what="200 receives of an empty queue")
        spun = time.monotonic() - started
    except TimeoutError:
        spun = None
    assert spun is None, f"200 ReceiveMessage calls on an empty queue in {spun:.1f} s"
    mark = uuid.uuid4().hex
    aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=stored(mark))
    wait_until(lambda: aws.left(aws.queue) == 0 and dovecot.maildir_messages(ALICE),
               SYNC_BOUND, what="delivered and the queue drained")
    assert feed.stop() == 0
    assert len(dovecot.maildir_messages(ALICE)) == 1


def test_metrics_port_in_use_is_one_line_naming_the_key(setup, aws):
    gate, sync = setup
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = "127.0.0.1:%d" % holder.getsockname()[1]
        proc = sync({"MAILGATE_SYNC_METRICS": address}).run("--once")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1:] == [
        f"mailgate: config error: sync.metrics: cannot listen on {address}: Address already in "
        "use; change sync.metrics or stop what holds that address"]
    assert "Traceback" not in proc.stderr and "failed:" not in proc.stderr


def test_readiness_metrics_and_sigterm(setup, aws, dovecot, peer_root):
    gate, sync = setup
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(peer_root / "notify.sock"))
        notify.settimeout(SYNC_BOUND)
        feed = sync(env={"NOTIFY_SOCKET": str(peer_root / "notify.sock")}).start()
        assert notify.recv(64) == b"READY=1"
        mark = uuid.uuid4().hex
        data = stored(mark)
        aws.s3.put_object(Bucket=BUCKET, Key=f"in/{mark}", Body=data)
        wait_until(lambda: aws.left(aws.queue) == 0, SYNC_BOUND, what="the queue drained")
        url = f"http://{feed.env['MAILGATE_SYNC_METRICS']}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()
        # a message is counted once sync has heard the delete succeed, just after moto shows it
        wait_until(lambda: all(f'result="{r}"}} 1.0' in scrape() for r in ("delivered", "skipped")),
                   SYNC_BOUND, what="both messages counted")
        exposed = scrape()
        assert feed.stop() == 0
        assert notify.recv(64) == b"STOPPING=1"
    queue = f'queue="{QUEUE}"'
    for line in (f'mailgate_sync_messages_total{{{queue},result="delivered"}} 1.0',
                 f'mailgate_sync_messages_total{{{queue},result="skipped"}} 1.0',  # TestEvent
                 f"mailgate_sync_s3_bytes_total {float(len(data))}",
                 "mailgate_sync_injection_seconds_count 1.0",
                 f"mailgate_sync_queue_lag_seconds_count{{{queue}}} 2.0"):
        assert line in exposed.splitlines(), line
    assert "mailgate_messages_total" not in exposed  # serve's metrics live on serve's port
