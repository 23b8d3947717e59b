"""moto's server answering one request at a time: `python moto_one_at_a_time.py -H HOST -p PORT`.

moto answers each request on its own thread, and its conditional PutItem reads the item, then
writes it: two claims of one key that meet there both win, where DynamoDB lets one win. A
DynamoDB shared by several processes is tested here, one request after another. (Not for SQS:
a long poll would hold every other request.)
"""
from __future__ import annotations

import argparse

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    create_backend_app,
)
from werkzeug.serving import run_simple

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", required=True)
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    run_simple(args.host, args.port, DomainDispatcherApplication(create_backend_app),
               threaded=False)
