"""One frozen configuration tree (sections.py): embedded defaults, a TOML file, then environment
overrides, checked (checks.py). Loaded once at start and passed in explicitly. Anything wrong
(unknown key, bad type, bad value) raises ConfigError naming the key, so `mailgate
check-config` and `serve` fail before listening.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from mailgate.config.checks import parse_hostport, parse_nameserver, validate
from mailgate.config.sections import (DAYS, HOURS, MINUTES, SECONDS, SECTIONS, Auth, Blocklist,
                                      Config, ConfigError, Delivery, Dns, EnvValue, Health,
                                      KiB, Limits, Listen, Log, Metrics, MiB, Pipeline, Relay,
                                      Rules, Store, Sync, Vacation)

__all__ = ["DAYS", "HOURS", "MINUTES", "SECONDS", "KiB", "MiB", "Auth", "Blocklist", "Config",
           "ConfigError", "Delivery", "Dns", "Health", "Limits", "Listen", "Log", "Metrics",
           "Pipeline", "Relay", "Rules", "Store", "Sync", "Vacation", "find_file", "load",
           "parse_hostport", "parse_nameserver", "stray_environment", "validate"]

SYSTEM_CONFIG = Path("/etc/mailgate/mailgate.toml")

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
# Keys that follow a legacy name too unless they are set themselves (file or MAILGATE_*): sync
# injects into serve's SMTP listener, wherever INTERNAL_SMTP_PORT moved it.
LEGACY_FOLLOW = {
    "INTERNAL_SMTP_PORT": ("sync", "inject", "port"),
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
            raw = tomllib.loads(found.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{found}: cannot read: {e.strerror} (as user {_user()})") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8 (a file saved as Latin-1, a binary)
            raise ConfigError(f"{found}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                              f"offset {e.start}; save it as UTF-8") from None
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
# What Kubernetes sets for a Service named mailgate or mailgate-<anything> (MAILGATE_PORT,
# MAILGATE_METRICS_SERVICE_HOST, MAILGATE_PORT_25_TCP_ADDR, ...): never a config key.
SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)"
                          r"(_ADDR|_PORT|_PROTO)?)?)\Z")
TOP_LEVEL = {f.name for f in dataclasses.fields(Config)} - set(SECTIONS)


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    follow = [(name, target) for name, target in LEGACY_FOLLOW.items()
              if environ.get(name) and target[1] not in _table(raw, target[0])
              and not environ.get(f"MAILGATE_{target[0]}_{target[1]}".upper())]
    for name, (section, key, part) in [*LEGACY_ENV.items(), *follow]:
        if environ.get(name):
            current = _table(raw, section).get(key) or getattr(SECTIONS[section](), key)
            host, _, port = current.rpartition(":")
            value = f"{environ[name]}:{port}" if part == "host" else f"{host}:{environ[name]}"
            raw.setdefault(section, {})[key] = EnvValue(value)
    for name, keys in LEGACY_VALUES.items():
        if environ.get(name):
            for section, key in keys:
                _table(raw, section)
                raw.setdefault(section, {})[key] = EnvValue(environ[name])
    ignored = stray_environment(environ) | NOT_CONFIG
    for name, value in environ.items():
        if name.startswith("MAILGATE_") and name not in ignored:
            set_dotted(raw, name, EnvValue(value))


def stray_environment(environ: Mapping[str, str]) -> set[str]:
    """MAILGATE_* names that do not look like a setting at all: ignored (the commands warn),
    where one that names a section or top-level key it does not have is a config error.
    Kubernetes' service links, or a variable of another program, must not stop mailgate."""
    return {name for name in environ
            if name.startswith("MAILGATE_") and name not in NOT_CONFIG
            and (SERVICE_LINK.search(name) or _section_key(name)[0] not in SECTIONS
                 and name[len("MAILGATE_"):].lower() not in TOP_LEVEL)}


def _section_key(name: str) -> tuple[str, str]:
    section, _, key = name[len("MAILGATE_"):].lower().partition("_")
    return section, key


def _table(raw: dict[str, Any], section: str) -> dict[str, Any]:
    """raw's section, to add an environment value to: a file's `listen = "x"` is an error."""
    table = raw.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: expected a table")
    return table


def set_dotted(raw: dict[str, Any], name: str, value: str) -> None:
    """MAILGATE_DELIVERY_LMTP_TIMEOUT -> raw['delivery']['lmtp_timeout'] (section first); a key
    the section does not have is an error naming the variable as it was set."""
    section, key = _section_key(name)
    if section in SECTIONS:
        if not key:
            raise ConfigError(f"{name} (environment): [{section}] is a section: set "
                              f"{name}_<KEY>")
        if key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"{name} (environment): unknown key {section}.{key}")
        _table(raw, section)
        raw.setdefault(section, {})[key] = value
    else:
        raw[name[len("MAILGATE_"):].lower()] = value


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
