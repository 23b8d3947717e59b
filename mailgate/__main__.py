"""Command line: `mailgate serve | check-config | status`. Exit 0 ok, 1 unhealthy, 2 usage/config."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from mailgate import __version__
from mailgate.config import ConfigError, find_file, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the SMTP and LMTP listeners"),
                       ("check-config", "validate the configuration and exit"),
                       ("status", "print the health of a running mailgate")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("-c", "--config", metavar="FILE",
                         help="TOML file (default: $MAILGATE_CONFIG, /etc/mailgate/mailgate.toml "
                              "if present, else embedded defaults)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"mailgate: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{find_file(args.config, os.environ) or 'embedded defaults'}: ok")
        return 0
    if args.command == "status":
        return status(config)
    from mailgate.service import run
    return run(config, args.config)


def status(config) -> int:
    if not config.health.listen:
        print("health endpoint disabled (health.listen is empty)", file=sys.stderr)
        return 2
    url = f"http://{config.health.listen}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body, healthy = json.load(response), True
    except urllib.error.HTTPError as e:
        body, healthy = json.load(e), False
    except OSError as e:
        print(f"mailgate is not answering at {url}: {getattr(e, 'reason', e)}")
        return 1
    dovecot = body["dovecot"]
    print(f"mailgate {body['version']}: {body['status']} (up {body['uptime_seconds']:.0f} s)")
    print(f"  listeners: smtp={body['listeners']['smtp'] or 'off'} lmtp={body['listeners']['lmtp'] or 'off'}")
    print(f"  dovecot:   {'answers' if dovecot['answers'] else 'NOT answering'} ({dovecot['detail']})")
    print(f"  fallback:  {'maildir' if body['maildir_fallback'] else 'off'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
