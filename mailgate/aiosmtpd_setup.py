"""aiosmtpd's per-connection set-up without its introspection, for the version we know.

aiosmtpd 1.4.6 runs inspect.getmembers over the protocol and the handler on every connection;
the benchmark showed it at a quarter of mailgate's CPU. This module leans on aiosmtpd's
internals, so it is used only with that version (elsewhere SMTP.__init__ runs as usual), and
tests/unit/test_server_setup.py compares the attributes it sets with the real __init__.
"""
from __future__ import annotations

import asyncio

from aiosmtpd import __version__ as aiosmtpd_version
from aiosmtpd.smtp import SMTP, login_always_fail

FAST_INIT_VERSION = "1.4.6"
FAST_INIT = aiosmtpd_version == FAST_INIT_VERSION  # else SMTP.__init__ runs as usual
_attribute_names: dict[tuple[type, str], list[str]] = {}


def fast_init(server: SMTP, handler, *, hostname: str, ident: str, data_size_limit: int,
              enable_SMTPUTF8: bool, decode_data: bool, timeout: float,
              auth_require_tls: bool) -> None:
    """aiosmtpd 1.4.6's SMTP.__init__ for our fixed settings, minus its per-connection
    introspection (inspect.getmembers over protocol and handler, about 0.2 ms a connection).

    XXX tied to aiosmtpd's internals: used only for the version it was written against
    (tests/unit compare the attributes with the real __init__); other versions take super().
    No AUTH mechanisms: we never offer AUTH (no TLS here), so none are collected.
    """
    loop = asyncio.get_running_loop()
    asyncio.StreamReaderProtocol.__init__(
        server, asyncio.StreamReader(loop=loop, limit=server.line_length_limit),
        client_connected_cb=server._cb_client_connected, loop=loop)
    server.__ident__, server.loop, server.event_handler = ident, loop, handler
    server.data_size_limit, server.enable_SMTPUTF8 = data_size_limit, enable_SMTPUTF8
    server._decode_data, server.hostname = decode_data, hostname
    server.command_size_limits.clear()  # the session's own dict (SMTPServer.__init__)
    server.tls_context, server.require_starttls = None, None
    server._timeout_duration, server._timeout_handle = timeout, None
    server._tls_handshake_okay, server._tls_protocol, server._original_transport = True, None, None
    server.session = server.envelope = server.transport = server._handler_coroutine = None
    server._auth_require_tls, server._proxy_timeout = auth_require_tls, None
    server._authenticator, server._auth_callback = None, login_always_fail
    server._auth_required, server._auth_methods = False, {}
    server._handle_hooks = {m[7:]: getattr(handler, m) for m in _names(handler, "handle_")}
    server._ehlo_hook_ver = "new" if "EHLO" in server._handle_hooks else None
    server._smtp_methods = {m[5:]: getattr(server, m) for m in _names(server, "smtp_")}
    server._enforce_call_limit = False


def _names(obj: object, prefix: str) -> list[str]:
    """Attribute names with `prefix` on obj's class, looked up once per class."""
    key = (type(obj), prefix)
    names = _attribute_names.get(key)
    if names is None:
        names = _attribute_names[key] = [m for m in dir(obj) if m.startswith(prefix)]
    return names
