"""`mailgate serve`: start the listeners, metrics and health; stop cleanly on SIGTERM.

SIGTERM/SIGINT (handled from before the first bind): stop accepting, let messages in flight
finish within listen.shutdown_timeout, exit 0. SIGHUP: re-read the config for new transactions
without dropping connections; a config that does not load is refused, logged and shown by
/health; a key only a restart applies (RESTART_KEYS) keeps its running value, and the log says
which ones the file would change. A port in use or an unwritable data_dir is one line naming the
key, exit 2.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import tempfile

from mailgate import __version__, health, maildir, maillog, metrics
from mailgate.config import Config, ConfigError, find_file, load, parse_hostport
from mailgate.config.sections import Store as StoreSection
from mailgate.gateway import Gateway
from mailgate.lmtppool import Pool
from mailgate.lmtpserver import LMTPServer
from mailgate.lookup import LookupServer
from mailgate.notify import notify
from mailgate.pipeline import Chain, validate
from mailgate.resources import Resources
from mailgate.server import SMTPServer
from mailgate.store import StoreUnavailable

log = logging.getLogger("mailgate.service")
# What a reload cannot change, so keeps as it runs: bound sockets, the LMTP pool and the
# delivery record (built once), what Resources made (store, DNS resolver, relay) and data_dir.
# Every store key but outage_budget, which the rules filter the reload builds reads: a store
# key added later is kept as it runs unless said otherwise here.
STORE_APPLIED_ON_RELOAD = {"outage_budget"}
RESTART_KEYS = ("data_dir", "listen.smtp", "listen.lmtp", "listen.lookup", "metrics.listen",
                "health.listen", "delivery.lmtp", "delivery.lmtp_connections",
                "delivery.lmtp_timeout", "delivery.delivery_record",
                *(f"store.{f.name}" for f in dataclasses.fields(StoreSection)
                  if f.name not in STORE_APPLIED_ON_RELOAD), "dns", "relay")


def make_gateway(config: Config, resources: Resources) -> Gateway:
    pool = None
    if config.delivery.lmtp:
        pool = Pool(config.delivery.lmtp, config.hostname, config.delivery.lmtp_connections,
                    config.delivery.lmtp_timeout)
        metrics.LMTP_POOL_SIZE.set(config.delivery.lmtp_connections)
    return Gateway(config, pool, Chain.from_config(config, resources), resources.store)


async def prepare_store(resources: Resources, gateway: Gateway) -> None:
    """Make a missing state table; read back the delivery record. The store unreachable
    only means both wait: mail flows on (rules and blocklist know how to do without it)."""
    try:
        for name in await resources.store.ensure_tables(["state"]):
            log.info("store: created %s", name)
    except StoreUnavailable as e:
        log.warning("store: cannot make sure the state table exists: %s", e)
    remembered = await gateway.record.load()
    if remembered:
        log.info("delivery record: %d recipient(s) remembered from before the start", remembered)


def create_maildirs(config: Config) -> None:
    for address in config.delivery.create_maildirs:
        maildir.create(config.maildir_template(), address, config.domains)


def check_data_dir(path: str) -> None:
    """data_dir exists (made if missing) and this user can create files in it."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"data_dir: {path} is not writable by uid {os.geteuid()}: "
                          f"{e.strerror}; set data_dir or give that directory to this user") from None


def cannot_listen(key: str, address: str, error: OSError) -> ConfigError:
    if isinstance(error, socket.gaierror) or (error.errno or 0) < 0:
        # getaddrinfo's errors (negative EAI_* codes): the address itself, not its holder
        reason = error.strerror or str(error)
        return ConfigError(f"{key}: cannot listen on {address}: {reason}; change {key}")
    reason = os.strerror(error.errno) if error.errno else str(error)  # uvloop's text is long
    return ConfigError(f"{key}: cannot listen on {address}: {reason}; "
                       f"change {key} or stop what holds that address")


async def listen(gateway: Gateway) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for address, cls, name in ((gateway.config.listen.smtp, SMTPServer, "smtp"),
                               (gateway.config.listen.lmtp, LMTPServer, "lmtp")):
        if address:
            host, port = parse_hostport(address, f"listen.{name}")
            try:
                servers.append(await loop.create_server(
                    lambda cls=cls, name=name: cls(gateway, name), host, port, reuse_address=True))
            except OSError as e:
                for server in servers:
                    server.close()
                raise cannot_listen(f"listen.{name}", address, e) from None
    return servers


def serve_http(config: Config, gateway: Gateway):
    """The metrics and health servers (their own threads); the health server, or None."""
    try:
        metrics.serve(config.metrics.listen)
    except OSError as e:
        raise cannot_listen("metrics.listen", config.metrics.listen, e) from None
    try:  # health asks the Dovecot the pool delivers to, whatever a reload read since
        return health.serve(config, gateway.pool.target if gateway.pool is not None else "")
    except OSError as e:
        raise cannot_listen("health.listen", config.health.listen, e) from None


def load_for_reload(path: str | None) -> Config:
    """The config file as it is now, refused if empty: a file being rewritten in place is
    empty for a moment, and an empty file is valid TOML that means "all defaults"."""
    found = find_file(path, os.environ)
    if found is not None and found.is_file() and found.stat().st_size == 0:
        raise ConfigError(f"{found}: empty (half-written?)")
    return validate(load(path))


def _value(config: Config, key: str):
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _replaced(config: Config, key: str, value) -> Config:
    name, _, rest = key.partition(".")
    if rest:
        value = _replaced(getattr(config, name), rest, value)
    return dataclasses.replace(config, **{name: value})


def keep_running(new: Config, running: Config) -> tuple[Config, list[str]]:
    """`new` with the running value of every restart-only key, and the keys it would change.
    `running` is what the running objects were built from (the last config applied, whose
    restart-only values are still the start's), not the file read before."""
    stale = []
    for key in RESTART_KEYS:
        was, wants = _value(running, key), _value(new, key)
        if wants != was:
            stale += [f"{key}.{f.name}" for f in dataclasses.fields(was)
                      if getattr(wants, f.name) != getattr(was, f.name)] \
                if dataclasses.is_dataclass(was) else [key]
            new = _replaced(new, key, was)
    return new, stale


def reload(gateway: Gateway, resources: Resources, path: str | None, httpd) -> None:
    try:
        new, stale = keep_running(load_for_reload(path), gateway.config)
        chain = Chain.from_config(new, resources)
    # XXX a filter's constructor may fail in any way; the running config must survive it.
    except Exception as e:  # noqa: BLE001
        text = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        log.error("reload refused, keeping the running config: %s", text)
        if httpd is not None:
            httpd.RequestHandlerClass.reload_error = text
        return
    gateway.configure(new, chain)
    maillog.setup(new.log)
    if httpd is not None:
        httpd.RequestHandlerClass.config = new
        httpd.RequestHandlerClass.reload_error = ""
    log.info("reloaded config%s", f"; needs a restart to change: {', '.join(stale)}" if stale else "")


async def serve(config: Config, path: str | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # XXX before the first bind: a SIGTERM once the ports answer must find its handler (the
    # default action kills), and a SIGHUP before the reload handler exists is only logged.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP while starting: ignored")
    check_data_dir(config.data_dir)
    create_maildirs(config)
    resources = Resources(config)
    gateway = make_gateway(config, resources)
    await prepare_store(resources, gateway)
    servers = await listen(gateway)
    lookups = LookupServer(gateway)  # Postfix's RCPT-time question: is this address ours?
    if config.listen.lookup:
        try:
            await lookups.start(config.listen.lookup)
        except OSError as e:
            raise cannot_listen("listen.lookup", config.listen.lookup, e) from None
    httpd = serve_http(config, gateway)
    loop.add_signal_handler(signal.SIGHUP, reload, gateway, resources, path, httpd)
    ticker = asyncio.ensure_future(metrics.watch_event_loop())
    log.info("mailgate %s ready: smtp=%s lmtp=%s lookup=%s delivery=%s maildir=%s domains=%s",
             __version__, config.listen.smtp or "off", config.listen.lmtp or "off",
             config.listen.lookup or "off",
             config.delivery.lmtp or "off", config.maildir_template() or "off",
             ",".join(config.domains))
    notify("READY=1")
    await stop.wait()
    notify("STOPPING=1")
    log.info("stopping: no new connections; waiting up to %s s for messages in flight",
             gateway.config.listen.shutdown_timeout)
    for server in servers:
        server.close()
    lookups.close()
    ticker.cancel()
    await gateway.shutdown(gateway.config.listen.shutdown_timeout)
    if gateway.pool is not None:
        await gateway.pool.close()
    await gateway.record.flush()
    await resources.close()
    if httpd is not None:
        httpd.shutdown()
    log.info("stopped")
    return 0


def command(args, config: Config) -> int:
    return run(config, args.config)


def run(config: Config, path: str | None) -> int:
    maillog.setup(config.log)
    try:
        import uvloop  # faster event loop where installed; plain asyncio otherwise
    except ImportError:
        return asyncio.run(serve(config, path))
    return uvloop.run(serve(config, path))
