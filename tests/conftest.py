"""Fixtures that run the real peers (Dovecot, Postfix, mailgate) on loopback in a temp root.

Every fixture stops what it started in its finalizer, also when the test failed; on failure the
peers' logs are attached to the report.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

# peers.py sits next to this file; keep it importable whatever import mode pytest is given.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from faultproxy import FaultProxy  # noqa: E402
from peers import Dovecot, Mailgate, Moto, Postfix, free_port  # noqa: E402
from relaysink import RelaySink  # noqa: E402

USERS = ["alice@example.test", "bob@example.test", "carol@example.test"]
LOG_TAIL = 20_000  # characters of each peer's log shown with a failure
PEERS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts Postfix or takes more than a few seconds")
    config.addinivalue_line("markers", "load: a load case that bounds latency; the test "
                                       "command runs these alone, after the others")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failure, show the log of every peer the test used, next to the traceback."""
    if call.excinfo is not None and call.when in ("setup", "call"):
        for name, peer in item.stash.get(PEERS, []):
            text = peer.log_text()
            if text:
                item.add_report_section(call.when, f"{name} log", text[-LOG_TAIL:])
    return (yield)


def register(request: pytest.FixtureRequest, name: str, peer) -> None:
    request.node.stash.setdefault(PEERS, []).append((name, peer))


def _traversable_root(prefix: str) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def peer_root() -> Iterator[Path]:
    """A temp root the vmail and postfix users can traverse (pytest's tmp_path is 0700)."""
    yield from _traversable_root("mg-")


@pytest.fixture(scope="module")
def module_root() -> Iterator[Path]:
    """A temp root for the peers one test module shares (traversable by vmail and postfix)."""
    yield from _traversable_root("mg-module-")


@pytest.fixture(scope="module")
def dove(module_root: Path) -> Iterator[Dovecot]:
    """One started Dovecot (alice, bob, carol) for a whole test module: cheaper than `dovecot`
    for tests that only deliver and read back."""
    server = Dovecot(module_root, USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dovecot(peer_root: Path, request: pytest.FixtureRequest) -> Iterator[Dovecot]:
    """A started Dovecot with alice, bob and carol @example.test (password "secret")."""
    server = Dovecot(peer_root, USERS)
    register(request, "dovecot", server)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the dovecot fixture's LMTP port (see tests/faultproxy.py)."""
    proxy = FaultProxy(dovecot.lmtp_port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def postfix(peer_root: Path, request: pytest.FixtureRequest) -> Iterator[Postfix]:
    """A configured but NOT started Postfix for example.test: set its mode, then `start()`."""
    server = Postfix(peer_root, domains=["example.test"])
    register(request, "postfix", server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto(peer_root: Path, request: pytest.FixtureRequest) -> Iterator[Moto]:
    """A started moto server (S3, SQS, SNS, DynamoDB, SES over real HTTP on loopback)."""
    server = Moto(peer_root / "moto")
    register(request, "moto", server)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def relay(request: pytest.FixtureRequest) -> Iterator[RelaySink]:
    """A started SMTP relay sink (aiosmtpd) on loopback: what mailgate forwards and replies to."""
    sink = RelaySink()
    try:
        yield sink.start()
    finally:
        sink.stop()


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, tables merged key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_config(root: Path, dovecot: Dovecot) -> dict[str, Any]:
    return {
        "hostname": "mx.example.test",
        "domains": ["example.test"],
        "data_dir": str(root / "data"),
        "listen": {"smtp": f"127.0.0.1:{free_port()}", "lmtp": f"127.0.0.1:{free_port()}",
                   "lookup": f"127.0.0.1:{free_port()}"},
        "delivery": {"lmtp": f"127.0.0.1:{dovecot.lmtp_port}",
                     "maildir": dovecot.maildir_template},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
    }


MailgateFactory = Callable[..., Mailgate]


@pytest.fixture
def mailgate_factory(peer_root: Path, dovecot: Dovecot,
                     request: pytest.FixtureRequest) -> Iterator[MailgateFactory]:
    """`factory(overrides=None, *, env=None, start=True, user=None) -> Mailgate`, on the dovecot
    fixture. `user="vmail"` runs it as that user (from a copy of the source; see peers.Mailgate).

    Each call gets its own directory, data_dir and free ports; all are stopped at teardown.
    """
    started: list[Mailgate] = []

    def factory(overrides: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
                start: bool = True, user: str | None = None) -> Mailgate:
        root = peer_root / f"mailgate-{len(started)}"
        root.mkdir()
        gate = Mailgate(root, merge(base_config(root, dovecot), overrides or {}), env=env,
                        user=user)
        started.append(gate)
        register(request, root.name, gate)
        return gate.start() if start else gate

    try:
        yield factory
    finally:
        errors = []
        for gate in started:  # every one is stopped even if an earlier stop failed
            try:
                gate.stop(timeout=10)
            except Exception as e:  # re-raised below, after the others are stopped
                errors.append(e)
        if errors:
            raise errors[0]
