"""The Gateway's processing of one message, with no peers: what our own failures become."""
import asyncio
import logging
import types

from mailgate.config import Config, build
from mailgate.gateway import Gateway
from mailgate.message import Client, Envelope
from mailgate.pipeline import Chain


def test_a_failure_after_delivery_is_a_clean_451_naming_the_queue_id(tmp_path, caplog):
    """The delivery record's step (after delivery) fails, as it did on a sender that was not
    UTF-8 ("\udcff": str.encode raised): 451 4.3.0 for each recipient and a log line with
    the queue id, not an exception out of the transaction (the listener's 451 with a
    traceback, and no per-recipient lines)."""
    cfg = build(Config, {"hostname": "mx.example.test", "domains": ["example.test"],
                         "data_dir": str(tmp_path), "delivery": {"lmtp": "", "maildir": ""}}, "")
    gateway = Gateway(cfg, None, Chain([], cfg.pipeline))

    async def digest(envelope, raw):
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
    gateway.record.digest = digest
    env = Envelope("Q1", "s@remote.test", ("a@example.test", "b@example.test"),
                   Client("127.0.0.1"), 0.0)
    gone = types.SimpleNamespace(protocol_name="SMTP", transport=None, listener="smtp")

    async def run():
        return await gateway.process(env, b"Subject: x\r\n\r\nbody\r\n", gone)
    with caplog.at_level(logging.INFO):
        results = asyncio.run(run())
    assert [(r.reply.code, r.reply.status, r.status) for r in results] == \
        [(451, "4.3.0", "deferred")] * 2
    assert "Q1: internal error while processing" in caplog.text
    assert "to=<b@example.test>, relay=none" in caplog.text  # still one line per recipient
