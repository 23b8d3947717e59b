"""The attributes of a rules item, the same in both backends (README: "The store's tables").

Reading is lenient about what other tools wrote into the deployments' existing tables (a
forward list as a list, a set or one comma-separated string; flags as booleans or numbers);
writing is always the one documented shape.
"""
from __future__ import annotations

import datetime
from typing import Any, Mapping

from mailgate.store import Rule, normal

# attribute -> Rule field
RULE_ATTRIBUTES = {
    "forward_to": "forward",
    "keep_copy": "keep_copy",
    "vacation": "vacation",
    "vacation_subject": "subject",
    "vacation_body": "body",
    "vacation_start": "start",
    "vacation_end": "end",
}


def rule_to_item(rule: Rule) -> dict[str, Any]:
    """The item written for a rule: booleans always, lists and texts only when not empty."""
    item: dict[str, Any] = {"email_address": normal(rule.address),
                            "keep_copy": rule.keep_copy, "vacation": rule.vacation,
                            "updated_at": now_iso()}
    if rule.forward:
        item["forward_to"] = list(rule.forward)
    for attribute, name in RULE_ATTRIBUTES.items():
        value = getattr(rule, name)
        if isinstance(value, str) and value:
            item[attribute] = value
    return item


def rule_from_item(address: str, item: Mapping[str, Any]) -> Rule:
    return Rule(address=address,
                forward=_addresses(item.get("forward_to")),
                keep_copy=_flag(item.get("keep_copy"), True),
                vacation=_flag(item.get("vacation"), False),
                subject=str(item.get("vacation_subject") or ""),
                body=str(item.get("vacation_body") or ""),
                start=str(item.get("vacation_start") or ""),
                end=str(item.get("vacation_end") or ""))


def _addresses(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    elif isinstance(value, (set, frozenset)):  # a DynamoDB string set has no order
        value = sorted(value)
    return tuple(dict.fromkeys(s for s in (str(v).strip() for v in value) if s))


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
