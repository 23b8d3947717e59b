"""`mailgate serve`: start the listeners, metrics and health; stop cleanly on SIGTERM.

SIGTERM/SIGINT: stop accepting, let messages in flight finish within listen.shutdown_timeout,
exit 0. SIGHUP: re-read the config for new transactions (domains, limits, filters, log level)
without dropping connections; keys that need a restart (listen, delivery.lmtp, ports) are named.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from mailgate import __version__, health, maildir, maillog, metrics
from mailgate.config import Config, ConfigError, load, parse_hostport
from mailgate.gateway import Gateway
from mailgate.lmtp import Pool
from mailgate.lookup import LookupServer
from mailgate.notify import notify
from mailgate.pipeline import Chain, validate
from mailgate.resources import Resources
from mailgate.server import LMTPServer, SMTPServer
from mailgate.store import StoreUnavailable

log = logging.getLogger("mailgate.service")
RESTART_KEYS = ("listen", "metrics", "health")   # bound sockets
POOL_KEYS = ("lmtp", "lmtp_connections", "lmtp_timeout")  # the LMTP pool is built once


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


async def listen(gateway: Gateway) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for address, cls, name in ((gateway.config.listen.smtp, SMTPServer, "smtp"),
                               (gateway.config.listen.lmtp, LMTPServer, "lmtp")):
        if address:
            host, port = parse_hostport(address, f"listen.{name}")
            servers.append(await loop.create_server(
                lambda cls=cls, name=name: cls(gateway, name), host, port, reuse_address=True))
    return servers


def reload(gateway: Gateway, resources: Resources, path: str | None, httpd) -> None:
    try:
        new = validate(load(path))
    except ConfigError as e:
        log.error("reload refused, keeping the running config: %s", e)
        return
    old = gateway.config
    stale = [k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]
    stale += [f"delivery.{k}" for k in POOL_KEYS
              if getattr(old.delivery, k) != getattr(new.delivery, k)]
    gateway.configure(new, Chain.from_config(new, resources))
    maillog.setup(new.log)
    if httpd is not None:
        httpd.RequestHandlerClass.config = new
    log.info("reloaded config%s", f"; needs a restart to change: {', '.join(stale)}" if stale else "")


async def serve(config: Config, path: str | None) -> int:
    loop = asyncio.get_running_loop()
    create_maildirs(config)
    resources = Resources(config)
    gateway = make_gateway(config, resources)
    await prepare_store(resources, gateway)
    servers = await listen(gateway)
    lookups = LookupServer(gateway)  # Postfix's RCPT-time question: is this address ours?
    if config.listen.lookup:
        await lookups.start(config.listen.lookup)
    metrics.serve(config.metrics.listen)
    httpd = health.serve(config)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, gateway, resources, path, httpd)
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
