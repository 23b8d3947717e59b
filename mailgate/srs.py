"""The envelope sender of a forwarded copy, and the way back for its bounces (SRS).

Senders outside our domains become SRS addresses in ours (srslib: HMAC with a secret file the
hosts share, 21 days valid), so SPF holds at the target; `rules.bounce_address` replaces SRS
with one mailbox. A bounce to a valid SRS address goes back to the sender it stands for. A
secret that cannot be read is our failure: the caller answers 4xx.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from typing import TYPE_CHECKING

from mailgate.config import Config

if TYPE_CHECKING:
    import srslib

log = logging.getLogger("mailgate.srs")
SRS_LOCAL = re.compile(r"^SRS[01][-+=][^=]{4,}=", re.IGNORECASE)  # a hash of 4 or more


def is_local(address: str, domains: tuple[str, ...]) -> bool:
    return address.rpartition("@")[2].lower() in domains


class SenderRewriter:
    """The envelope sender of a forwarded copy: the null sender stays null, one of ours stays,
    anyone else becomes an SRS address in our domain (or the configured bounce address)."""

    def __init__(self, config: Config):
        self.settings = config.rules
        self.domains = config.domains
        self.secret_path = self.settings.srs_secret_file or os.path.join(config.data_dir,
                                                                         "srs-secret")
        self._srs: srslib.SRS | None = None  # made at the first external forward

    def rewrite(self, sender: str) -> str:
        if not sender or is_local(sender, self.domains):
            return sender
        if self.settings.bounce_address:
            return self.settings.bounce_address
        import srslib
        try:
            return self.srs.forward(sender, self.srs_domain)
        except srslib.Error as e:  # not an address SRS can carry: the bounce goes nowhere
            log.warning("SRS cannot rewrite <%s> (%s): forwarding with the null sender", sender, e)
            return ""

    def reverse(self, address: str) -> str | None:
        """Where a bounce to one of our SRS addresses goes: the original sender; None for any
        other address, a forged one or an expired one."""
        local, _, domain = address.rpartition("@")
        # XXX srslib checks a hash only as long as the one given: demand the full length, or a
        # one-letter hash would be guessed in 32 tries.
        if domain.lower() != self.srs_domain or not SRS_LOCAL.match(local):
            return None
        import srslib
        try:
            return self.srs.reverse(address)
        except srslib.Error:
            return None

    @property
    def srs_domain(self) -> str:
        return self.settings.srs_domain or self.domains[0]

    @property
    def srs(self) -> srslib.SRS:
        if self._srs is None:
            import srslib
            self._srs = srslib.SRS(read_secret(self.secret_path))
        return self._srs


def read_secret(path: str) -> str:
    """The SRS secret; made once (0600) if missing. Hosts that share forwarding share this file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    with open(path, encoding="ascii") as f:
        secret = f.read().strip()
    if not secret:
        raise OSError(f"{path}: empty SRS secret")
    return secret
