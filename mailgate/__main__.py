"""mailgate: serve, sync, the admin verbs and the checks.

Exit 0 ok, 1 failed or unhealthy,
2 usage or config error. No traceback reaches an operator: errors are one line on stderr
(MAILGATE_DEBUG=1 shows the traceback of an unexpected one).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import urllib.error
import urllib.request

from mailgate import UsageError, __version__
from mailgate.config import ConfigError, find_file, load, stray_environment

CONFIG_HELP = ("TOML file (default: $MAILGATE_CONFIG, /etc/mailgate/mailgate.toml if present, "
               "else embedded defaults)")

# verb -> "module:function"; each function takes (args, config) and returns the exit status.
VERBS = {
    "serve": "mailgate.service:command",
    "check-config": "check_config",   # no module: defined below
    "status": "status",
    "sync": "mailgate.s3sync:command",
    "block": "mailgate.admin:block",
    "rule": "mailgate.admin:rule",
    "store": "mailgate.admin:store",
    "explain": "mailgate.explain:command",
    "doctor": "mailgate.doctor:command",
}


def _config_option(parser: argparse.ArgumentParser) -> None:
    """-c FILE, before the verb or after it (SUPPRESS: a later parser keeps an earlier value)."""
    parser.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=CONFIG_HELP)


def _sub(commands, name: str, text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=text, description=text)
    _config_option(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    _config_option(parser)
    parser.set_defaults(config=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _sub(commands, "serve", "run the SMTP and LMTP listeners")
    _sub(commands, "check-config", "validate the configuration and exit")
    _sub(commands, "status", "print the health of a running mailgate")
    _add_sync(commands)
    _add_block(commands)
    _add_rule(commands)
    store = _sub(commands, "store", "manage the store's tables")
    store_verbs = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    _sub(store_verbs, "init", "create every missing table; print the IAM actions mailgate needs")
    explain = _sub(commands, "explain", "say what the filter chain would do with a message, "
                                        "per recipient, delivering and sending nothing")
    explain.add_argument("file", metavar="FILE.eml")
    explain.add_argument("--from", dest="sender", required=True, metavar="ADDRESS")
    explain.add_argument("--to", dest="recipients", action="append", required=True,
                         metavar="ADDRESS")
    doctor = _sub(commands, "doctor", "check Postfix, Dovecot and mailgate against each other")
    doctor.add_argument("--postfix-config", metavar="DIR", default=None)
    doctor.add_argument("--dovecot-config", metavar="FILE", default=None)
    return parser


def _add_sync(commands) -> None:
    sync = _sub(commands, "sync", "pull the mail SES stored in S3 and inject it into serve")
    sync.add_argument("--once", action="store_true",
                      help="process what is visible now, then exit 0")
    sync.set_defaults(action=None)
    actions = sync.add_subparsers(dest="action", metavar="ACTION")
    replay = _sub(actions, "replay", "re-inject stored mail (same idempotency as the feed)")
    replay.add_argument("--bucket", required=True)
    replay.add_argument("--prefix", default="")
    replay.add_argument("--since", metavar="DATE", default=None, help="ISO 8601 date")
    replay.add_argument("--to", dest="recipient", metavar="ADDRESS", default=None)


def _add_block(commands) -> None:
    block = _sub(commands, "block", "per-recipient sender blocklist")
    actions = block.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("add", "block PATTERN for ADDRESS"), ("remove", "unblock PATTERN")):
        sub = _sub(actions, name, text)
        sub.add_argument("address", metavar="ADDRESS")
        sub.add_argument("pattern", metavar="PATTERN", help="*@spam.test, *.bad.test, a@b.test")
    _sub(actions, "list", "the patterns blocked for ADDRESS").add_argument(
        "address", metavar="ADDRESS")


def _add_rule(commands) -> None:
    rule = _sub(commands, "rule", "forwarding and out-of-office rules per address")
    actions = rule.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_ = _sub(actions, "set", "create or change the rule for ADDRESS")
    set_.add_argument("address", metavar="ADDRESS")
    set_.add_argument("--forward", action="append", metavar="ADDR", default=None)
    set_.add_argument("--keep-copy", action=argparse.BooleanOptionalAction, default=None)
    set_.add_argument("--vacation", choices=("on", "off"), default=None)
    set_.add_argument("--subject", metavar="TEXT", default=None)
    set_.add_argument("--body-file", metavar="FILE", default=None)
    set_.add_argument("--start", metavar="DATE", default=None, help="ISO 8601")
    set_.add_argument("--end", metavar="DATE", default=None, help="ISO 8601")
    for name, text in (("show", "print the rule for ADDRESS"), ("clear", "remove it")):
        _sub(actions, name, text).add_argument("address", metavar="ADDRESS")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from mailgate.pipeline import validate
        config = validate(load(args.config))
        for name in sorted(stray_environment(os.environ)):   # a Kubernetes service link
            print(f"mailgate: warning: {name} (environment): not a mailgate setting, ignored",
                  file=sys.stderr)
        module, _, function = VERBS[args.command].rpartition(":")
        namespace = importlib.import_module(module) if module else sys.modules[__name__]
        return getattr(namespace, function)(args, config)
    except ConfigError as e:
        print(f"mailgate: config error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"mailgate {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("MAILGATE_DEBUG"):
            raise
        print(f"mailgate {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def check_config(args: argparse.Namespace, config) -> int:
    print(f"{find_file(args.config, os.environ) or 'embedded defaults'}: ok")
    return 0


def status(args: argparse.Namespace, config) -> int:
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
    reload_error = body.get("config", {}).get("reload_error")
    if reload_error:  # running on the previous config; a restart would fail the same way
        print(f"  config:    RELOAD REFUSED, running the previous config: {reload_error}")
    return 0 if healthy and not reload_error else 1


if __name__ == "__main__":
    sys.exit(main())
