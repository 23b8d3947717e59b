"""Named crash points for the fault-injection tests; inert unless MAILGATE_FAULT is set.

MAILGATE_FAULT=<point> SIGKILLs the process when it reaches that point (a crash: the OOM killer,
a power cut); MAILGATE_FAULT=<point>:raise raises FaultInjected there instead (a bug). The
variable is read once at import; unset, `point()` is one truth test. docs/RELIABILITY.md lists
the points and what each one must cost (nothing lost; a duplicate only inside RFC 1047's window).
"""
from __future__ import annotations

import os
import signal

POINTS = (
    "mail",                    # a MAIL command is being answered (in the session, no task)
    "rcpt",                    # a RCPT is being checked
    "data",                    # a piece of the message is being read
    "after-data",              # the whole message is in, nothing delivered yet
    "before-lmtp-dot",         # the message's end (DATA's ".", or BDAT LAST) not yet sent
    "after-lmtp-250",          # Dovecot said 250, the client has not heard ours
    "before-fallback-rename",  # the maildir file is in tmp/, fsynced, not yet in new/
    "after-fallback-rename",   # the maildir file is in new/, the client has not heard ours
    "before-reply",            # every recipient is settled, our reply not yet sent
)


class FaultInjected(RuntimeError):
    """Raised at a point armed with ":raise": stands for a bug at that place."""


def _armed(value: str) -> tuple[str, str] | None:
    name, _, action = value.partition(":")
    if not name:
        return None
    if name not in POINTS or action not in ("", "kill", "raise"):
        raise ValueError(f"MAILGATE_FAULT={value!r}: points are {', '.join(POINTS)}; "
                         "actions kill (default), raise")
    return name, action or "kill"


ARMED = _armed(os.environ.get("MAILGATE_FAULT", ""))


def point(name: str) -> None:
    """Crash or raise here if MAILGATE_FAULT names this point."""
    if ARMED is None or ARMED[0] != name:
        return
    if ARMED[1] == "raise":
        raise FaultInjected(f"fault injected at {name}")
    os.kill(os.getpid(), signal.SIGKILL)
