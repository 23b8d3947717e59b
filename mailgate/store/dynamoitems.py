"""The boto3 calls of the DynamoDB backend, each run on a worker thread (never on the loop).

Items are plain dicts here; boto3's TypeSerializer/TypeDeserializer convert them. Expected
outcomes (a claim that loses, a pattern that was there) are return values; what the network or
the service says goes up as one of ERRORS, which the caller turns into StoreUnavailable.
"""
from __future__ import annotations

import decimal
import secrets
import time
from typing import Any

import boto3
import botocore.config
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as NoConnection

from mailgate.store import StoreUnavailable
from mailgate.store.items import now_iso

ERRORS = (BotoCoreError, ClientError, StoreUnavailable)
THROTTLING = {"ProvisionedThroughputExceededException", "ThrottlingException",
              "RequestLimitExceeded"}
BATCH = 100            # BatchGetItem's limit of keys per request
UNPROCESSED_ROUNDS = 4  # retries of throttled keys, with backoff, inside the caller's deadline
SCAN_PAGES = 100       # bound on a state scan (read at start only)
_to, _from = TypeSerializer(), TypeDeserializer()


def make_client(settings: Any, pool: int) -> Any:
    return boto3.session.Session().client(
        "dynamodb", region_name=settings.region or None, endpoint_url=settings.endpoint_url or None,
        config=botocore.config.Config(
            connect_timeout=settings.timeout, read_timeout=settings.timeout,
            retries={"mode": "standard", "total_max_attempts": 2}, max_pool_connections=pool))


def describe(error: Exception) -> str:
    if isinstance(error, ClientError):
        return f"{error.response['Error'].get('Code')}: {error.response['Error'].get('Message')}"
    return f"{type(error).__name__}: {error}"


def outage(error: Exception) -> bool:
    """Whether an error says DynamoDB cannot be asked now (the network, a timeout, throttling,
    a 5xx), rather than that this one request was wrong (a missing table, a denied action)."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code(error) in THROTTLING or status >= 500
    return isinstance(error, (NoConnection, HTTPClientError, StoreUnavailable))


def code(error: ClientError) -> str:
    return error.response["Error"].get("Code", "")


def to_item(plain: dict) -> dict:
    return {k: _to.serialize(_number(v)) for k, v in plain.items() if v is not None}


def from_item(item: dict) -> dict:
    return {k: _from.deserialize(v) for k, v in item.items()}


def _number(value: Any) -> Any:
    """DynamoDB numbers are Decimals; boto3 refuses floats."""
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, list):
        return [_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _number(v) for k, v in value.items()}
    return value


def patterns(item: dict) -> tuple[str, ...]:
    return tuple(sorted(str(p).lower() for p in item.get("blocked_senders") or ()))


# -- reads -------------------------------------------------------------------------------
def batch_get(client: Any, table: str, keys: list[str]) -> dict[str, dict | None]:
    """Every key's item (None: no item), BatchGetItem by 100, throttled keys asked again."""
    found: dict[str, dict | None] = dict.fromkeys(keys)
    for start in range(0, len(keys), BATCH):
        request = {table: {"Keys": [{"email_address": {"S": k}} for k in keys[start:start + BATCH]]}}
        for round_ in range(UNPROCESSED_ROUNDS):
            response = client.batch_get_item(RequestItems=request)
            for item in response.get("Responses", {}).get(table, []):
                plain = _plain(from_item(item))
                found[plain["email_address"]] = plain
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            time.sleep(0.05 * 2 ** round_)  # on a worker thread: throttling backoff
        else:
            raise StoreUnavailable(f"{table}: keys left unprocessed (throttled)")
    return found


def get(client: Any, table: str, key: dict, consistent: bool = False) -> dict | None:
    response = client.get_item(TableName=table, Key=to_item(key), ConsistentRead=consistent)
    return _plain(from_item(response["Item"])) if "Item" in response else None


def _plain(item: dict) -> dict:
    """Decimals as int or float, sets as sorted lists: what json and the filters expect."""
    def one(value: Any) -> Any:
        if isinstance(value, decimal.Decimal):
            return int(value) if value == value.to_integral_value() else float(value)
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, list):
            return [one(v) for v in value]
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value
    return {k: one(v) for k, v in item.items()}


def state_keys(client: Any, table: str, prefix: str, now: float) -> list[str]:
    keys: list[str] = []
    args = {"TableName": table, "ProjectionExpression": "state_key",
            "FilterExpression": "begins_with(state_key, :p) AND expires_at > :now",
            "ExpressionAttributeValues": to_item({":p": prefix, ":now": now})}
    for _ in range(SCAN_PAGES):
        response = client.scan(**args)
        keys += [from_item(item)["state_key"] for item in response.get("Items", [])]
        if "LastEvaluatedKey" not in response:
            return keys
        args["ExclusiveStartKey"] = response["LastEvaluatedKey"]
    raise StoreUnavailable(f"{table}: more than {SCAN_PAGES} pages of state")


# -- writes ------------------------------------------------------------------------------
def put(client: Any, table: str, item: dict) -> None:
    client.put_item(TableName=table, Item=to_item(item))


def delete(client: Any, table: str, key: dict) -> bool:
    response = client.delete_item(TableName=table, Key=to_item(key), ReturnValues="ALL_OLD")
    return bool(response.get("Attributes"))


def claim(client: Any, table: str, key: str, expires: float) -> bool:
    """A conditional put: wins when the key is absent or expired (TTL deletion is lazy).

    botocore tries a request again when its reply is lost (a reset, a 500 after the write):
    the second try then finds our own item. Each claim writes a random owner, so a failed
    condition on an item that is ours is the claim won, not lost."""
    owner = secrets.token_hex(16)
    try:
        client.put_item(TableName=table, Item=to_item({"state_key": key, "expires_at": expires,
                                                       "owner": owner}),
                        ConditionExpression="attribute_not_exists(state_key) OR expires_at <= :now",
                        ExpressionAttributeValues=to_item({":now": time.time()}),
                        ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as e:
        if code(e) == "ConditionalCheckFailedException":
            return _written_by(client, table, {"state_key": key}, e, "owner", owner)
        raise
    return True


def change_pattern(client: Any, table: str, address: str, pattern: str, add: bool) -> bool:
    """ADD to or DELETE from the string set; False when that would change nothing (a random
    change_id tells our own earlier try, whose reply was lost, from a change made before)."""
    verb, test = ("ADD", "NOT contains") if add else ("DELETE", "contains")
    change = secrets.token_hex(16)
    try:
        client.update_item(
            TableName=table, Key=to_item({"email_address": address}),
            UpdateExpression=f"{verb} blocked_senders :p SET updated_at = :now, change_id = :id",
            ConditionExpression=f"{test}(blocked_senders, :one)",
            ExpressionAttributeValues=to_item({":p": {pattern}, ":one": pattern,
                                               ":now": now_iso(), ":id": change}),
            ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as e:
        if code(e) == "ConditionalCheckFailedException":
            return _written_by(client, table, {"email_address": address}, e, "change_id", change)
        raise
    return True


def _written_by(client: Any, table: str, key: dict, error: ClientError, name: str,
                token: str) -> bool:
    """Whether the item a condition failed on carries our token: the item DynamoDB returned
    with the failure, or (an endpoint that does not return it) a consistent read."""
    if "Item" in error.response:
        item = from_item(error.response["Item"])
    else:
        item = get(client, table, key, consistent=True) or {}
    return item.get(name) == token


# -- tables ------------------------------------------------------------------------------
KEYS = {"rules": "email_address", "blocked": "email_address", "outbound": "message_id",
        "state": "state_key"}
TTL_ATTRIBUTE = {"outbound": "expires_at", "state": "expires_at"}


def ensure_tables(client: Any, tables: dict[str, str]) -> list[str]:
    """Create each missing table (on demand billing, TTL where the kind has one)."""
    created = []
    for kind, name in tables.items():
        try:
            client.describe_table(TableName=name)
            continue
        except ClientError as e:
            if code(e) != "ResourceNotFoundException":
                raise
        try:
            client.create_table(
                TableName=name, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": KEYS[kind], "AttributeType": "S"}],
                KeySchema=[{"AttributeName": KEYS[kind], "KeyType": "HASH"}])
            created.append(name)
        except ClientError as e:
            if code(e) != "ResourceInUseException":
                raise
            # Another host made it a moment ago, or botocore's second try of our own request
            # whose reply was lost: either way it still needs its TTL once it exists.
        client.get_waiter("table_exists").wait(
            TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        if kind in TTL_ATTRIBUTE:
            try:
                client.update_time_to_live(TableName=name, TimeToLiveSpecification={
                    "Enabled": True, "AttributeName": TTL_ATTRIBUTE[kind]})
            except ClientError as e:
                if code(e) != "ValidationException" or name in created:
                    raise   # not made by us: its maker has enabled it already, or is doing so
    return created
