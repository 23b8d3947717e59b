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
