"""The operator's verbs on the store: `block add|remove|list`, `rule set|show|clear`, `store init`.

They work on either backend through the same Store the filters read. Bad input (an address, a
pattern, a date, an unreadable body file) is a UsageError: one line, exit 2, nothing written.
Something not there to remove is exit 1. Run as root, the SQLite file they create belongs to
the owner of its directory (the service user), so `serve` can still write it.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import sys
from typing import Any, Awaitable, Callable

from mailgate import UsageError, maildir
from mailgate.commands import SIMPLE_PATH
from mailgate.config import Config
from mailgate.filters.blocklist import check_pattern
from mailgate.store import Rule, Store, open_store
from mailgate.store.iam import policy, tables

DEFAULT_BODY = ("I am away at the moment and will read your message when I am back.\n"
                "This reply is sent once per sender.\n")


def with_store(config: Config, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = open_store(config)
        try:
            return await body(store)
        finally:
            await store.close()
    return asyncio.run(go())


def address(text: str, config: Config | None = None) -> str:
    """A plain address (local@domain); with `config`, one in the served domains."""
    text = text.strip()
    if not SIMPLE_PATH.fullmatch(f"<{text}>") or text.startswith("-"):
        raise UsageError(f"{text!r} is not an address (local@domain)")
    domain = text.rpartition("@")[2].lower()
    if config is not None and not (maildir.is_domain(domain) and domain in config.domains):
        raise UsageError(f"{text}: {domain} is not one of domains ({', '.join(config.domains)})")
    return text.lower()


# -- block ---------------------------------------------------------------------------------
def block(args: argparse.Namespace, config: Config) -> int:
    rcpt = address(args.address, config)
    if args.action == "list":
        patterns = with_store(config, lambda s: s.blocked([rcpt])).get(rcpt, ())
        for pattern in patterns:
            print(pattern)
        return 0
    try:
        pattern = check_pattern(args.pattern)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.action == "add":
        added = with_store(config, lambda s: s.add_block(rcpt, pattern))
        print(f"{rcpt}: {pattern} {'blocked' if added else 'was blocked already'}")
        return 0
    if with_store(config, lambda s: s.remove_block(rcpt, pattern)):
        print(f"{rcpt}: {pattern} unblocked")
        return 0
    print(f"mailgate block: {rcpt}: {pattern} was not blocked", file=sys.stderr)
    return 1


# -- rule ----------------------------------------------------------------------------------
def rule(args: argparse.Namespace, config: Config) -> int:
    rcpt = address(args.address, config)
    if args.action == "set":
        return set_rule(args, config, rcpt)
    if args.action == "clear":
        if with_store(config, lambda s: s.clear_rule(rcpt)):
            print(f"{rcpt}: rule cleared")
            return 0
        print(f"mailgate rule: {rcpt} has no rule", file=sys.stderr)
        return 1
    found = with_store(config, lambda s: s.rules([rcpt])).get(rcpt)
    if found is None:
        print(f"mailgate rule: {rcpt} has no rule", file=sys.stderr)
        return 1
    print(show(found), end="")
    return 0


def set_rule(args: argparse.Namespace, config: Config, rcpt: str) -> int:
    """Options given change the rule; the others keep what it had."""
    changes = changed_fields(args, rcpt)
    print(show(with_store(config, lambda store: change_rule(store, rcpt, changes))), end="")
    return 0


async def change_rule(store: Store, rcpt: str, changes: dict[str, Any]) -> Rule:
    """Read the rule, change the fields given, write the whole item back. The read is
    consistent (`Store.rule`), or the write could undo a change made just before."""
    old = await store.rule(rcpt) or Rule(rcpt)
    new = dataclasses.replace(old, **changes)
    if new.vacation and not new.body:
        new = dataclasses.replace(new, body=DEFAULT_BODY)
    check_dates(new)
    await store.set_rule(new)
    return new


def changed_fields(args: argparse.Namespace, rcpt: str) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.forward is not None:
        targets = tuple(dict.fromkeys(address(a) for a in args.forward if a.strip()))
        if rcpt in targets:
            raise UsageError(f"{rcpt} cannot forward to itself (keep a copy: --keep-copy)")
        changes["forward"] = targets
    if args.keep_copy is not None:
        changes["keep_copy"] = args.keep_copy
    if args.vacation is not None:
        changes["vacation"] = args.vacation == "on"
    if args.subject is not None:
        if any(ord(c) < 32 or ord(c) == 127 for c in args.subject):
            raise UsageError("--subject: one line, no control characters")
        changes["subject"] = args.subject.strip()
    if args.body_file is not None:
        changes["body"] = read_body(args.body_file)
    for name in ("start", "end"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value.strip() and iso_date(value, f"--{name}").isoformat()
    return changes


def read_body(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--body-file {path}: {getattr(e, 'strerror', None) or e}") from None


def iso_date(text: str, option: str) -> datetime.date | datetime.datetime:
    """An ISO 8601 date (2030-01-31) or date and time (2030-01-31T18:00+01:00)."""
    text = text.strip()
    try:
        if len(text) == 10:
            return datetime.date.fromisoformat(text)
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not an ISO 8601 date (2030-01-31 or "
                         "2030-01-31T18:00+01:00)") from None


def check_dates(new: Rule) -> None:
    if new.start and new.end and _instant(new.start) > _instant(new.end, end=True):
        raise UsageError(f"--end {new.end} is before --start {new.start}")


def _instant(text: str, end: bool = False) -> datetime.datetime:
    """A date as the start (or end) of that day; a time without offset as local time."""
    value = iso_date(text, "--end" if end else "--start")
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time.max if end else datetime.time.min)
    return value.astimezone()


def show(found: Rule) -> str:
    lines = [f"address:   {found.address}",
             f"forward:   {', '.join(found.forward) or '-'}",
             f"keep-copy: {'yes' if found.keep_copy else 'no'}",
             f"vacation:  {'on' if found.vacation else 'off'}",
             f"subject:   {found.subject or '(default: Auto: <original subject>)'}",
             f"start:     {found.start or '-'}",
             f"end:       {found.end or '-'}",
             "body:"]
    lines += [f"  {line}" for line in found.body.splitlines()] or ["  -"]
    return "\n".join(lines) + "\n"


# -- store ---------------------------------------------------------------------------------
def store(args: argparse.Namespace, config: Config) -> int:
    created = with_store(config, lambda s: s.ensure_tables())
    for name in created:
        print(f"created {name}")
    if config.store.backend == "sqlite":
        print("store: SQLite file ready (no cloud account, no IAM policy needed)")
        return 0
    print(f"tables present: {', '.join(tables(config.store))}")
    print("least IAM policy: the first statement for serve and sync, the second for these "
          "admin commands")
    print(json.dumps(policy(config.store), indent=2))
    return 0
