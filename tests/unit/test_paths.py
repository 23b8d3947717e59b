"""Paths in MAIL and RCPT: the fast pattern must agree with the full parser wherever it applies,
and the full parser must read paths as aiosmtpd 1.4.6 read them (what mailgate took before its
listener was its own; aiosmtpd is a test dependency, for the relay sink)."""
import pytest
from aiosmtpd.smtp import SMTP

from mailgate.commands import SIMPLE_PATH, getaddr

SIMPLE = ["<alice@example.test>", "<a.b+c@example.test> SIZE=100 BODY=8BITMIME",
          "<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.test", "<o'neil@example.test>"]
OTHERS = ["<a..b@x.test>", "<.a@x.test>", "<foo bar@x.test>", '<"q"@x.test>', "<a@[127.0.0.1]>",
          "<a@@x>", "a@x.test", "<a@x.test>SIZE=1", "<\u00e9@x.test>"]


def aiosmtpd_getaddr(arg: str):
    return SMTP._getaddr(object.__new__(SMTP), arg)


@pytest.mark.parametrize("arg", SIMPLE)
def test_simple_path_agrees_with_the_full_parser(arg):
    fast = SIMPLE_PATH.match(arg)
    assert fast is not None
    address, rest = getaddr(arg)
    assert (fast.group(1), fast.group(2).split()) == (address, rest.split())


@pytest.mark.parametrize("arg", OTHERS)
def test_anything_else_takes_the_full_parser(arg):
    assert SIMPLE_PATH.match(arg) is None


@pytest.mark.parametrize("arg", SIMPLE + OTHERS + ["", "<>", "<a@x.test", "@a,@b:c@x.test",
                                                   "<@a,@b:c@x.test>", "<a(b)@x.test>"])
def test_full_parser_reads_paths_as_aiosmtpd_did(arg):
    assert getaddr(arg) == aiosmtpd_getaddr(arg)
