"""Addresses and domains in the one form they are compared in: local parts case-folded in ASCII
only, as Dovecot and Postfix fold them; internationalized domains as A-labels.

Python's str.lower() also folds some non-ASCII letters into ASCII ones (U+212A KELVIN SIGN
becomes "k"), so "\u212aate@" would share kate's cache entry, duplicate check and maildir,
while Dovecot's %Lu and Postfix leave it a different (and, for Dovecot, invalid) name.
"""
from __future__ import annotations

import encodings.idna

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(address: str) -> str:
    """`address` with A-Z lower-cased and nothing else changed."""
    return address.translate(_ASCII_LOWER)


def a_labels(domain: str) -> str:
    """The domain lower-cased, each internationalized label in its ASCII form (IDNA: `bücher` is
    `xn--bcher-kva`), as DNS and mail that is not SMTPUTF8 name it: one domain in two forms is
    one (RFC 8616 §4). A label with a `*` (a blocklist pattern) stays as it is; a domain that
    cannot be converted stays as it is (it then matches only as written)."""
    domain = domain.lower()
    if domain.isascii():
        return domain
    labels = []
    for label in domain.split("."):
        if "*" in label or label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(encodings.idna.ToASCII(label).decode("ascii"))
        except UnicodeError:
            return domain
    return ".".join(labels)
