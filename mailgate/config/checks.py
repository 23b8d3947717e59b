"""Checks on a built config: values across keys, names, addresses, and choices.

Each problem raises ConfigError naming the dotted key, so `mailgate check-config` and `serve`
fail before listening, with the key to change.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from mailgate import maildir
from mailgate.config.sections import HOURS, Config, ConfigError, Sync


def validate(cfg: Config) -> Config:
    if not cfg.domains:
        raise ConfigError("domains: at least one domain is needed")
    for domain in cfg.domains:
        if not maildir.is_domain(domain):
            raise ConfigError(f"domains: {domain!r} is not a lower-case domain name")
    for key in ("listen.smtp", "listen.lmtp", "listen.lookup", "metrics.listen", "health.listen",
                "relay.smtp", "sync.metrics"):
        value = _get(cfg, key)
        if value:
            parse_hostport(value, key)
    if not cfg.listen.smtp and not cfg.listen.lmtp:
        raise ConfigError("listen: at least one of smtp, lmtp is needed")
    if cfg.delivery.lmtp and not cfg.delivery.lmtp.startswith("unix:"):
        parse_hostport(cfg.delivery.lmtp, "delivery.lmtp")
    if not cfg.delivery.lmtp and not cfg.delivery.maildir:
        raise ConfigError("delivery: lmtp and maildir are both empty; mail could go nowhere")
    _check_maildir_template(cfg.delivery.maildir)
    for network in cfg.listen.trusted_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"listen.trusted_networks: {network!r} is not a network") from None
    _check_create_maildirs(cfg)
    _check_positive(cfg)
    _check_sync(cfg.sync)
    if cfg.limits.message_timeout >= 600:
        raise ConfigError("limits.message_timeout: must stay under Postfix's 600 s data_done timeout")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log.level: {cfg.log.level!r} is not debug, info, warning or error")
    _check_choices(cfg)
    _check_dns_auth(cfg)
    _check_store(cfg)
    _check_outbound(cfg)
    return cfg


def _check_dns_auth(cfg: Config) -> None:
    for ns in cfg.dns.nameservers:
        parse_nameserver(ns)
    for key in ("dns.timeout", "dns.budget", "auth.max_signatures", "auth.max_key_bits"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if cfg.auth.max_key_bits < 1024:
        raise ConfigError("auth.max_key_bits: below 1024 every DKIM key would be refused")


def _check_store(cfg: Config) -> None:
    if cfg.store.backend == "dynamodb" and not cfg.store.region:
        raise ConfigError("store.region: needed for backend dynamodb (or set AWS_REGION)")
    for key in ("timeout", "deadline", "outage_budget"):
        if getattr(cfg.store, key) <= 0:
            raise ConfigError(f"store.{key}: must be greater than 0")
    if cfg.store.cache_ttl < 0:
        raise ConfigError("store.cache_ttl: must be 0 (off) or more")


def _check_outbound(cfg: Config) -> None:
    if cfg.relay.password_file and not cfg.relay.username:
        raise ConfigError("relay.password_file: needs relay.username")
    if cfg.rules.bounce_address and "@" not in cfg.rules.bounce_address:
        raise ConfigError(f"rules.bounce_address: {cfg.rules.bounce_address!r} is not an address")
    if cfg.rules.srs_domain and not maildir.is_domain(cfg.rules.srs_domain):
        raise ConfigError(f"rules.srs_domain: {cfg.rules.srs_domain!r} is not a domain name")
    for key in ("relay.timeout", "vacation.period"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")


CHOICES = {
    "auth.dmarc_action": ("annotate", "quarantine", "reject"),
    "store.backend": ("sqlite", "dynamodb"),
    "blocklist.action": ("discard", "reject"),
    "sync.processed": ("tag", "keep", "delete"),
}


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _check_sync(sync: Sync) -> None:
    if sync.inject and not sync.inject.startswith("unix:"):
        parse_hostport(sync.inject, "sync.inject")
    for key in ("concurrency", "batch", "visibility_timeout"):
        if getattr(sync, key) <= 0:
            raise ConfigError(f"sync.{key}: must be greater than 0")
    if not 1 <= sync.batch <= 10:  # SQS's MaxNumberOfMessages
        raise ConfigError("sync.batch: must be from 1 to 10")
    if not 0 <= sync.wait_time <= 20:  # SQS's WaitTimeSeconds
        raise ConfigError("sync.wait_time: must be from 0 to 20 seconds")
    for key in ("wait_time", "visibility_timeout"):  # SQS takes whole seconds: never truncated
        if getattr(sync, key) != int(getattr(sync, key)):
            raise ConfigError(f"sync.{key}: must be a whole number of seconds (SQS counts "
                              f"whole seconds), got {getattr(sync, key)}")
    if sync.visibility_timeout > 12 * HOURS:
        raise ConfigError("sync.visibility_timeout: must be at most 43200 seconds")


def _check_create_maildirs(cfg: Config) -> None:
    if cfg.delivery.create_maildirs and not cfg.delivery.maildir:
        raise ConfigError("delivery.create_maildirs: needs delivery.maildir (where to create them)")
    for address in cfg.delivery.create_maildirs:
        try:
            maildir.split_address(address, cfg.domains)
        except maildir.UnsafeAddress as e:
            raise ConfigError(f"delivery.create_maildirs: {e}") from None


def _check_positive(cfg: Config) -> None:
    for section in ("listen", "limits", "delivery", "pipeline"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if f.type in ("int", "float") and value <= 0:
                raise ConfigError(f"{section}.{f.name}: must be greater than 0")


def _check_maildir_template(template: str) -> None:
    if not template:
        return
    if "{user}" not in template or not template.startswith(("/", "{data_dir}")):
        raise ConfigError("delivery.maildir: must be an absolute path containing {user}")
    try:
        template.format(domain="d", user="u", data_dir="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError("delivery.maildir: only {domain}, {user} and {data_dir} may be used") from None
    if template.index("{user}") < template.find("{domain}"):
        raise ConfigError("delivery.maildir: {domain} must come before {user}")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def parse_nameserver(value: str) -> tuple[str, int]:
    """"addr", "addr:port", "[v6]:port" or a bare IPv6 address -> (addr, port)."""
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest else "53"
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"dns.nameservers: {value!r} is not an address or address:port") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"dns.nameservers: {value!r} has a bad port")
    return host, int(port)


def parse_hostport(value: str, key: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {value!r} is not host:port")
    return host, int(port)
