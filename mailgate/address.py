"""Addresses compared as Dovecot and Postfix compare them: case folded in ASCII only.

Python's str.lower() also folds some non-ASCII letters into ASCII ones (U+212A KELVIN SIGN
becomes "k"), so "\u212aate@" would share kate's cache entry, duplicate check and maildir,
while Dovecot's %Lu and Postfix leave it a different (and, for Dovecot, invalid) name.
"""
from __future__ import annotations

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(address: str) -> str:
    """`address` with A-Z lower-cased and nothing else changed."""
    return address.translate(_ASCII_LOWER)
