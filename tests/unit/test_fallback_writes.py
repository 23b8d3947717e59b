"""The maildir fallback for several recipients at once: the writes run concurrently, and the
answer waits for all of them, whatever happens to one (real files in a temp dir)."""
import asyncio
import os
import threading

from mailgate import maildir
from mailgate.config import Config, build
from mailgate.deliver import Deliverer
from mailgate.message import Client, Envelope


def test_a_bug_in_one_fallback_write_defers_only_its_recipient_once_all_writes_ended(
        tmp_path, monkeypatch):
    """Two recipients go to the fallback at once; alice's write hits a bug while bob's is still
    to come. Our answer must wait for bob's write (else the client hears 451 while his copy
    lands, and the retry makes a second one): 451 4.3.0 for alice, bob's copy delivered."""
    for user in ("alice", "bob"):
        for sub in ("cur", "new", "tmp"):
            (tmp_path / "example.test" / user / sub).mkdir(parents=True)
    cfg = build(Config, {"hostname": "mx.example.test", "domains": ["example.test"],
                         "data_dir": str(tmp_path),
                         "delivery": {"maildir": f"{tmp_path}/{{domain}}/{{user}}"}}, "")
    alice_failed = threading.Event()
    write = maildir.deliver

    def deliver(template, address, domains, data):
        if address.startswith("alice@"):
            alice_failed.set()
            raise RuntimeError("a bug in alice's write")
        assert alice_failed.wait(10)  # bob writes only after alice's bug is out
        return write(template, address, domains, data)
    monkeypatch.setattr(maildir, "deliver", deliver)

    env = Envelope("Q1", "s@remote.test", ("alice@example.test", "bob@example.test"),
                   Client("127.0.0.1"), 0.0)
    alice, bob = asyncio.run(Deliverer(cfg, None).deliver(
        env, list(env.recipients), b"Subject: x\r\n\r\nbody\r\n", float("inf")))
    assert (alice.reply.code, alice.reply.status, alice.status) == (451, "4.3.0", "deferred")
    assert (bob.reply.code, bob.status, bob.relay) == (250, "sent", "maildir")
    assert len(os.listdir(tmp_path / "example.test" / "bob" / "new")) == 1
    assert os.listdir(tmp_path / "example.test" / "alice" / "new") == []
