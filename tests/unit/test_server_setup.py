"""The per-connection fast set-up must leave a session exactly as aiosmtpd's own __init__ does,
and the fast address path must agree with aiosmtpd's parser wherever it applies."""
import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from mailgate import aiosmtpd_setup, config
from mailgate.commands import SIMPLE_PATH
from mailgate.lmtpserver import LMTPServer
from mailgate.server import SMTPServer
from mailgate.resources import Resources
from mailgate.service import make_gateway


def sessions(cls):
    async def build():
        cfg = config.load(None, {"MAILGATE_DATA_DIR": "/nonexistent"})
        gateway = make_gateway(cfg, Resources(cfg))
        fast = cls(gateway, "smtp")
        slow = object.__new__(cls)
        vars(slow).update({k: v for k, v in vars(fast).items()
                           if k in ("gateway", "listener", "xforward", "busy", "processing",
                                    "in_ehlo", "trusted", "last_activity")})
        SMTP.__init__(slow, gateway, hostname=fast.hostname, ident=cls.greeting,
                      data_size_limit=fast.data_size_limit, enable_SMTPUTF8=True,
                      decode_data=False, timeout=fast._timeout_duration, auth_require_tls=True)
        return fast, slow
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
        elif name == "_auth_methods":
            assert mine == {}  # AUTH is never offered without TLS; aiosmtpd lists LOGIN/PLAIN
        elif name in ("_stream_reader", "_stream_reader_wr", "_strong_reader",
                      "_closed", "_loop", "loop", "_source_traceback"):
            assert type(mine) is type(value), name
        elif callable(value) and hasattr(value, "__func__"):
            assert value.__func__ is mine.__func__, name
        else:
            assert mine == value, name


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
