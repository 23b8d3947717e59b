"""The per-connection fast set-up must leave a session exactly as aiosmtpd's own __init__ does,
and the fast address path must agree with aiosmtpd's parser wherever it applies."""
import asyncio
from unittest import mock

import pytest
from aiosmtpd.smtp import SMTP

from mailgate import aiosmtpd_setup, config, server
from mailgate.commands import SIMPLE_PATH
from mailgate.lmtpserver import LMTPServer
from mailgate.server import SMTPServer
from mailgate.resources import Resources
from mailgate.service import make_gateway


def sessions(cls, count: int = 1):
    """`count` sessions set up by fast_init, and one by aiosmtpd's own SMTP.__init__ (what
    SMTPServer.__init__ runs with another aiosmtpd)."""
    async def build():
        cfg = config.load(None, {"MAILGATE_DATA_DIR": "/nonexistent"})
        gateway = make_gateway(cfg, Resources(cfg))
        fast = [cls(gateway, "smtp") for _ in range(count)]
        with mock.patch.object(server, "FAST_INIT", False):
            slow = cls(gateway, "smtp")
        return (*fast, slow)
    return asyncio.run(build())


@pytest.mark.skipif(not aiosmtpd_setup.FAST_INIT,
                    reason="fast set-up is only used with the aiosmtpd it was written for")
@pytest.mark.parametrize("cls", [SMTPServer, LMTPServer])
def test_fast_init_matches_aiosmtpd(cls):
    fast, slow = sessions(cls)
    assert set(vars(fast)) == set(vars(slow))
    for name, value in vars(slow).items():
        mine = vars(fast)[name]
        if name in ("_handle_hooks", "_smtp_methods"):
            assert mine.keys() == value.keys(), name
            assert all(getattr(mine[k], "__func__", None) is getattr(value[k], "__func__", None)
                       for k in value), name
        elif name == "command_size_limits":  # XXX aiosmtpd's is the class's, shared
            assert mine == value == {} and mine is not value, name
            assert mine is not SMTP.command_size_limits and value is not SMTP.command_size_limits
            assert (mine["MAIL"], value["MAIL"]) == (SMTP.command_size_limit,) * 2
        elif name == "_auth_methods":
            assert mine == {}  # AUTH is never offered without TLS; aiosmtpd lists LOGIN/PLAIN
        elif name in ("_stream_reader", "_stream_reader_wr", "_strong_reader",
                      "_closed", "_loop", "loop", "_source_traceback"):
            assert type(mine) is type(value), name
        elif callable(value) and hasattr(value, "__func__"):
            assert value.__func__ is mine.__func__, name
        else:
            assert mine == value, name


def test_sessions_do_not_share_command_size_limits():
    """EHLO raises the session's limit for MAIL (SIZE=, SMTPUTF8); another session, set up
    before or after, keeps its own."""
    first, second, third = sessions(SMTPServer, 3)[:3]
    first.command_size_limits["MAIL"] += 36  # as aiosmtpd's smtp_EHLO does
    later = sessions(SMTPServer)[0]
    assert first.command_size_limits["MAIL"] == SMTP.command_size_limit + 36
    assert {s.command_size_limits["MAIL"] for s in (second, third, later)} == \
        {SMTP.command_size_limit}


@pytest.mark.parametrize("arg", [
    "<alice@example.test>", "<a.b+c@example.test> SIZE=100 BODY=8BITMIME",
    "<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.test", "<o'neil@example.test>",
])
def test_simple_path_agrees_with_aiosmtpd(arg):
    fast = SIMPLE_PATH.match(arg)
    assert fast is not None
    address, rest = SMTP._getaddr(object.__new__(SMTP), arg)
    assert (fast.group(1), fast.group(2).split()) == (address, rest.split())


@pytest.mark.parametrize("arg", ["<a..b@x.test>", "<.a@x.test>", "<foo bar@x.test>",
                                 '<"q"@x.test>', "<a@[127.0.0.1]>", "<a@@x>", "a@x.test",
                                 "<a@x.test>SIZE=1", "<\u00e9@x.test>"])
def test_anything_else_takes_the_full_parser(arg):
    assert SIMPLE_PATH.match(arg) is None
