"""What the envelope commands carry: paths, parameters, XFORWARD attributes, trusted peers.

Pure functions, so the protocol class stays about the conversation. Anything these cannot read
is refused by the caller with a precise 501/555, never guessed at.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from email._header_value_parser import get_addr_spec, get_angle_addr

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
# XFEED (mailgate sync's own command): SECRET=xtext, then verdicts as METHOD=result words.
XFEED_VERDICT = re.compile(r"([a-z][a-z0-9-]{0,63})=([a-z]{1,32})\Z")
# The common path, <dot-atom@domain> and parameters, parsed without the RFC 5322 parser
# (getaddr: slow, it builds a token tree per call); anything else still goes through it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                         r"((?: +[A-Za-z0-9][A-Za-z0-9-]*(?:=[!-~]+)?)*) *\Z")
# A character no path may hold: lmtp.py could not pass it on unchanged (another address).
PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
IGNORED_MAIL_PARAMS = {"RET", "ENVID", "AUTH"}       # DSN and AUTH: Postfix may pass them on
IGNORED_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


def printable(text: str) -> str:
    """Control characters and DEL as "?", as Postfix's printable() does to what a client said
    before it logs it: an XFORWARD value ("+0A" is a newline) or a HELO name cannot start a
    log line of its own."""
    return PATH_CONTROL.sub("?", text)


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext: +XX hex escapes."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "+" and _is_hex(value[i + 1:i + 3]):
            out.append(chr(int(value[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse_xfeed(arg: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """("the secret", ((method, result), ...)) from "SECRET=s x-ses-spam=pass ..."; None if bad."""
    words = arg.split()
    if not words or not words[0].upper().startswith("SECRET="):
        return None
    verdicts = [XFEED_VERDICT.match(word.lower()) for word in words[1:]]
    if not all(verdicts):
        return None
    return xtext_decode(words[0][7:]), tuple((m[1], m[2]) for m in verdicts)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789ABCDEFabcdef" for c in text)


def is_trusted(peer: object, networks: tuple[str, ...]) -> bool:
    if not isinstance(peer, tuple):  # unix socket: only local processes can connect
        return True
    return _trusted(peer[0], networks)


@functools.lru_cache(maxsize=1024)  # per connection, and the peers are few (Postfix, swaks, sync)
def _trusted(address: str, networks: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(addr in network for network in _networks(networks))


@functools.lru_cache(maxsize=8)
def _networks(networks: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def getaddr(arg: str) -> tuple[str | None, str | None]:
    """(address, the rest) by the standard library's RFC 5322 parser, as aiosmtpd 1.4.6
    parsed paths; (None, None) if it cannot read one."""
    if not arg:
        return "", ""
    try:
        address, rest = (get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec)(arg)
    # XXX the parser also fails in other ways on some input ("<" is an IndexError): any of
    # them means the client's path is unreadable (501), not our failure (451).
    except Exception:  # noqa: BLE001
        return None, None
    return address.addr_spec, rest


def parse_path(arg: str, getaddr, smtputf8: bool) -> tuple[str, list[str]] | None:
    """(address, parameters) from "<a@b> X=Y" (FROM:/TO: stripped); "" for the null path <>.

    `getaddr` is the full address parser (getaddr above), for what the simple pattern does not
    cover.
    """
    if arg.startswith("<>"):
        return "", arg[2:].split()
    simple = SIMPLE_PATH.match(arg)
    if simple:
        return simple.group(1), simple.group(2).split()
    address, rest = getaddr(arg)
    # XXX the parser eats the space before parameters ("<a@b> SIZE=1" leaves "SIZE=1"):
    # look at what preceded them in the command, or every parameter would get 501.
    before = arg[:len(arg) - len(rest or "")]
    if not address or rest is None or (rest and not before[-1:].isspace()):
        return None
    # XXX the parser also takes RFC 5322 forms no SMTP path has and rewrites them
    # ("<foo bar@x>" becomes '"foo bar"@x', "<a (c)@x>" becomes "a@x"): refuse those.
    path = before.strip().removeprefix("<").removesuffix(">")
    path = path.partition(":")[2] if path.startswith("@") else path  # source route
    if path != address and not path.startswith('"'):
        return None
    # SMTPUTF8 may come as a parameter of this very MAIL command.
    utf8 = smtputf8 or "SMTPUTF8" in rest.upper().split()
    if not address.isascii() and not (utf8 and _is_utf8(address)):
        return None
    if PATH_CONTROL.search(before) or PATH_CONTROL.search(address):
        return None
    return address, rest.split()


def _is_utf8(text: str) -> bool:
    """False for bytes that were not UTF-8 (the listener decodes with surrogateescape): no such
    address can be logged, hashed or handed to Dovecot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
