"""The AWS clients sync uses (S3, SQS), and the thread pool their blocking calls run in.

boto3 is synchronous; its clients are thread-safe, so each call runs in a pool sized for the
messages in flight plus the pollers. (aiobotocore would pin botocore to narrow versions that the
rest of mailgate and moto do not share.) Errors stay botocore's: callers name queue and key.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from mailgate.config import Config

AWS_ERRORS = (BotoCoreError, ClientError)


def error_code(error: Exception) -> str:
    """"NoSuchKey", "AccessDenied", ... for a ClientError; the class name otherwise."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "ClientError"))
    return type(error).__name__


class Clients:
    def __init__(self, config: Config, threads: int):
        sync = config.sync
        session = boto3.session.Session(region_name=sync.region or None)
        options = BotoConfig(max_pool_connections=threads, retries={"mode": "standard"},
                             connect_timeout=10, read_timeout=max(30, sync.wait_time + 10))
        kwargs = dict(endpoint_url=sync.endpoint_url or None, config=options)
        self.s3 = session.client("s3", **kwargs)
        self.sqs = session.client("sqs", **kwargs)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="aws")

    async def call(self, method, **params):
        """Run one boto3 call (e.g. self.sqs.receive_message) in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(method, **params))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
