"""The `auth` filter: SPF, DKIM, DMARC and ARC, reported in one Authentication-Results header.

The checks' DNS lookups run concurrently through the shared resolver, within the message's DNS
budget; a lookup that fails makes that check `temperror`, never a rejection. Incoming
Authentication-Results that claim our authserv-id are removed (RFC 8601 §5). Only a DMARC
failure under p=reject with `dmarc_action = "reject"` refuses mail (550 5.7.1).
"""
from __future__ import annotations

import asyncio
import logging

from mailgate import metrics
from mailgate.config import Config
from mailgate.filters.auth import dmarc, fields, sender, signatures
from mailgate.filters.auth.results import Result, render
from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.resources import Resources
from mailgate.verdict import DMARC_REJECTED, Action, Verdict

log = logging.getLogger("mailgate.auth")
QUARANTINE = b"X-Mailgate-Quarantine: dmarc\r\n"
LARGE_HEADER = 256 * 1024   # bytes of header read on the event loop in one go (~12 ms)


class Auth:
    name = "auth"
    needs_headers = False  # reads the raw bytes itself: messages the parser gave up on too
    uses_dns = True        # pipeline.validate: dns.budget must fit inside filter_timeout

    def __init__(self, config: Config, resources: Resources):
        self.hostname = config.hostname
        self.settings = config.auth
        self.dns = resources.dns
        dmarc.load()
        signatures.install()

    async def check(self, message: Message) -> FilterResult:
        env = message.envelope
        if len(message.raw) > LARGE_HEADER and \
                message.raw.find(b"\r\n\r\n", 0, LARGE_HEADER) < 0:
            header = await fields.read_in_slices(message.raw)
        else:
            header = fields.read(message.raw)
        from_domain, from_problem = fields.from_domain(header)
        budget = self.dns.budget()
        spf = sender.known(self.dns, env.client, env.sender, self.hostname)
        found = (None, False, "") if from_problem else dmarc.known_policy(self.dns, from_domain)
        signed = signatures.check(self.dns, budget, message.raw, header,
                                  self.settings.max_signatures, self.settings.max_key_bits)
        if spf is not None and found is not None:  # a warm cache: no lookups, so no tasks
            dkims, arc = await signed
        else:  # the lookups of all three at once
            spf, (dkims, arc), found = await asyncio.gather(
                sender.check(self.dns, budget, env.client, env.sender, self.hostname), signed,
                self._policy(budget, from_domain, from_problem))
        dmarc_result, disposition = dmarc.judge(from_domain, from_problem, found, spf, dkims)
        results = [spf, *dkims, dmarc_result, arc]
        forged = fields.forged_results(header, self.hostname)
        self._account(env.queue_id, results, forged)
        action = self._action(disposition, env.client.local)
        headers = [render(self.hostname, results, env.feed_verdicts)]
        # For the filters after this one (vacation: no reply to a forged sender).
        findings = tuple((r.method, r.result) for r in results)
        if action in ("quarantine", "reject"):
            headers.append(QUARANTINE)
            findings += (("quarantine", "dmarc"),)
        verdicts = {}
        if action == "reject":
            log.info("%s: DMARC reject: header.from=%s", env.queue_id, from_domain)
            verdict = Verdict(Action.REJECT, f"DMARC policy of {from_domain}: reject",
                              DMARC_REJECTED)
            verdicts = {rcpt: verdict for rcpt in env.recipients}
        return FilterResult(verdicts, tuple(headers), tuple((f.start, f.end) for f in forged),
                            findings=findings)

    async def _policy(self, budget, from_domain: str, from_problem: str):
        if from_problem:
            return None, False, ""
        return await dmarc.find_policy(self.dns, budget, from_domain)

    def _action(self, disposition: str, local: bool) -> str:
        """What we do about a DMARC failure: the domain's wish, as far as dmarc_action allows.
        Local mail (a trusted peer without XFORWARD) is annotated only."""
        wanted = self.settings.dmarc_action
        if local or wanted == "annotate" or disposition == "none":
            return "annotate"
        if disposition == "reject" and wanted == "reject":
            return "reject"
        return "quarantine"

    @staticmethod
    def _account(queue_id: str, results: list[Result], forged: tuple) -> None:
        for r in results:
            metrics.child(metrics.AUTH_RESULTS, r.method, r.result).inc()
        if forged:
            metrics.AUTH_FORGED.inc(len(forged))
            log.info("%s: removed %d Authentication-Results claiming to be ours", queue_id,
                     len(forged))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: auth: %s", queue_id, " ".join(f"{r.method}={r.result}" for r in results))
