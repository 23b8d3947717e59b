"""The maildir fallback's disk: full (a file size limit, a small tmpfs), and two deliveries in the
same second. Nothing half-written may stay behind, and 451 4.3.0 is the answer.
"""
from __future__ import annotations

import os
import resource
import subprocess

import pytest

from faultkit import (ALICE, SENDER, assert_reply, big_body, copies, maildir_files, message, send,
                      smtp, token)
from peers import VMAIL_GID, VMAIL_UID


@pytest.fixture
def small_tmpfs(dovecot):
    """alice's maildir on a 128 KB tmpfs (skipped where mounting is not permitted)."""
    path = dovecot.maildir(ALICE)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700,uid=5000,gid=5000",
                              "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "the RLIMIT_FSIZE case stands for a full disk")
    try:
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(mode=0o700)
            os.chown(path / sub, VMAIL_UID, VMAIL_GID)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("full", ["fsize", "tmpfs"])
def test_disk_full_under_the_fallback_is_451_and_leaves_nothing(dovecot, mailgate_factory,
                                                                request, full):
    dovecot.stop()
    gate = mailgate_factory()
    unlimited = resource.RLIM_INFINITY
    if full == "fsize":  # mailgate may write no file past 64 KB (EFBIG, as a full disk)
        resource.prlimit(gate.pid, resource.RLIMIT_FSIZE, (64 * 1024, unlimited))
    else:
        request.getfixturevalue("small_tmpfs")
    mark = token()
    data = message(mark, body=big_body(300 * 1024))
    assert_reply(send(gate, [ALICE], data)[1], "451 4.3.0")
    assert maildir_files(dovecot, ALICE, "new", "cur", "tmp") == []
    gate.wait_log(rf"to=<{ALICE}>, relay=maildir, .*status=deferred .*"
                  r"(File too large|No space left on device)")

    if full == "fsize":
        resource.prlimit(gate.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        assert_reply(send(gate, [ALICE], data)[1], "250 2.0.0")
        assert copies(dovecot, ALICE, mark) == 1


def test_two_fallback_deliveries_in_the_same_second_are_distinct_files(dovecot,
                                                                       mailgate_factory):
    dovecot.stop()
    gate = mailgate_factory()
    for _ in range(5):  # bounded: two back-to-back deliveries nearly always share a second
        marks = [token(), token()]
        with smtp(gate) as client:
            for mark in marks:
                client.sendmail(SENDER, [ALICE], message(mark))
        names = [f.name for f in maildir_files(dovecot, ALICE, "new")
                 if any(m.encode() in f.read_bytes() for m in marks)]
        if len({name.split(".")[0] for name in names}) == 1:
            break
    else:
        pytest.fail("no two deliveries fell in the same second in 5 tries")
    assert len(names) == len(set(names)) == 2
    assert [copies(dovecot, ALICE, m) for m in marks] == [1, 1]
