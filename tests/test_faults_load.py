"""Load: 200 concurrent 1 MB sessions against a cap of 50; 500 slowloris connections.

Marked `load`: the normal `python3 -m pytest -q tests` runs them (about a minute in all here);
`-m 'not load'` leaves them out while developing. Figures for speed live in bench/, not here:
these assert outcomes (exactly once, closed, back to baseline) and one bound the issue sets,
the event loop's lag p99 under 100 ms, read from mailgate's own metric.
"""
from __future__ import annotations

import os
import random
import selectors
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import USERS
from faultkit import (ALICE, SENDER, Raw, assert_reply, big_body, maildir_files, message, send,
                      token)
from peers import wait_until

pytestmark = pytest.mark.load


def scrape(gate) -> dict[tuple[str, tuple], float]:
    host, port = gate.address("metrics", "listen")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def lag_share_under(before: dict, after: dict, bound: str) -> tuple[float, float]:
    """(share of event-loop ticks between two scrapes that were late by at most `bound` s,
    number of ticks)."""
    def delta(name: str, labels: tuple = ()) -> float:
        key = ("mailgate_event_loop_lag_seconds" + name, labels)
        return after.get(key, 0) - before.get(key, 0)
    ticks = delta("_count")
    return delta("_bucket", (("le", bound),)) / ticks, ticks


def tokens_in(dovecot, addr: str) -> list[str]:
    """The token of every message in addr's maildir (read from each file's head only)."""
    found = []
    for path in maildir_files(dovecot, addr):
        with open(path, "rb") as f:
            head = f.read(4096)
        found += [line.split()[1].decode() for line in head.splitlines() if line.startswith(b"token ")]
    return found


def test_200_sessions_of_1mb_over_a_cap_of_50_each_delivered_once(dovecot, mailgate_factory):
    gate = mailgate_factory({"listen": {"max_sessions": 50}})
    body = big_body(1 << 20)
    marks = [token() for _ in range(200)]
    before = scrape(gate)
    at_once = threading.Barrier(200, timeout=60)

    def one(i: int) -> int:
        """Send marks[i] as an MTA would: a 421 at connect means try again a moment later.
        (A raw session: smtplib's per-message regexes would take the CPU mailgate needs.)"""
        at_once.wait()  # 200 sessions at the same moment, not as threads happen to start
        for attempt in range(200):  # bounded; each refusal is answered at once
            session = Raw(gate.smtp, timeout=120)
            greeting = session.reply()
            if greeting[0] == 421:
                session.close()
                time.sleep(random.uniform(0.05, 0.3))  # the client's back-off, not a sync wait
                continue
            assert greeting[0] == 220, greeting
            rcpt = USERS[i % 3]
            assert session.command("EHLO client.test")[0] == 250
            assert_reply(session.command(f"MAIL FROM:<{SENDER}>"), "250 2.1.0")
            assert_reply(session.command(f"RCPT TO:<{rcpt}>"), "250 2.1.5")
            assert session.command("DATA")[0] == 354
            session.sock.sendall(message(marks[i], rcpt, body) + b".\r\n")  # nothing to stuff
            assert_reply(session.reply(), "250 2.0.0")
            session.close()
            return attempt
        raise AssertionError(f"message {i} never got a session")

    with ThreadPoolExecutor(200) as pool:
        refusals = sum(pool.map(one, range(200)))
    after = scrape(gate)

    assert refusals > 0  # the cap was reached: the case was exercised
    stored = {addr: tokens_in(dovecot, addr) for addr in USERS}
    assert sum(map(len, stored.values())) == 200
    for i, mark in enumerate(marks):  # each exactly once, and where it was sent
        assert stored[USERS[i % 3]].count(mark) == 1, mark
    share, ticks = lag_share_under(before, after, "0.1")
    assert ticks > 100 and share >= 0.99, (share, ticks)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_500_slowloris_connections_are_closed_by_the_deadline(dovecot, mailgate_factory):
    """250 connections greet and go silent; 250 send a byte every half second and never end
    the line. All get 421 4.4.2 and are closed within twice command_timeout; meanwhile mail
    is delivered; afterwards mailgate holds no more descriptors than before."""
    timeout = 2
    gate = mailgate_factory({"listen": {"max_sessions": 600, "command_timeout": timeout}})
    assert_reply(send(gate, [ALICE], message(token()))[1], "250 2.0.0")  # pool, caches warm
    baseline = fds(gate.pid)
    sockets = [socket.create_connection(gate.smtp, timeout=10) for _ in range(500)]
    tricklers = set(sockets[250:])
    received = {s: b"" for s in sockets}
    closed_after: dict[socket.socket, float] = {}
    selector = selectors.DefaultSelector()
    for s in sockets:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    started = next_byte = time.monotonic()
    delivered = False
    while len(closed_after) < len(sockets) and time.monotonic() - started < 30:  # bounded
        now = time.monotonic()
        if now >= next_byte:  # the slowloris's pace
            for s in tricklers - closed_after.keys():
                try:
                    s.send(b"E")
                except OSError:
                    pass
            next_byte = now + 0.5
        if not delivered and now - started > timeout / 2:  # others are still served
            assert_reply(send(gate, [ALICE], message(token()))[1], "250 2.0.0")
            delivered = True
        for key, _ in selector.select(timeout=0.1):
            data = key.fileobj.recv(4096)
            received[key.fileobj] += data
            if not data:
                closed_after[key.fileobj] = time.monotonic() - started
                selector.unregister(key.fileobj)
    for s in sockets:
        s.close()
    assert delivered and len(closed_after) == 500
    for s, data in received.items():
        assert data.startswith(b"220 ") and b"\r\n421 4.4.2 " in data, data
    assert max(closed_after[s] for s in tricklers) < 2 * timeout + 3
    wait_until(lambda: fds(gate.pid) <= baseline, 10, what="descriptors back to the baseline")
