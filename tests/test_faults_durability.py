"""Invariant 1, seen from outside: 250 only once the copy is durable.

A power cut cannot be staged here, so the order of the real process's system calls is read with
strace (attached to `mailgate serve`, which runs unmodified): for the maildir fallback, the
file's fsync, then its rename from tmp/ into new/, then the fsync of new/, and only then our
"250" on the client's socket; for Dovecot, its "Saved" read before our "250" is written.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from faultkit import ALICE, assert_reply, message, send, token

SYSCALLS = "fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,sendmsg,read,recvfrom"
CALL = re.compile(r"^\d+\s+(\w+)\((.*)$")
RESUMED = re.compile(r"^\d+\s+<\.\.\. (\w+) resumed>(.*)$")

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                 reason="strace is installed by .ci/install")


class Trace:
    """strace -f attached to a running process; `calls()` are (name, text) in completion order."""

    def __init__(self, pid: int, out: Path):
        self.out = out
        self.proc = subprocess.Popen(["strace", "-f", "-y", "-s", "100", "-e", f"trace={SYSCALLS}",
                                      "-o", str(out), "-p", str(pid)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        # "Process N attached with M threads": every thread is traced from here on.
        line = self.proc.stderr.readline()
        assert "attached" in line, line

    def stop(self) -> list[tuple[str, str]]:
        self.proc.send_signal(signal.SIGINT)  # strace detaches and exits
        self.proc.wait(15)
        self.proc.stderr.close()
        calls, pending = [], {}
        for line in self.out.read_text().splitlines():
            pid = line.split(None, 1)[0]
            if (resumed := RESUMED.match(line)) and pid in pending:
                calls.append((resumed.group(1), pending.pop(pid) + resumed.group(2)))
            elif call := CALL.match(line):
                if line.endswith("<unfinished ...>"):
                    pending[pid] = call.group(2)
                else:
                    calls.append((call.group(1), call.group(2)))
        return calls


def first(calls: list[tuple[str, str]], names: tuple[str, ...], pattern: str, after: int = -1) -> int:
    """Index of the first call named one of `names`, whose text matches, after index `after`."""
    for i, (name, text) in enumerate(calls):
        if i > after and name in names and re.search(pattern, text):
            return i
    pytest.fail(f"no {'/'.join(names)} matching {pattern!r} after call {after}:\n"
                + "\n".join(f"{n}({t}" for n, t in calls[after + 1:]))


WRITES = ("write", "writev", "sendto", "sendmsg")
OUR_250 = r'"250 2\.0\.0 Ok: queued as '


@pytest.mark.parametrize("path", ["fallback", "dovecot"])
def test_250_is_sent_only_after_the_copy_is_durable(dovecot, mailgate_factory, peer_root, path):
    if path == "fallback":
        dovecot.stop()
    gate = mailgate_factory()
    maildir = re.escape(str(dovecot.maildir(ALICE)))
    trace = Trace(gate.pid, peer_root / "strace.out")
    try:
        assert_reply(send(gate, [ALICE], message(token()))[1], "250 2.0.0")
    finally:
        calls = trace.stop()
    if path == "fallback":
        synced = first(calls, ("fsync", "fdatasync"), rf"<{maildir}/tmp/[^>]+>\)")
        moved = first(calls, ("rename", "renameat", "renameat2"), rf"<{maildir}/tmp>.*<{maildir}/new>",
                      synced)
        durable = first(calls, ("fsync", "fdatasync"), rf"<{maildir}/new>\)", moved)
    else:
        durable = first(calls, ("read", "recvfrom"), rf'"250 2\.0\.0 <{re.escape(ALICE)}> .*Saved')
    first(calls, WRITES, OUR_250, durable)
