"""Start-up, reload and shutdown under faults: a port in use, an unwritable data_dir, a SIGTERM
as soon as the ports answer, a config file broken at SIGHUP, SIGTERM with 20 sessions in flight.

What is checked is what an operator sees: the exit status, the one line on stderr, the log,
/health's JSON and `mailgate status`, and the mail in the maildirs.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from faultkit import ALICE, Raw, assert_reply, copies, maildir_files, message, send, token
from peers import REPO, UNPRIVILEGED_PYTHON, VMAIL_GID, port_open, wait_until

LISTENERS = [("listen", "smtp"), ("listen", "lmtp"), ("listen", "lookup"), ("metrics", "listen"),
             ("health", "listen")]


def environ(gate) -> dict[str, str]:
    """The environment `mailgate` runs in here: this tree first, no MAILGATE_* of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env["PYTHONPATH"] = str(gate.root / "src") if gate.user else str(REPO)
    return env


def serve_command(gate) -> list[str]:
    return [sys.executable, "-m", "mailgate", "serve", "-c", str(gate.config_path)]


def serve_until_exit(gate) -> subprocess.CompletedProcess:
    """`mailgate serve` (as the gate's user) that is expected to exit by itself."""
    as_user = {"user": gate.user, "group": VMAIL_GID, "extra_groups": []} if gate.user else {}
    python = str(UNPRIVILEGED_PYTHON) if gate.user else sys.executable
    return subprocess.run([python, *serve_command(gate)[1:]], env=environ(gate), cwd=gate.root,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          **as_user)


@pytest.mark.parametrize("section, key", LISTENERS, ids=[f"{s}.{k}" for s, k in LISTENERS])
def test_port_in_use_is_one_line_naming_the_key_exit_2(mailgate_factory, section, key):
    gate = mailgate_factory(start=False)
    host, port = gate.address(section, key)
    with socket.socket() as holder:
        holder.bind((host, port))
        holder.listen()
        done = serve_until_exit(gate)
    assert done.returncode == 2, done.stderr
    *before, line = done.stderr.splitlines()  # before: start-up log lines (the store's), if any
    assert line == (f"mailgate: config error: {section}.{key}: cannot listen on {host}:{port}: "
                    f"Address already in use; change {section}.{key} or stop what holds that "
                    "address")
    assert all(re.match(r"\w{3} [ \d]\d [\d:]{8} mailgate\[\d+\]: ", b) for b in before), before
    assert not any(port_open(p, h) for h, p in gate.tcp_listeners if p != port)


def test_an_address_that_cannot_be_resolved_is_said_so_not_blamed_on_a_holder(
        mailgate_factory):
    """getaddrinfo's error (errno negative, socket.gaierror) is about the address itself:
    nothing holds it, so the line says why and asks for another address only."""
    gate = mailgate_factory({"health": {"listen": "[fe80::1%nosuchif]:8080"}}, start=False)
    done = serve_until_exit(gate)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "mailgate: config error: health.listen: cannot listen on [fe80::1%nosuchif]:8080: "
        "Name or service not known; change health.listen")


def test_unwritable_data_dir_is_one_line_exit_2(mailgate_factory, peer_root):
    data_dir = peer_root / "state"
    gate = mailgate_factory({"data_dir": str(data_dir)}, user="vmail", start=False)
    os.chown(data_dir, 0, 0)  # root's, 0755: vmail may read it, not write
    os.chmod(data_dir, 0o755)
    done = serve_until_exit(gate)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"mailgate: config error: data_dir: {data_dir} is not writable by "
                           "uid 5000: Permission denied; set data_dir or give that directory to "
                           "this user\n")  # checked first: nothing is logged before it


def test_sigterm_as_soon_as_the_port_answers_is_a_clean_stop(mailgate_factory):
    """Signal handlers exist before the first bind: a SIGTERM at any moment after the SMTP port
    answers is a clean stop (exit 0), never death by the signal's default action."""
    gate = mailgate_factory(start=False)
    for _ in range(5):
        proc = subprocess.Popen(serve_command(gate), env=environ(gate), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: proc.poll() is not None or port_open(gate.smtp[1]), 15,
                       interval=0.001, what="the SMTP port answering")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(15)
            proc.stderr.close()


def health(gate) -> dict:
    host, port = gate.address("health", "listen")
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as response:
        return json.load(response)


def status(gate) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgate", "status", "-c",
                           str(gate.config_path)], capture_output=True, text=True, timeout=30,
                          env={**environ(gate), "PYTHONPATH": str(REPO)},
                          stdin=subprocess.DEVNULL)


def sighup(gate, expect: str) -> None:
    count = gate.log_text().count(expect)
    gate.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gate.log_text().count(expect) > count, 10, what=f"log ~ {expect!r}")


@pytest.mark.parametrize("damage", ["truncated", "empty", "unreadable"])
def test_broken_config_on_sighup_keeps_the_old_one_and_says_so(dovecot, mailgate_factory,
                                                               damage):
    gate = mailgate_factory(user="vmail" if damage == "unreadable" else None)
    good, mode = gate.config_path.read_text(), gate.config_path.stat().st_mode
    if damage == "truncated":  # cut in the middle of a line: what a writer leaves half-way
        gate.config_path.write_text(good[:good.index("[delivery]") + 12])
    elif damage == "empty":    # what an editor's O_TRUNC leaves before the write
        gate.config_path.write_text("")
    else:
        gate.config_path.chmod(0o000)
    sighup(gate, "reload refused, keeping the running config")

    mark = token()  # still the old config: example.test served, delivered to Dovecot
    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == 1
    error = health(gate)["config"]["reload_error"]
    assert str(gate.config_path) in error
    shown = status(gate)  # it reads the same file (root reads a 0000 file, vmail cannot)
    if damage == "unreadable":
        assert shown.returncode == 1 and "RELOAD REFUSED" in shown.stdout, shown.stdout
        assert error in shown.stdout
    elif damage == "truncated":
        assert shown.returncode == 2 and "not valid TOML" in shown.stderr, shown.stderr

    gate.config_path.write_text(good)
    gate.config_path.chmod(mode)
    sighup(gate, "reloaded config")
    assert health(gate)["config"]["reload_error"] == ""
    assert status(gate).returncode == 0


def test_sigterm_with_20_sessions_in_flight(dovecot, fault_proxy, mailgate_factory):
    """Each session is half-way through its DATA when SIGTERM comes; Dovecot answers slowly.
    New connections are turned away, every session finishes with 250 then 421, each message
    is stored once and whole, and mailgate exits 0."""
    gate = mailgate_factory({"listen": {"shutdown_timeout": 20},
                             "delivery": {"lmtp": fault_proxy.target}})
    fault_proxy.mode, fault_proxy.delay = "delay", 0.5
    marks = [token() for _ in range(20)]
    data = {m: message(m) + b"line\r\n" * 2000 for m in marks}
    sessions = {}
    for m in marks:
        sessions[m] = Raw(gate.smtp)
        sessions[m].to_data(ALICE)
        sessions[m].sock.sendall(data[m][:len(data[m]) // 2])
    gate.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: turned_away(gate), 10, what="new connections turned away")

    def finish(m: str) -> tuple[tuple, tuple]:
        sessions[m].sock.sendall(data[m][len(data[m]) // 2:] + b".\r\n")
        return sessions[m].reply(), sessions[m].reply()
    with ThreadPoolExecutor(20) as pool:
        for done, bye in pool.map(finish, marks):
            assert_reply(done, "250 2.0.0")
            assert_reply(bye, "421 4.3.2")
    for session in sessions.values():
        session.close()
    assert gate.proc.wait(30) == 0, gate.log_text()
    stored = {f.read_bytes() for f in maildir_files(dovecot, ALICE)}
    for m in marks:
        [copy] = [s for s in stored if f"token {m}".encode() in s]
        assert copy.endswith(data[m].replace(b"\r\n", b"\n"))
    assert maildir_files(dovecot, ALICE, "tmp") == []


def turned_away(gate) -> bool:
    """True once a new connection is refused, reset, or greeted with 421."""
    try:
        with socket.create_connection(gate.smtp, timeout=5) as s:
            return s.makefile("rb").readline().startswith(b"421 ")
    except OSError:
        return True
