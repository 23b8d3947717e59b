"""mailgate: a mail gateway in front of Dovecot (SMTP/LMTP in, filter chain, LMTP or maildir out)."""

__version__ = "0.1.0"


class UsageError(Exception):
    """Bad input on the command line (an address, a date, a pattern): one line, exit 2."""
