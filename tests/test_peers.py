"""The fixtures themselves against the real peers: if these fail, no other result means much."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given, strategies as st

from peers import (Dovecot, Moto, PeerError, Postfix, descendants, free_port, lmtp_rcpt,
                   lmtp_send, pid_alive, port_open, swaks, toml_dumps, wait_until)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
NOBODY = "nobody@example.test"
SENDER = "sender@remote.test"


def message(marker: str) -> str:
    return (f"From: <{SENDER}>\nTo: <{ALICE}>\nSubject: peers {marker}\nMessage-ID: <{marker}@t>\n"
            f"\nbody {marker}\n.a line that starts with a dot\n")


def marker() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- Dovecot

def test_dovecot_lmtp_replies_per_recipient_and_mail_is_readable(dovecot: Dovecot) -> None:
    mark = marker()
    rcpt_replies, data_replies = lmtp_send("127.0.0.1", dovecot.lmtp_port, SENDER,
                                           [ALICE, NOBODY, BOB], message(mark))

    assert rcpt_replies[ALICE][0] == 250 and rcpt_replies[BOB][0] == 250
    assert rcpt_replies[NOBODY][0] == 550 and rcpt_replies[NOBODY][1].startswith("5.1.1 ")
    assert [code for code, _ in data_replies] == [250, 250]
    assert f"<{ALICE}>" in data_replies[0][1] and f"<{BOB}>" in data_replies[1][1]
    for addr in (ALICE, BOB):
        [on_disk] = dovecot.maildir_messages(addr)
        [over_imap] = dovecot.fetch_imap(addr)
        assert f"body {mark}".encode() in on_disk
        assert b"\r\n.a line that starts with a dot\r\n" in over_imap
    assert not dovecot.maildir(NOBODY).exists()


def test_dovecot_lmtp_unix_socket(dovecot: Dovecot) -> None:
    rcpt_replies, data_replies = lmtp_send(str(dovecot.lmtp_socket), None, SENDER, [CAROL],
                                           message(marker()))
    assert rcpt_replies == {CAROL: (250, "2.1.5 OK")}
    assert [code for code, _ in data_replies] == [250]
    assert len(dovecot.maildir_messages(CAROL)) == 1


def test_dovecot_unwritable_tmp_defers_only_that_recipient(dovecot: Dovecot) -> None:
    tmp = dovecot.maildir(BOB) / "tmp"
    tmp.chmod(0o000)
    try:
        _, data_replies = lmtp_send("127.0.0.1", dovecot.lmtp_port, SENDER, [ALICE, BOB, CAROL],
                                    message(marker()))
    finally:
        tmp.chmod(0o700)
    assert [code for code, _ in data_replies] == [250, 451, 250]
    assert data_replies[1][1].startswith("4.2.0 ")
    assert len(dovecot.maildir_messages(ALICE)) == 1 and dovecot.maildir_messages(BOB) == []


def test_dovecot_maildirs_belong_to_vmail(dovecot: Dovecot) -> None:
    for sub in ("", "cur", "new", "tmp"):
        info = (dovecot.maildir(ALICE) / sub).stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (5000, 5000, 0o700)


def test_dovecot_add_user_while_running_and_restart(dovecot: Dovecot) -> None:
    dave = "dave@example.test"
    assert lmtp_rcpt("127.0.0.1", dovecot.lmtp_port, dave)[0] == 550
    dovecot.add_user(dave)
    assert lmtp_rcpt("127.0.0.1", dovecot.lmtp_port, dave)[0] == 250

    dovecot.restart()
    _, data_replies = lmtp_send("127.0.0.1", dovecot.lmtp_port, SENDER, [dave], message(marker()))
    assert [code for code, _ in data_replies] == [250]
    assert len(dovecot.fetch_imap(dave)) == 1


def test_dovecot_stop_leaves_no_process_or_port(peer_root: Path) -> None:
    server = Dovecot(peer_root, [ALICE])
    server.start()
    try:
        procs = descendants(server.master_pid) | {server.master_pid}
    finally:
        server.stop()
    assert not any(pid_alive(pid) for pid in procs)
    assert not port_open(server.lmtp_port) and not port_open(server.imap_port)
    server.stop()  # a second stop is harmless


# ---------------------------------------------------------------- Postfix

def test_postfix_delivers_to_dovecot_over_lmtp(postfix: Postfix, dovecot: Dovecot) -> None:
    postfix.use_virtual_lmtp(dovecot.lmtp_port)
    postfix.start()
    mark = marker()
    sent = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--from", SENDER, "--to", ALICE,
                 "--header", f"Subject: peers {mark}")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    line = postfix.wait_log(rf"to=<{ALICE}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{dovecot.lmtp_port}"
                            r".*status=(\w+)")
    assert line.group(1) == "sent"
    wait_until(postfix.queue_empty, 10, what="postfix queue empty")
    [delivered] = dovecot.maildir_messages(ALICE)
    assert f"Subject: peers {mark}".encode() in delivered


def test_postfix_content_filter_sends_xforward(postfix: Postfix, peer_root: Path) -> None:
    """Mode B: the `scan` transport hands the queue file to [127.0.0.1]:PORT with XFORWARD."""
    port = free_port()
    out = peer_root / "smtp-sink.out"
    with open(out, "w") as f:
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-v", f"127.0.0.1:{port}", "10"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port), 10, what="smtp-sink listening")
        postfix.use_content_filter(port)
        postfix.start()
        sent = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--from", SENDER, "--to", BOB)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        line = postfix.wait_log(rf"to=<{BOB}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}"
                                r".*status=(\w+)")
        assert line.group(1) == "sent"
        assert "XFORWARD" in out.read_text() and "ADDR=127.0.0.1" in out.read_text()
    finally:
        sink.terminate()
        sink.wait(10)


def test_postfix_set_main_rejects_typos(postfix: Postfix) -> None:
    with pytest.raises(PeerError, match="virtual_trasnport"):
        postfix.set_main(virtual_trasnport="lmtp:inet:127.0.0.1:1")


# ---------------------------------------------------------------- mailgate runner

STUB = '''\
"""Throwaway stand-in for `python -m mailgate serve -c FILE`: listens, exits 0 on SIGTERM."""
import asyncio, os, signal, sys, tomllib

config = tomllib.loads(open(sys.argv[3]).read())
print("stub config", config, file=sys.stderr, flush=True)
if os.environ.get("STUB_EXIT"):
    sys.exit(int(os.environ["STUB_EXIT"]))


async def main():
    async def greet(reader, writer):
        writer.write(b"220 stub\\r\\n")
        writer.close()

    if os.environ.get("STUB_DEAF"):
        await asyncio.Event().wait()
    for section, key in (("listen", "smtp"), ("listen", "lmtp"), ("listen", "lookup"),
                         ("metrics", "listen"), ("health", "listen")):
        if config.get(section, {}).get(key):
            host, _, port = config[section][key].rpartition(":")
            await asyncio.start_server(greet, host, int(port))
    stop = asyncio.Event()
    if os.environ.get("STUB_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print("stub stopping", file=sys.stderr, flush=True)

asyncio.run(main())
'''


@pytest.fixture
def stub_env(peer_root: Path) -> dict[str, str]:
    """PYTHONPATH with a stub `mailgate` package that shadows the real one (outside the repo)."""
    package = peer_root / "stub" / "mailgate"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STUB)
    return {"PYTHONPATH": str(package.parent)}


def test_mailgate_runner_starts_waits_and_stops(mailgate_factory, stub_env, dovecot) -> None:
    gate = mailgate_factory({"listen": {"lmtp": ""}, "limits": {"max_recipients": 5}}, env=stub_env)
    written = tomllib.loads(gate.config_path.read_text())
    assert written["listen"]["lmtp"] == "" and written["limits"] == {"max_recipients": 5}
    assert written["delivery"]["lmtp"] == f"127.0.0.1:{dovecot.lmtp_port}"
    assert gate.lmtp is None and len(gate.tcp_listeners) == 4
    assert all(port_open(port, host) for host, port in gate.tcp_listeners)
    gate.wait_log("stub config")

    assert gate.stop() == 0
    assert "stub stopping" in gate.log_text() and not port_open(gate.smtp[1])


def test_mailgate_runner_reports_early_exit(mailgate_factory, stub_env) -> None:
    with pytest.raises(PeerError, match=r"exited 3 at start(.|\n)*stub config"):
        mailgate_factory(env={**stub_env, "STUB_EXIT": "3"})


def test_mailgate_runner_kills_what_never_listens(mailgate_factory, stub_env) -> None:
    gate = mailgate_factory(env={**stub_env, "STUB_DEAF": "1"}, start=False)
    with pytest.raises(PeerError, match=r"mailgate listening: not true(.|\n)*stub config"):
        gate.start(timeout=0.5)
    assert not gate.running and gate.proc.returncode == -signal.SIGKILL


def test_mailgate_runner_kills_what_ignores_sigterm(mailgate_factory, stub_env) -> None:
    gate = mailgate_factory(env={**stub_env, "STUB_IGNORE_TERM": "1"})
    with pytest.raises(PeerError, match="still running"):
        gate.stop(timeout=0.5)
    assert not gate.running and gate.stop() == -signal.SIGKILL


@pytest.mark.skipif(not (Path(__file__).parent.parent / "mailgate" / "__main__.py").exists(),
                    reason="python -m mailgate does not exist yet")
def test_real_mailgate_serves_with_the_base_config(mailgate_factory) -> None:
    gate = mailgate_factory()
    assert len(gate.tcp_listeners) == 5
    assert all(port_open(port, host) for host, port in gate.tcp_listeners)
    assert gate.stop() == 0, gate.log_text()
    assert not any(port_open(port, host) for host, port in gate.tcp_listeners)


# ---------------------------------------------------------------- small helpers

toml_scalars = (st.text(max_size=20) | st.integers(-2**63, 2**63 - 1) | st.booleans()
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.lists(st.text(max_size=10), max_size=4))
toml_keys = st.text(min_size=1, max_size=8)
toml_tables = st.recursive(st.dictionaries(toml_keys, toml_scalars, max_size=4),
                           lambda tables: st.dictionaries(toml_keys, tables | toml_scalars,
                                                          max_size=4),
                           max_leaves=12)


@given(toml_tables)
@example({"0\n": ""})  # a key ending in a newline once passed for a bare key
def test_toml_dumps_round_trips(table: dict) -> None:
    assert tomllib.loads(toml_dumps(table)) == table


def test_wait_until_is_bounded() -> None:
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, 0.05, what="never")
    assert wait_until(lambda: 42, 0.05) == 42


def test_free_port_is_not_handed_out_twice() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20 and not any(port_open(p) for p in ports)


# ---------------------------------------------------------------- moto

def test_moto_whose_port_another_server_took_moves_to_a_free_one(peer_root: Path) -> None:
    """Test processes pick ports independently: a Dovecot may take moto's port first."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    stop = threading.Event()

    def greet() -> None:  # answers like Dovecot does, which moto's readiness probe must not take
        squatter.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = squatter.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"220 vm Dovecot (Debian) ready.\r\n")
    threading.Thread(target=greet, daemon=True).start()
    moto = Moto(peer_root / "moto")
    taken = moto.port = squatter.getsockname()[1]
    try:
        moto.start()
        assert moto.port != taken
        assert moto.client("sqs").list_queues().get("QueueUrls", []) == []
    finally:
        moto.stop()
        stop.set()
        squatter.close()


def test_free_port_never_hands_one_port_to_two_test_processes() -> None:
    """pytest -n runs several processes; each picks ports with free_port(). Without a shared
    memory two of them picked the same one about once a suite (moto met Dovecot's greeting)."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from peers import free_port; "
              "print(' '.join(str(free_port()) for _ in range(600)))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    picked = [set(map(int, proc.communicate(timeout=120)[0].split())) for proc in procs]
    assert [len(p) for p in picked] == [600, 600]
    assert picked[0] & picked[1] == set()
