"""One frozen configuration tree: embedded defaults, a TOML file, then environment overrides.

Loaded once at start and passed in explicitly. Anything wrong (unknown key, bad type, bad value)
raises ConfigError naming the key, so `mailgate check-config` and `serve` fail before listening.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mailgate import maildir

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS
KiB = 1024
MiB = 1024 * KiB

SYSTEM_CONFIG = Path("/etc/mailgate/mailgate.toml")


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""


class EnvValue(str):
    """A value from the environment: text to convert, where TOML values must already be typed."""


def default_data_dir() -> str:
    """systemd's StateDirectory, else /var/lib/mailgate for root, else the user's data dir."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/mailgate"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "mailgate")


@dataclass(frozen=True)
class Listen:
    smtp: str = "127.0.0.1:10025"      # content filter / internal port / swaks; "" = off
    lmtp: str = "127.0.0.1:10024"      # Postfix virtual_transport; "" = off
    lookup: str = "127.0.0.1:10027"    # Postfix socketmap: is this address ours? "" = off
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # may send XFORWARD
    max_sessions: int = 100            # past it: 421 4.3.2
    command_timeout: float = 5 * MINUTES   # idle deadline per command (RFC 5321 §4.5.3.2)
    shutdown_timeout: float = 30 * SECONDS  # how long transactions in flight may finish


@dataclass(frozen=True)
class Limits:
    message_size: int = 50 * MiB       # advertised in SIZE; larger: 552 5.3.4
    max_recipients: int = 1000         # per transaction; past it: 452 4.5.3
    message_timeout: float = 5 * MINUTES   # budget for filters + delivery, < Postfix's 600 s
    parse_size: int = 25 * MiB         # larger messages are delivered unparsed
    parse_depth: int = 50              # MIME nesting beyond this is delivered unparsed
    parse_timeout: float = 10 * SECONDS


@dataclass(frozen=True)
class Delivery:
    lmtp: str = "127.0.0.1:24"         # Dovecot: "host:port" or "unix:/path"; "" = maildir only
    maildir: str = ""                  # fallback template with {domain} {user}; "" = off
    lmtp_timeout: float = 30 * SECONDS
    lmtp_connections: int = 8          # pool size; also the cap on deliveries in flight
    create_maildirs: tuple[str, ...] = ()  # addresses whose maildir is created at start
    recipient_cache: float = 60 * SECONDS  # how long a Dovecot answer about a user is reused
    delivery_record: float = 24 * HOURS    # how long partial deliveries are remembered


@dataclass(frozen=True)
class Pipeline:
    filters: tuple[str, ...] = ()      # names from mailgate.pipeline.FILTERS or "module:Class"
    filter_timeout: float = 10 * SECONDS


@dataclass(frozen=True)
class Relay:
    smtp: str = "127.0.0.1:25"         # where auto-replies and forwards are sent
    tls: bool = False                  # STARTTLS to the relay
    username: str = ""                 # SMTP AUTH, with the password read from password_file
    password_file: str = ""
    ses: bool = False                  # send through the SES API (send_raw_email) instead
    timeout: float = 30 * SECONDS      # per SMTP command / SES call
    tls_ca_file: str = ""              # CA bundle to verify the relay's certificate; "" = system
    region: str = ""                   # ses: AWS region (AWS_REGION)
    endpoint_url: str = ""             # ses: moto or another endpoint; "" = AWS


@dataclass(frozen=True)
class Rules:
    bounce_address: str = ""           # envelope sender of forwards; "" = SRS-rewrite the sender
    srs_domain: str = ""               # domain of SRS addresses; "" = the first of `domains`
    srs_secret_file: str = ""          # "" = {data_dir}/srs-secret (made at first use, 0600)


@dataclass(frozen=True)
class Vacation:
    period: float = 7 * DAYS           # at most one auto-reply per sender and recipient per period


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()  # "addr" or "addr:port"; empty = the system's resolv.conf
    timeout: float = 2 * SECONDS       # per query
    budget: float = 8 * SECONDS        # DNS time per message, inside pipeline.filter_timeout


@dataclass(frozen=True)
class Auth:
    dmarc_action: str = "annotate"     # annotate | quarantine | reject
    max_signatures: int = 5            # DKIM signatures verified per message
    max_key_bits: int = 4096           # larger DKIM keys: permerror, before any RSA work


@dataclass(frozen=True)
class Store:
    backend: str = "sqlite"            # sqlite (embedded) | dynamodb
    path: str = ""                     # sqlite file; "" = {data_dir}/mailgate.sqlite3
    region: str = ""                   # dynamodb (AWS_REGION)
    endpoint_url: str = ""             # dynamodb: moto or another endpoint; "" = AWS
    rules_table: str = "email-rules"
    blocked_table: str = "email-blocked-senders"
    outbound_table: str = "ses-outbound-messages"
    state_table: str = "mailgate-state"
    outage_budget: float = 10 * MINUTES  # how long `rules` defers unknown addresses in an outage
    timeout: float = 2 * SECONDS       # per request: connect and read (SQLite: busy wait)
    deadline: float = 5 * SECONDS      # per store call, retries included; keep < filter_timeout
    cache_ttl: float = 10 * SECONDS    # dynamodb: how long a read is reused (0 = off)


@dataclass(frozen=True)
class Blocklist:
    action: str = "discard"            # discard (250, dropped, logged) | reject (550 5.7.1)


@dataclass(frozen=True)
class Sync:
    region: str = ""                   # AWS_REGION
    endpoint_url: str = ""             # moto, S3-compatible stores; "" = AWS
    buckets: tuple[str, ...] = ()      # buckets sync may read
    queues: tuple[str, ...] = ()       # names or URLs; empty = {domain}-queue per served domain
    domains_file: str = ""             # optional domains.txt ("#" comments), added to domains
    inject: str = "127.0.0.1:10025"    # mailgate's listener: "host:port" or "unix:/path"
    concurrency: int = 8               # messages in flight (WORKER_THREADS)
    wait_time: float = 20 * SECONDS    # SQS long poll (POLL_INTERVAL)
    batch: int = 10                    # messages per receive (MAX_MESSAGES)
    visibility_timeout: float = 5 * MINUTES  # VISIBILITY_TIMEOUT
    processed: str = "tag"             # tag | keep | delete: what happens to a delivered object
    dead_letter_queue: str = ""        # "" = rely on the queue's redrive policy
    metrics: str = "127.0.0.1:8001"    # sync's own Prometheus port; "" = off
    secret_file: str = ""              # shared with serve: sync's XFEED proves the feed with it


@dataclass(frozen=True)
class Metrics:
    listen: str = "127.0.0.1:8000"     # Prometheus exposition; "" = off


@dataclass(frozen=True)
class Health:
    listen: str = "127.0.0.1:8080"     # GET /health, GET /domains; "" = off


@dataclass(frozen=True)
class Log:
    level: str = "info"
    syslog: bool = False               # also to syslog, facility mail, next to Postfix's lines
    syslog_socket: str = "/dev/log"


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)
    domains: tuple[str, ...] = ("localhost",)
    data_dir: str = field(default_factory=default_data_dir)
    listen: Listen = Listen()
    limits: Limits = Limits()
    delivery: Delivery = Delivery()
    pipeline: Pipeline = Pipeline()
    relay: Relay = Relay()
    dns: Dns = Dns()
    auth: Auth = Auth()
    store: Store = Store()
    blocklist: Blocklist = Blocklist()
    rules: Rules = Rules()
    vacation: Vacation = Vacation()
    sync: Sync = Sync()
    metrics: Metrics = Metrics()
    health: Health = Health()
    log: Log = Log()

    def maildir_template(self) -> str:
        return self.delivery.maildir.replace("{data_dir}", self.data_dir)


SECTIONS = {f.name: type(f.default) for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(f.default)}

# The maildir default lives in the data dir so a first run needs no /var/vmail.
EMBEDDED = {"delivery": {"maildir": "{data_dir}/mail/{domain}/{user}",
                         "create_maildirs": ["postmaster@localhost"]}}

# Names the seed deployments used for whole values.
LEGACY_VALUES = {
    "AWS_REGION": (("sync", "region"), ("store", "region"), ("relay", "region")),
    "DYNAMODB_RULES_TABLE": (("store", "rules_table"),),
    "DYNAMODB_BLOCKED_TABLE": (("store", "blocked_table"),),
    "DYNAMODB_OUTBOUND_TABLE": (("store", "outbound_table"),),
    "DYNAMODB_STATE_TABLE": (("store", "state_table"),),
    "WORKER_THREADS": (("sync", "concurrency"),),
    "POLL_INTERVAL": (("sync", "wait_time"),),
    "MAX_MESSAGES": (("sync", "batch"),),
    "VISIBILITY_TIMEOUT": (("sync", "visibility_timeout"),),
}
# Names the seed deployment used for one part of a host:port key (the other part is kept).
LEGACY_ENV = {
    "LMTP_HOST": ("delivery", "lmtp", "host"),
    "LMTP_PORT": ("delivery", "lmtp", "port"),
    "INTERNAL_SMTP_PORT": ("listen", "smtp", "port"),
    "SMTP_PORT": ("relay", "smtp", "port"),
    "METRICS_PORT": ("metrics", "listen", "port"),
    "HEALTH_PORT": ("health", "listen", "port"),
}


def find_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if environ.get("MAILGATE_CONFIG"):
        return Path(environ["MAILGATE_CONFIG"])
    return SYSTEM_CONFIG if _present(SYSTEM_CONFIG) else None


def _present(path: Path) -> bool:
    """Also true when it cannot be looked at (a 0750 directory): load() then says so in one line,
    instead of a traceback or a silent run on the embedded defaults."""
    try:
        path.stat()
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The config from `path` (or the usual places), with environment overrides, validated."""
    environ = os.environ if environ is None else environ
    found = find_file(path, environ)
    if found is None:
        raw: dict[str, Any] = {k: dict(v) for k, v in EMBEDDED.items()}
    else:
        try:
            raw = tomllib.loads(found.read_text())
        except OSError as e:
            raise ConfigError(f"{found}: cannot read: {e.strerror} (as user {_user()})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{found}: not valid TOML: {e}") from None
    apply_environment(raw, environ)
    return validate(build(Config, raw, ""))


def _user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


# MAILGATE_* names that are not config keys.
NOT_CONFIG = {"MAILGATE_CONFIG", "MAILGATE_DEBUG", "MAILGATE_FAULT"}


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, (section, key, part) in LEGACY_ENV.items():
        if environ.get(name):
            current = raw.get(section, {}).get(key) or getattr(SECTIONS[section](), key)
            host, _, port = current.rpartition(":")
            value = f"{environ[name]}:{port}" if part == "host" else f"{host}:{environ[name]}"
            raw.setdefault(section, {})[key] = EnvValue(value)
    for name, keys in LEGACY_VALUES.items():
        if environ.get(name):
            for section, key in keys:
                raw.setdefault(section, {})[key] = EnvValue(environ[name])
    for name, value in environ.items():
        if name.startswith("MAILGATE_") and name not in NOT_CONFIG:
            set_dotted(raw, name[len("MAILGATE_"):].lower(), EnvValue(value))


def set_dotted(raw: dict[str, Any], name: str, value: str) -> None:
    """MAILGATE_DELIVERY_LMTP_TIMEOUT -> raw['delivery']['lmtp_timeout'] (section first)."""
    section, _, key = name.partition("_")
    if section in SECTIONS:
        raw.setdefault(section, {})[key] = value
    else:
        raw[name] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key")
    values = {}
    for name, value in raw.items():
        if cls is Config and name in SECTIONS:
            values[name] = build(SECTIONS[name], value, f"{name}.")
        else:
            values[name] = coerce(value, fields[name].type, f"{prefix}{name}")
    return cls(**values)


def coerce(value: Any, ftype: str, key: str) -> Any:
    """TOML values as they are; environment strings converted to the field's type."""
    try:
        if ftype == "bool":
            if isinstance(value, EnvValue):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return _typed(value, bool)
        if ftype == "int":
            return int(value) if isinstance(value, EnvValue) else _typed(value, int)
        if ftype == "float":
            return float(value) if isinstance(value, EnvValue) else float(_typed(value, (int, float)))
        if ftype.startswith("tuple"):
            if isinstance(value, EnvValue):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            return tuple(value)
        return str(_typed(value, str))
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {ftype.replace('tuple[str, ...]', 'a list of strings')}, "
                          f"got {value!r}") from None


def _typed(value: Any, types: Any) -> Any:
    if isinstance(value, bool) and types is not bool:
        raise TypeError(value)
    if not isinstance(value, types):
        raise TypeError(value)
    return value


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

