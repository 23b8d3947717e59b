"""The configuration tree: one frozen dataclass per TOML section, defaults with their units.

Pure data: nothing here reads a file or the environment (the package's load() does), and
nothing here checks values across keys (checks.py does).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS
KiB = 1024
MiB = 1024 * KiB

class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""


class EnvValue(str):
    """A value from the environment: text to convert, where TOML values must already be typed."""


SYSTEM_DATA_DIR = "/var/lib/mailgate"   # the unit's StateDirectory=mailgate


def default_data_dir() -> str:
    """systemd's StateDirectory; else /var/lib/mailgate for root and for whoever may write it
    (the service user: `runuser -u vmail -- mailgate block add ...` must reach the store serve
    reads); else the user's data dir."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0 or _writable_dir(SYSTEM_DATA_DIR):
        return SYSTEM_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "mailgate")


def _writable_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return os.path.isdir(path) and (st.st_uid == os.geteuid() or os.access(path, os.W_OK))


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
    # How long partial deliveries are remembered: as long as the sender retries (Postfix's
    # maximal_queue_lifetime), or a permanent failure among the recipients, answered 451 over
    # SMTP, redelivers to the others once the record is gone.
    delivery_record: float = 5 * DAYS


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
