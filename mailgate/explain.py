"""`mailgate explain FILE.eml --from A --to B`: what the configured chain would do, and why.

Runs every configured filter on the message, as serve would (same config, same store, same
DNS), with Resources(dry_run=True), and prints per recipient each filter's verdict and reason
and the outcome. Nothing is delivered, sent or remembered: explain never reaches the gateway,
which is what delivers, forwards and sends auto-replies, and the filters get a store whose
writes do nothing (resources.ReadOnlyStore: bounce's "told" claim is not made). A filter
failing is shown, as the 451 serve would answer.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

from mailgate import UsageError
from mailgate.admin import address
from mailgate.config import Config
from mailgate.message import Client, Envelope, Message, parse, unparsed
from mailgate.pipeline import Chain
from mailgate.resources import Resources
from mailgate.verdict import Action, Verdict


@dataclass
class Report:
    message: Message
    steps: dict[str, list[tuple[str, Verdict | None]]] = field(default_factory=dict)
    at_rcpt: dict[str, Verdict] = field(default_factory=dict)
    headers: list[bytes] = field(default_factory=list)
    outbound: list = field(default_factory=list)


def command(args: argparse.Namespace, config: Config) -> int:
    sender = "" if args.sender.strip() in ("", "<>") else address(args.sender)
    recipients = tuple(dict.fromkeys(address(r, config) for r in args.recipients))
    raw = read_message(args.file)
    report = asyncio.run(explain(config, sender, recipients, raw))
    print(render(report, config), end="")
    return 0


def read_message(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    # .eml files usually have LF line ends; what arrives over SMTP has CRLF
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def explain(config: Config, sender: str, recipients: tuple[str, ...], raw: bytes) -> Report:
    resources = Resources(config, dry_run=True)
    try:
        chain = Chain.from_config(config, resources)
        envelope = Envelope("explain", sender, recipients, Client("127.0.0.1", "localhost"),
                            asyncio.get_running_loop().time())
        message = await parse(envelope, raw, config.limits) if chain.needs_parse \
            else unparsed(envelope, raw)
        report = Report(message)
        for rcpt in recipients:
            early = await chain.check_recipient(sender, rcpt)
            if early is not None:
                report.at_rcpt[rcpt] = early
        for flt in chain.filters:
            found = await run_filter(chain, flt, message, report)
            if found:  # as the chain hands them on (vacation: no reply to a forged sender)
                message = dataclasses.replace(message, findings=message.findings + found)
        return report
    finally:
        await resources.close()


async def run_filter(chain: Chain, flt, message: Message, report: Report) -> tuple:
    """Runs one filter into the report; what it found, for the filters after it."""
    if message.headers is None and getattr(flt, "needs_headers", True):
        for rcpt in message.envelope.recipients:
            report.steps.setdefault(rcpt, []).append(
                (flt.name, Verdict(Action.CONTINUE, f"skipped: {message.parse_error}")))
        return ()
    try:
        async with asyncio.timeout(chain.timeout):   # as the pipeline limits it
            result = await flt.check(message)
    except TimeoutError:
        result = Chain.defer_all(message, f"filter {flt.name} timed out after {chain.timeout:g} s")
    except Exception as e:  # noqa: BLE001 - shown, as serve's 451 for the same bug
        result = Chain.defer_all(message, f"filter {flt.name} failed: {type(e).__name__}: {e}")
    for rcpt in message.envelope.recipients:
        report.steps.setdefault(rcpt, []).append((flt.name, result.verdicts.get(rcpt)))
    report.headers += result.headers
    report.outbound += getattr(result, "outbound", ())
    return getattr(result, "findings", ())


# -- output --------------------------------------------------------------------------------
def render(report: Report, config: Config) -> str:
    env, msg = report.message.envelope, report.message
    subject = msg.headers.get("Subject", "") if msg.headers is not None else "(not parsed)"
    lines = [f"message: {len(msg.raw)} bytes from <{env.sender}>, Subject: {subject}",
             f"chain: {', '.join(config.pipeline.filters) or '(empty)'}", ""]
    for rcpt in env.recipients:
        lines += recipient_lines(report, rcpt) + [""]
    lines += [f"header added: {h.decode('utf-8', 'replace').rstrip()}" for h in report.headers]
    lines += [f"would send: {getattr(m, 'kind', 'mail')} to "
              f"{', '.join(f'<{r}>' for r in getattr(m, 'recipients', ()))}"
              f" once <{getattr(m, 'after', '?')}>'s copy is delivered" for m in report.outbound]
    lines.append(f"nothing was delivered or sent ({time.strftime('%Y-%m-%d %H:%M:%S %z')})")
    return "\n".join(lines) + "\n"


def recipient_lines(report: Report, rcpt: str) -> list[str]:
    lines = [f"<{rcpt}>"]
    early = report.at_rcpt.get(rcpt)
    if early is not None:
        return lines + [f"  at RCPT    {early.action.name.lower():9} {early.reason}",
                        f"  => refused at RCPT: {early.default_reply()}"]
    final = Verdict(Action.CONTINUE)
    for name, verdict in report.steps.get(rcpt, []):
        if verdict is None:
            lines.append(f"  {name:10} -         no opinion")
            continue
        lines.append(f"  {name:10} {verdict.action.name.lower():9} {verdict.reason}".rstrip())
        if verdict.action > final.action:   # as the chain decides: the strongest verdict wins
            final = verdict
    return lines + [f"  => {outcome(rcpt, final)}"]


def outcome(rcpt: str, verdict: Verdict) -> str:
    if verdict.action is Action.REJECT:
        return f"rejected: {verdict.default_reply()}"
    if verdict.action is Action.DEFER:
        return f"deferred (the sender retries): {verdict.default_reply()}"
    if verdict.action is Action.DISCARD:
        return f"discarded: the client hears {verdict.default_reply()}, nothing is delivered"
    if verdict.action is Action.REDIRECT:
        targets = verdict.redirect_to
        targets = [targets] if isinstance(targets, str) else list(targets or ())
        own = " and to its own mailbox" if getattr(verdict, "keep_copy", False) else ""
        what = ", ".join(f"<{t}>" for t in targets) or "a rewritten message"
        return f"redirected to {what}{own}"
    return f"delivered to the mailbox of <{rcpt}>"
