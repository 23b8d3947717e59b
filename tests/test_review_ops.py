"""Review of the operations part: each test here failed on the code it was written against."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from backends import cli
from conftest import USERS
from mailgate.config import load
from mailgate.store import open_store
from peers import Mailgate, wait_until

ALICE, BOB, CAROL = USERS
FRIEND = "friend@elsewhere.test"
TESTS = Path(__file__).parent


def test_doctor_finds_no_address_mappings_before_mailgate(tmp_path: Path) -> None:
    """FILTER_README's content-filter recipe puts receive_override_options=no_address_mappings
    on the smtpd that has the content_filter (and the shipped main.cf snippet warns against it:
    "virtual aliases must be expanded before the filter"). mailgate delivers itself and nothing
    expands them afterwards, so postmaster@ (the guide's alias) reaches mailgate unexpanded and
    is refused 550 5.1.1 after Postfix queued it: a bounce. doctor says "no problems found"."""
    from test_doctor import build
    site = build(tmp_path, "content-filter")
    site.postconf("-P", "smtp/inet/receive_override_options=no_address_mappings")
    result = site.doctor()
    assert result.returncode == 1, result.stdout
    assert "no_address_mappings" in result.stdout, result.stdout


def test_health_listens_on_ipv6_loopback_as_metrics_does(dovecot, mailgate_factory) -> None:
    """health.listen = "[::1]:P" passes check-config (as metrics.listen does, which works), but
    http.server's ThreadingHTTPServer is AF_INET only: serve exits 2 with "cannot listen on
    [::1]:P: Unknown error -9; ... stop what holds that address", nothing holding it."""
    import json
    import urllib.request
    from peers import PeerError, free_port
    gate = mailgate_factory({"health": {"listen": f"[::1]:{free_port()}"},
                             "metrics": {"listen": f"[::1]:{free_port()}"}}, start=False)
    try:
        gate.start()
    except PeerError as e:
        raise AssertionError(str(e).splitlines()[-1]) from None
    host, port = gate.address("health", "listen")
    with urllib.request.urlopen(f"http://[{host}]:{port}/health", timeout=10) as response:
        assert json.load(response)["status"] == "ok"
