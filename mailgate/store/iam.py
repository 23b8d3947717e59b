"""The least IAM actions mailgate needs on its DynamoDB tables, as `mailgate store init` prints.

Kept next to the calls in dynamoitems.py: a new boto3 call there needs its action here.
"""
from __future__ import annotations

from typing import Any

from mailgate.store import TABLES

# kind -> actions, for the service (serve: filters, delivery record; sync: claims)
SERVICE = {
    "rules": ("BatchGetItem",),
    "blocked": ("BatchGetItem",),
    "outbound": ("GetItem", "PutItem"),
    "state": ("GetItem", "PutItem", "DeleteItem", "Scan",            # claims, delivery record
              "DescribeTable", "CreateTable", "UpdateTimeToLive"),   # serve makes it if missing
}
# kind -> actions, for the admin commands (block, rule, store init)
ADMIN = {
    "rules": ("GetItem", "BatchGetItem", "PutItem", "DeleteItem"),  # GetItem: rule set's read
    "blocked": ("BatchGetItem", "UpdateItem"),
    "outbound": (),
    "state": (),
}
CREATE = ("DescribeTable", "CreateTable", "UpdateTimeToLive")   # store init, every table


def tables(settings: Any) -> list[str]:
    return [getattr(settings, f"{kind}_table") for kind in TABLES]


def policy(settings: Any) -> dict:
    region = settings.region or "*"

    def statement(sid: str, actions: dict[str, tuple[str, ...]], extra: tuple = ()) -> dict:
        wanted = sorted({f"dynamodb:{a}" for kind in TABLES for a in actions[kind] + extra})
        return {"Sid": sid, "Effect": "Allow", "Action": wanted,
                "Resource": [f"arn:aws:dynamodb:{region}:*:table/{name}"
                             for kind, name in zip(TABLES, tables(settings))
                             if actions[kind] or extra]}
    return {"Version": "2012-10-17",
            "Statement": [statement("MailgateService", SERVICE),
                          statement("MailgateAdmin", ADMIN, CREATE)]}
