"""Operations: metrics, health, `mailgate status`, sd_notify, SIGTERM, SIGHUP and log lines.

Each test runs the real `mailgate serve` against a real Dovecot and checks what an operator
checks: HTTP codes and JSON, metric values scraped over HTTP, reply codes, log lines, exit codes.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peers import (REPO, Dovecot, Mailgate, free_port, port_open, smtp_client, smtp_send,
                   toml_dumps, wait_until)
from mailgate.verdict import (FILTER_REJECTED, RELAY_DENIED, SHUTTING_DOWN, UNKNOWN_USER)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
NOBODY = "nobody@example.test"
SENDER = "sender@remote.test"
HELO = "client.ops.test"
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- helpers

def message(mark: str, to: str = ALICE) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: ops {mark}\r\n"
            f"Message-ID: <{mark}@ops.test>\r\n\r\nbody {mark}\r\n").encode()


def smtp(gate: Mailgate) -> smtplib.SMTP:
    return smtp_client(gate.smtp, HELO)


def send(gate: Mailgate, rcpts: list[str], data: bytes) -> tuple[dict, tuple[int, bytes] | None]:
    """One SMTP transaction: {rcpt: (code, text)} and the DATA reply (None if no RCPT passed)."""
    return smtp_send(gate.smtp, SENDER, rcpts, data, HELO)


def reply_is(answer: tuple[int, bytes], reply) -> bool:
    code, text = answer
    return code == reply.code and text.decode().startswith(reply.status + " ")


def with_mark(dovecot: Dovecot, addr: str, mark: str) -> list[bytes]:
    return [m for m in dovecot.maildir_messages(addr) if mark.encode() in m]


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def base_url(gate: Mailgate, section: str) -> str:
    host, port = gate.address(section, "listen")
    return f"http://{host}:{port}"


def status_command(gate: Mailgate) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    environ["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "mailgate", "status", "-c", str(gate.config_path)],
                          capture_output=True, text=True, timeout=30, env=environ,
                          stdin=subprocess.DEVNULL)


def curl_f(url: str) -> int:
    return subprocess.run(["curl", "-fsS", "-o", "/dev/null", "--max-time", "10", url],
                          capture_output=True, timeout=30).returncode


class Scrape:
    """One /metrics scrape, parsed by prometheus-client's own parser."""

    def __init__(self, gate: Mailgate):
        with urllib.request.urlopen(base_url(gate, "metrics") + "/metrics", timeout=10) as r:
            self.families = list(text_string_to_metric_families(r.read().decode()))
        self.samples = [s for f in self.families for s in f.samples]

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape_when_idle(gate: Mailgate) -> Scrape:
    """A scrape taken once no session is open any more (a QUIT's close lands a moment later)."""
    def idle() -> Scrape | None:
        scrape = Scrape(gate)
        return scrape if scrape.get("mailgate_sessions_active") == 0 else None
    return wait_until(idle, 10, what="every session closed")


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


# ---------------------------------------------------------------- metrics

def test_metrics_after_a_known_sequence(dovecot: Dovecot, mailgate_factory) -> None:
    gate = mailgate_factory({"delivery": {"lmtp_connections": 3}})
    before = Scrape(gate)  # the fixture's readiness probes already opened sessions
    sent = [message(uuid.uuid4().hex) for _ in range(4)]

    for data in sent[:3]:
        _, reply = send(gate, [ALICE], data)
        assert reply[0] == 250, reply
    answers, _ = send(gate, ["someone@elsewhere.test"], message("relay"))
    assert reply_is(answers["someone@elsewhere.test"], RELAY_DENIED)
    answers, _ = send(gate, [NOBODY], message("unknown"))
    assert reply_is(answers[NOBODY], UNKNOWN_USER)
    dovecot.stop()
    # Dovecot away (and the pooled connection to it now stale): the maildir fallback takes it.
    _, reply = send(gate, [ALICE], sent[3])
    assert reply[0] == 250, reply
    gate.wait_log(rf"to=<{ALICE}>, relay=maildir, .*dsn=2\.0\.0, status=sent")
    assert len(dovecot.maildir_messages(ALICE)) == 4

    after = scrape_when_idle(gate)
    assert delta(before, after, "mailgate_messages_total", listener="smtp", result="delivered") == 4
    for result in ("partial", "deferred", "rejected"):
        assert delta(before, after, "mailgate_messages_total", result=result) == 0, result
    assert delta(before, after, "mailgate_recipients_total", result="sent") == 4
    assert delta(before, after, "mailgate_recipients_total", result="rejected") == 2
    assert delta(before, after, "mailgate_recipients_total", result="deferred") == 0
    assert after.get("mailgate_fallback_deliveries_total", result="delivered") == 1
    assert after.get("mailgate_fallback_deliveries_total", result="failed") == 0
    assert after.get("mailgate_message_size_bytes_count") == 4
    assert after.get("mailgate_message_size_bytes_sum") == sum(map(len, sent))
    # Only deliveries Dovecot answered are timed as lmtp (the fourth found it stopped);
    # the fallback write on its own.
    assert after.get("mailgate_delivery_duration_seconds_count", relay="lmtp") == 3
    assert after.get("mailgate_delivery_duration_seconds_count", relay="maildir") == 1
    assert after.get("mailgate_message_processing_seconds_count") == 4
    assert delta(before, after, "mailgate_sessions_total", listener="smtp", result="accepted") == 6
    assert after.get("mailgate_lmtp_connections_max") == 3
    assert after.get("mailgate_lmtp_connections_in_use") == 0
    assert after.get("mailgate_errors_total") == 0


def test_metric_names_carry_their_units(mailgate_factory) -> None:
    gate = mailgate_factory()
    _, reply = send(gate, [ALICE], message(uuid.uuid4().hex))
    assert reply[0] == 250
    families = [f for f in Scrape(gate).families  # *_created: prometheus-client's timestamps
                if f.name.startswith("mailgate_") and not f.name.endswith("_created")]
    names = {f.name for f in families}
    assert {"mailgate_messages", "mailgate_recipients", "mailgate_sessions",
            "mailgate_message_size_bytes", "mailgate_delivery_duration_seconds",
            "mailgate_fallback_deliveries", "mailgate_lmtp_connections_max"} <= names, names
    for family in families:
        if family.type in ("histogram", "summary"):
            assert family.name.endswith(("_seconds", "_bytes")), family.name
        if re.search(r"duration|latency|time|processing|delay", family.name):
            assert family.name.endswith("_seconds"), family.name
        if re.search(r"size|length", family.name):
            assert family.name.endswith("_bytes"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name


def test_filter_verdicts_and_durations_are_counted_per_filter(dovecot: Dovecot,
                                                              mailgate_factory) -> None:
    gate = mailgate_factory({"pipeline": {"filters": ["filters_for_ops:Gatekeeper"]}},
                            env={"PYTHONPATH": str(TESTS)})
    mark = uuid.uuid4().hex
    _, reply = send(gate, [ALICE, BOB], message(mark))
    assert reply[0] == 250, reply
    _, reply = send(gate, [CAROL], message(mark, CAROL))
    assert reply_is(reply, FILTER_REJECTED), reply
    assert with_mark(dovecot, CAROL, mark) == [] and len(with_mark(dovecot, ALICE, mark)) == 1

    after = Scrape(gate)
    assert after.get("mailgate_filter_verdicts_total", filter="gatekeeper", action="accept") == 2
    assert after.get("mailgate_filter_verdicts_total", filter="gatekeeper", action="reject") == 1
    assert after.get("mailgate_filter_verdicts_total", filter="gatekeeper") == 3
    assert after.get("mailgate_filter_duration_seconds_count", filter="gatekeeper") == 2
    assert after.get("mailgate_messages_total", result="rejected") == 1
    assert after.get("mailgate_recipients_total", result="bounced") == 1


def test_tcp_probes_do_not_use_up_sessions(mailgate_factory) -> None:
    """A monitor that connects and closes at once (nc -z, a load balancer) frees its slot."""
    gate = mailgate_factory({"listen": {"max_sessions": 2}})
    for _ in range(5):
        socket.create_connection(gate.smtp, timeout=5).close()
    scrape_when_idle(gate)
    with smtp(gate) as client:
        assert client.noop()[0] == 250


# ---------------------------------------------------------------- health and status

def test_health_domains_and_status_follow_dovecot(dovecot: Dovecot, mailgate_factory) -> None:
    gate = mailgate_factory()
    url = base_url(gate, "health")

    code, body = http_get(url + "/health")
    assert code == 200 and body["status"] == "ok", body
    assert body["dovecot"]["answers"] is True
    assert body["dovecot"]["target"] == f"127.0.0.1:{dovecot.lmtp_port}"
    assert body["listeners"] == {"smtp": gate.config["listen"]["smtp"],
                                 "lmtp": gate.config["listen"]["lmtp"]}
    assert curl_f(url + "/health") == 0
    assert http_get(url + "/domains") == (200, {"domains": ["example.test"]})
    assert http_get(url + "/nowhere")[0] == 404
    status = status_command(gate)
    assert status.returncode == 0, status.stdout + status.stderr
    assert ": ok " in status.stdout and "dovecot:   answers" in status.stdout, status.stdout

    dovecot.stop()
    code, body = http_get(url + "/health")
    assert code == 503 and body["status"] != "ok", body
    assert body["dovecot"]["answers"] is False
    assert curl_f(url + "/health") == 22  # curl -f: the HTTP status was >= 400
    status = status_command(gate)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "NOT answering" in status.stdout, status.stdout

    dovecot.start()
    assert http_get(url + "/health")[0] == 200
    gate.stop()
    status = status_command(gate)
    assert status.returncode == 1 and "not answering" in status.stdout, status.stdout


def test_health_and_status_on_ipv6_loopback_as_metrics(dovecot: Dovecot, mailgate_factory) -> None:
    """health.listen = "[::1]:P" passes check-config, as metrics.listen does; serve must listen
    there (http.server's ThreadingHTTPServer alone is AF_INET only) and `mailgate status` ask it."""
    gate = mailgate_factory({"health": {"listen": f"[::1]:{free_port()}"},
                             "metrics": {"listen": f"[::1]:{free_port()}"}})
    host, port = gate.address("health", "listen")
    assert host == "::1"
    code, body = http_get(f"http://[::1]:{port}/health")
    assert code == 200 and body["status"] == "ok", body
    status = status_command(gate)
    assert status.returncode == 0, status.stdout + status.stderr
    assert ": ok " in status.stdout, status.stdout


# ---------------------------------------------------------------- sd_notify (Type=notify)

def datagrams(sock: socket.socket, until: str) -> list[str]:
    """Every sd_notify assignment received up to and including the one equal to `until`."""
    seen: list[str] = []
    while until not in seen:
        seen += sock.recv(4096).decode().split("\n")  # bounded by the socket timeout
    return seen


@pytest.mark.parametrize("form", ["path", "abstract"])
def test_notify_ready_after_listening_and_stopping_on_sigterm(form: str, peer_root: Path,
                                                             mailgate_factory) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(20)
    if form == "path":
        address = str(peer_root / "notify.sock")
        sock.bind(address)
    else:
        address = f"@mailgate-test-{uuid.uuid4().hex}"
        sock.bind("\0" + address[1:])
    with sock, concurrent.futures.ThreadPoolExecutor(1) as pool:
        gate = mailgate_factory(env={"NOTIFY_SOCKET": address}, start=False)
        started = pool.submit(gate.start)
        ready = datagrams(sock, "READY=1")
        # At the moment READY=1 arrives, every listener already accepts connections.
        assert all(port_open(port, host) for host, port in gate.tcp_listeners)
        started.result(timeout=20)
        assert "STOPPING=1" not in ready

        assert gate.stop() == 0, gate.log_text()
        assert "STOPPING=1" in datagrams(sock, "STOPPING=1")


def test_unreachable_notify_socket_does_not_stop_mailgate(peer_root: Path, dovecot: Dovecot,
                                                         mailgate_factory) -> None:
    gate = mailgate_factory(env={"NOTIFY_SOCKET": str(peer_root / "nobody-listens.sock")})
    mark = uuid.uuid4().hex
    _, reply = send(gate, [ALICE], message(mark))
    assert reply[0] == 250, reply
    assert gate.stop() == 0, gate.log_text()
    gate.wait_log(r"mailgate\[\d+\]: stopped$")


# ---------------------------------------------------------------- SIGTERM

def refuses_new_connections(gate: Mailgate) -> str:
    """'refused' or '421' once mailgate no longer takes new sessions; '' while it still does."""
    try:
        with socket.create_connection(gate.smtp, timeout=5) as s:
            line = s.makefile("rb").readline().decode()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:  # accepted by the kernel as the listener closed: no greeting
        return "reset"
    return "421" if line.startswith("421 ") else ""


def test_sigterm_lets_the_transaction_in_flight_finish(dovecot: Dovecot, mailgate_factory) -> None:
    shutdown_timeout = 10
    gate = mailgate_factory({"listen": {"shutdown_timeout": shutdown_timeout}})
    mark = uuid.uuid4().hex
    data = message(mark)
    client = smtp(gate)
    client.mail(SENDER)
    assert client.rcpt(ALICE)[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(data[:40])

    signalled = time.monotonic()
    gate.proc.send_signal(signal.SIGTERM)
    how = wait_until(lambda: refuses_new_connections(gate), 10, what="new connections refused")
    assert how in ("refused", "reset", "421")
    assert gate.running  # still finishing our transaction

    client.send(data[40:] + b".\r\n")
    code, text = client.getreply()
    assert code == 250, text
    assert client.getreply() == (SHUTTING_DOWN.code, str(SHUTTING_DOWN)[4:].encode())
    client.close()
    assert gate.proc.wait(shutdown_timeout + 5) == 0, gate.log_text()
    assert time.monotonic() - signalled < shutdown_timeout + 5
    assert len(with_mark(dovecot, ALICE, mark)) == 1
    gate.wait_log(rf"to=<{ALICE}>, relay=dovecot.*status=sent")
    gate.wait_log(r"mailgate\[\d+\]: stopped$")


def test_sigterm_during_an_lmtp_transaction_says_421_once(dovecot: Dovecot,
                                                           mailgate_factory) -> None:
    """LMTP: one reply per recipient, then ONE 421 4.3.2 and the close (not a 421 each)."""
    gate = mailgate_factory({"listen": {"shutdown_timeout": 10}})
    mark = uuid.uuid4().hex
    data = message(mark)
    client = smtplib.LMTP(*gate.lmtp, local_hostname=HELO, timeout=10)
    client.ehlo()
    client.mail(SENDER)
    assert client.rcpt(ALICE)[0] == 250 and client.rcpt(BOB)[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(data[:40])

    gate.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refuses_new_connections(gate), 10, what="new connections refused")
    client.send(data[40:] + b".\r\n")
    replies = [client.getreply() for _ in range(3)]
    assert [code for code, _ in replies] == [250, 250, SHUTTING_DOWN.code], replies
    assert replies[2][1] == str(SHUTTING_DOWN)[4:].encode()
    assert client.file.read() == b""  # closed, with nothing after the one 421
    client.close()
    assert gate.proc.wait(15) == 0, gate.log_text()
    assert len(with_mark(dovecot, ALICE, mark)) == len(with_mark(dovecot, BOB, mark)) == 1


def test_sigterm_gives_up_on_a_stalled_transaction_after_the_timeout(dovecot: Dovecot,
                                                                     mailgate_factory) -> None:
    shutdown_timeout = 2
    gate = mailgate_factory({"listen": {"shutdown_timeout": shutdown_timeout}})
    mark = uuid.uuid4().hex
    client = smtp(gate)
    client.mail(SENDER)
    client.rcpt(ALICE)
    assert client.docmd("DATA")[0] == 354
    client.send(message(mark)[:40])  # and never the rest

    signalled = time.monotonic()
    gate.proc.send_signal(signal.SIGTERM)
    assert gate.proc.wait(shutdown_timeout + 5) == 0, gate.log_text()
    assert time.monotonic() - signalled >= shutdown_timeout - 0.1  # it did wait for us
    assert client.getreply()[0] == SHUTTING_DOWN.code
    client.close()
    assert with_mark(dovecot, ALICE, mark) == []
    gate.wait_log(r"warning: shutdown: 1 transactions still running")


def test_sigterm_tells_an_idle_session_421_and_exits_quickly(mailgate_factory) -> None:
    gate = mailgate_factory({"listen": {"shutdown_timeout": 30}})
    client = smtp(gate)
    signalled = time.monotonic()
    gate.proc.send_signal(signal.SIGTERM)
    code, text = client.getreply()
    assert code == SHUTTING_DOWN.code
    assert text.decode() == f"{SHUTTING_DOWN.status} {SHUTTING_DOWN.text}"
    client.close()
    assert gate.proc.wait(10) == 0, gate.log_text()
    assert time.monotonic() - signalled < 10  # no message in flight: no waiting for the timeout


# ---------------------------------------------------------------- SIGHUP

def reloads(gate: Mailgate, what: str) -> int:
    return gate.log_text().count(what)


def sighup(gate: Mailgate, expect: str) -> None:
    count = reloads(gate, expect)
    gate.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(gate, expect) > count, 10, what=f"mailgate log ~ {expect!r}")


def test_sighup_reloads_domains_without_dropping_sessions(dovecot: Dovecot,
                                                          mailgate_factory) -> None:
    dave = "dave@other.test"
    dovecot.add_user(dave)
    gate = mailgate_factory()
    early = smtp(gate)  # opened before the reload, used after it
    answers, _ = send(gate, [dave], message("before"))
    assert reply_is(answers[dave], RELAY_DENIED)

    config = copy.deepcopy(dict(gate.config))
    config["domains"] = ["example.test", "other.test"]
    gate.config_path.write_text(toml_dumps(config))
    sighup(gate, "reloaded config")

    mark = uuid.uuid4().hex
    early.mail(SENDER)
    assert early.rcpt(dave)[0] == 250
    assert early.data(message(mark, dave))[0] == 250
    _, reply = send(gate, [dave, ALICE], message(mark, dave))
    assert reply[0] == 250
    assert len(with_mark(dovecot, dave, mark)) == 2
    assert http_get(base_url(gate, "health") + "/domains")[1] == {
        "domains": ["example.test", "other.test"]}

    config["no_such_key"] = 1
    gate.config_path.write_text(toml_dumps(config))
    sighup(gate, "reload refused, keeping the running config")
    gate.wait_log(r"reload refused, keeping the running config: no_such_key")
    assert gate.running
    early.mail(SENDER)
    assert early.rcpt(dave)[0] == 250
    assert early.data(message(mark + "-after", dave))[0] == 250
    early.quit()
    assert len(with_mark(dovecot, dave, mark + "-after")) == 1
    assert http_get(base_url(gate, "health") + "/domains")[1]["domains"] == [
        "example.test", "other.test"]


def last_reload(gate: Mailgate) -> str:
    return [line for line in gate.log_text().splitlines() if "reloaded config" in line][-1]


def test_sighup_size_limit_applies_to_sessions_already_open(dovecot: Dovecot,
                                                             mailgate_factory) -> None:
    """A session opened before the reload is told the new SIZE at its next EHLO and held to
    that same limit, not to the one of its start."""
    gate = mailgate_factory({"limits": {"message_size": 1000}})
    early = smtp(gate)
    config = copy.deepcopy(dict(gate.config))
    config["limits"] = {**config.get("limits", {}), "message_size": 5000}
    gate.config_path.write_text(toml_dumps(config))
    sighup(gate, "reloaded config")
    early.ehlo("client.test")
    assert early.esmtp_features["size"] == "5000"
    mark = uuid.uuid4().hex
    data = message(mark) + b"x" * 76 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 30
    assert 1000 < len(data) <= 5000
    assert early.mail(SENDER, [f"SIZE={len(data)}"])[0] == 250
    assert early.rcpt(ALICE)[0] == 250
    assert early.data(data)[0] == 250
    early.quit()
    assert len(with_mark(dovecot, ALICE, mark)) == 1


def test_sighup_keeps_restart_only_keys_and_health_asks_the_running_dovecot(
        dovecot: Dovecot, mailgate_factory) -> None:
    """A reload cannot move the LMTP pool, the store, the resolver, the relay or data_dir: it
    keeps them as they run and says so, each time, compared with what runs (not with the file
    read before); /health asks the Dovecot the pool delivers to."""
    gate = mailgate_factory()
    running = gate.config["delivery"]["lmtp"]
    config = copy.deepcopy(dict(gate.config))
    moved = copy.deepcopy(config)
    moved["delivery"]["lmtp"] = f"127.0.0.1:{free_port()}"   # nothing answers there
    moved["data_dir"] = str(gate.root / "elsewhere")
    moved.update(store={"timeout": 3}, dns={"timeout": 1.5}, relay={"timeout": 7},
                 listen={**config["listen"], "max_sessions": 50})  # max_sessions: applied
    gate.config_path.write_text(toml_dumps(moved))
    sighup(gate, "reloaded config")
    restart = ("reloaded config; needs a restart to change: data_dir, delivery.lmtp, "
               "store.timeout, dns.timeout, relay.timeout")
    assert last_reload(gate).endswith(restart), last_reload(gate)

    code, body = http_get(base_url(gate, "health") + "/health")
    assert (code, body["status"], body["dovecot"]["target"]) == (200, "ok", running), body
    mark = uuid.uuid4().hex
    _, reply = send(gate, [ALICE], message(mark))
    assert reply[0] == 250 and len(with_mark(dovecot, ALICE, mark)) == 1

    sighup(gate, "reloaded config")  # the same file again: still not applied, still said
    assert last_reload(gate).endswith(restart), last_reload(gate)
    gate.config_path.write_text(toml_dumps(config))  # back to what runs: nothing to restart for
    sighup(gate, "reloaded config")
    assert last_reload(gate).endswith("]: reloaded config"), last_reload(gate)
    assert http_get(base_url(gate, "health") + "/health")[1]["dovecot"]["target"] == running


# ---------------------------------------------------------------- log lines

def test_log_lines_read_like_postfix(dovecot: Dovecot, mailgate_factory) -> None:
    gate = mailgate_factory()
    mark = uuid.uuid4().hex
    data = message(mark)
    answers, (code, text) = send(gate, [ALICE, NOBODY, "x@elsewhere.test"], data)
    assert code == 250 and reply_is(answers[NOBODY], UNKNOWN_USER)
    queue_id = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", text.decode()).group(1)

    prefix = rf"^[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d mailgate\[{gate.pid}\]: "  # as Postfix's maillog
    gate.wait_log(prefix + rf"NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.1\]: 550 5\.1\.1 "
                  rf"<{NOBODY}>: Recipient address rejected: User unknown; from=<{SENDER}> "
                  rf"to=<{NOBODY}> proto=ESMTP helo=<{HELO}>$")
    gate.wait_log(prefix + r"NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.1\]: 550 5\.7\.1 "
                  r"<x@elsewhere\.test>: Relay access denied; ")
    gate.wait_log(prefix + rf"{queue_id}: client=localhost\[127\.0\.0\.1\]$")
    gate.wait_log(prefix + rf"{queue_id}: from=<{SENDER}>, size={len(data)}, nrcpt=1$")
    line = gate.wait_log(
        prefix + rf"{queue_id}: from=<{SENDER}>, to=<{ALICE}>, "
        rf"relay=dovecot\[127\.0\.0\.1:{dovecot.lmtp_port}\], delay=([\d.e+-]+), dsn=2\.0\.0, "
        rf"status=sent \(250 2\.0\.0 <{ALICE}> \S+ Saved\)$")
    assert float(line.group(1)) >= 0
    assert gate.log_text().count(f"{queue_id}: from=<{SENDER}>, to=") == 1


def test_a_messages_first_line_is_its_client_line(dovecot: Dovecot, mailgate_factory) -> None:
    """As in Postfix's log, grep of a queue id starts with client= and from=: what delivery
    says on the way (here the maildir fallback, Dovecot stopped) comes after them."""
    gate = mailgate_factory()
    dovecot.stop()
    _, (code, text) = send(gate, [ALICE], message(uuid.uuid4().hex))
    assert code == 250, text
    queue_id = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", text.decode()).group(1)
    gate.wait_log(rf"{queue_id}: from=<{SENDER}>, to=<{ALICE}>, relay=maildir, .*status=sent")
    lines = [line.split(f"{queue_id}: ", 1)[1] for line in gate.log_text().splitlines()
             if f"{queue_id}: " in line]
    assert lines[0].startswith("client=") and lines[1].startswith(f"from=<{SENDER}>, size="), lines
    assert any(line.startswith("Dovecot did not take") for line in lines[2:]), lines


def test_syslog_lines_go_to_facility_mail(dovecot: Dovecot, mailgate_factory, peer_root) -> None:
    """With log.syslog on, the same lines reach the syslog socket as mail.info (<22>)."""
    path = peer_root / "syslog.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(10)
        gate = mailgate_factory({"log": {"syslog": True, "syslog_socket": str(path)}})
        mark = uuid.uuid4().hex
        _, (code, text) = send(gate, [ALICE], message(mark))
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
        wanted = f"<22>mailgate[{gate.pid}]: {queue_id}: from=<{SENDER}>, to=<{ALICE}>, relay=dovecot"
        for _ in range(50):  # bounded: the ready line, client=, from= come first
            datagram = syslog.recv(65536).decode().rstrip("\0")
            if datagram.startswith(wanted):
                assert "status=sent" in datagram
                break
        else:
            pytest.fail(f"no syslog line starting {wanted!r}")
