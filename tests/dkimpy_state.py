"""dkimpy as it was: tests that swap mailgate's parts into it (signatures.install) put it back,
so that the messages other tests sign are signed by dkimpy as senders run it."""
from __future__ import annotations

import contextlib
from typing import Iterator

import dkim
import dkim.canonicalization
import dkim.crypto

_MODULES = (dkim, dkim.canonicalization, dkim.crypto)
_RELAXED = dkim.canonicalization.Relaxed


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Whatever the block swaps in dkimpy's modules (and the relaxed body method) is undone."""
    saved = [dict(vars(module)) for module in _MODULES]
    body = _RELAXED.__dict__["canonicalize_body"]
    try:
        yield
    finally:
        for module, names in zip(_MODULES, saved):
            vars(module).update(names)
        _RELAXED.canonicalize_body = body
