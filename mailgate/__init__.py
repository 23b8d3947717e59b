"""mailgate: a mail gateway in front of Dovecot (SMTP/LMTP in, filter chain, LMTP or maildir out)."""

__version__ = "0.1.0"
