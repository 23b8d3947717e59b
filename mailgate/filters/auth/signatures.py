"""DKIM (RFC 6376) and ARC (RFC 8617) verification with dkimpy.

dkimpy resolves synchronously, so the keys of every signature are fetched first, concurrently,
through mailgate's resolver; then each key's size and exponent are checked (huge ones are refused
before any RSA work: a 16k-bit key costs seconds of CPU) and dkimpy verifies, reading only the
keys already fetched (fastverify.py: OpenSSL's RSA).

Where it runs: a worker thread, unless the work is small. Handing a verification to a thread and
back cost 0.5-0.7 ms of CPU per message under load (bench/auth.py, 2 KB messages), more than the
verification itself (0.2-0.3 ms), and a thread frees the loop only between the calls that hold
the GIL. So when the message's size times the signatures and seals to check is at most
INLINE_WORK (one signature on up to 8 KB), dkimpy runs on the event loop: about 1 ms at most,
measured with relaxed canonicalization of a whitespace-heavy body. Anything larger goes to the
thread, where dkimpy's whole-message steps run in pieces (bounded.py): a 16 MB message holds the
loop some 30 ms at a time at most.
"""
from __future__ import annotations

import asyncio
import binascii
import functools
import logging
from dataclasses import dataclass

import dkim
import dkim.util

from mailgate.dns import Budget, DnsError, Resolver
from mailgate.filters.auth import bounded, fastverify
from mailgate.filters.auth.fields import Header
from mailgate.filters.auth.results import Result

log = logging.getLogger("mailgate.auth")
# dkimpy logs every bad signature at ERROR; our own line says what the header says.
_QUIET = logging.getLogger("mailgate.auth.dkimpy")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())
MAX_EXPONENT_BITS = 64
MAX_ARC_SETS = 50   # RFC 8617 §4.2.1: i= runs 1..50
MISSING, FAILED = "missing", "failed"   # a key that does not exist; one DNS did not give
INLINE_WORK = 8 * 1024   # bytes of message x verifications done on the loop (see above)
# dkimpy looks for each field h= names by scanning the header: entries x header fields of work,
# in a thread nothing can stop (20,000 of each: 31 s). Real signers name 10-40 fields; a long
# header has a few hundred. Over this much work, the signature is not verified.
HEADER_WORK = 200_000
# Problems that have a result of their own (RFC 8601 §2.7.1); any other problem is "neutral".
FROM_NOT_SIGNED = "From field not signed"       # RFC 6376 §6.1.1: PERMFAIL
TOO_COSTLY = "h= x header fields too many to verify"  # not acceptable to us: policy
PROBLEM_RESULTS = {FROM_NOT_SIGNED: "permerror", TOO_COSTLY: "policy"}


def install() -> None:
    """mailgate's parts into dkimpy (fastverify, bounded), by the filter that verifies with
    them: importing this module changes nothing in dkimpy."""
    fastverify.install()
    bounded.install()


@dataclass(frozen=True, slots=True)
class Signature:
    """A DKIM-Signature as read before verification."""
    domain: str
    selector: str
    b: str          # the first 8 characters of b= (RFC 6008 header.b)
    problem: str    # why it is not verified: a syntax problem (neutral), or PROBLEM_RESULTS
    signed: int = 0  # how many fields h= names

    def costly(self, fields: int) -> bool:
        return self.signed * fields > HEADER_WORK

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}".lower()


def read_signature(value: bytes, arc: bool = False,
                   tags: fastverify.Tags | None = None) -> Signature:
    """`tags`: the message's, so that dkimpy does not parse and check them again."""
    tags = tags or fastverify.Tags()
    try:
        parsed = tags.parse(value)
    except dkim.util.InvalidTagValueList as e:
        return Signature("", "", "", f"bad tag list: {e}")

    def text(tag: bytes) -> str:
        return parsed.get(tag, b"").decode("ascii", "replace")
    sig = Signature(text(b"d").rstrip("."), text(b"s"), "".join(text(b"b").split())[:8], "")
    try:
        required = [b"i", b"a", b"b", b"d", b"s"] if arc else [b"v", b"a", b"b", b"bh", b"d",
                                                                  b"h", b"s"]
        tags.validate(parsed, required, arc)
    except dkim.DKIMException as e:
        return Signature(sig.domain, sig.selector, sig.b, str(e))
    # XXX dkimpy's checks crash on some hostile values (IndexError for i= equal to d=); what
    # it cannot read is a signature with a syntax problem, not a reason to defer the mail.
    except Exception as e:  # noqa: BLE001
        return Signature(sig.domain, sig.selector, sig.b, f"unreadable: {type(e).__name__}")
    signed = [name.strip().lower() for name in parsed.get(b"h", b"").split(b":")]
    if not arc and b"from" not in signed:
        return Signature(sig.domain, sig.selector, sig.b, FROM_NOT_SIGNED, len(signed))
    return Signature(sig.domain, sig.selector, sig.b, "", len(signed))


@functools.lru_cache(maxsize=1024)  # the same senders' keys, judged once
def key_problem(record: bytes, max_bits: int) -> str:
    """Why this key record cannot be used ("" if it can), decided before any RSA work."""
    try:
        if dkim.util.parse_tag_value(record).get(b"p", None) == b"":
            return "key revoked"
        pk, bits, ktag, _ = fastverify.parse_key(record)  # the parse dkimpy then reuses
    except (dkim.DKIMException, dkim.util.InvalidTagValueList, binascii.Error, ValueError) as e:
        return f"bad key: {e}"[:80]
    # XXX dkimpy's ASN.1 reader asserts its way through the key (AssertionError on a corrupt
    # one): whatever it raises, a key it cannot read is unusable, not a reason to defer.
    except Exception as e:  # noqa: BLE001
        return f"bad key: {type(e).__name__}"
    if ktag == b"rsa":
        if bits > max_bits:
            return f"{bits}-bit key over auth.max_key_bits"
        if pk["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
            return "key exponent over 64 bits"
    return ""


async def fetch_keys(resolver: Resolver, budget: Budget, names: set[str]) -> dict[str, object]:
    """name -> TXT record bytes, MISSING or FAILED; all names at once."""
    names = sorted(names)
    answers = await resolver.lookup_all([(name, "TXT") for name in names], budget)
    return {name: FAILED if isinstance(answer, DnsError) else
            b"".join(answer.records[0]) if answer.records else MISSING
            for name, answer in zip(names, answers)}


# ------------------------------------- dkimpy: on the loop if small, else in the worker thread

class _Keys:
    """The keys fetched for one message, each judged once; dkimpy reads only usable ones, so a
    seal or signature with a refused key fails without any RSA work."""

    def __init__(self, fetched: dict[str, object], max_bits: int):
        self.fetched = fetched
        self.problems = {name: key_problem(record, max_bits)
                         for name, record in fetched.items() if isinstance(record, bytes)}

    def get_txt(self, name: bytes, timeout: float = 0) -> bytes | None:
        key = name.decode("ascii", "replace").rstrip(".").lower()
        return None if self.problems.get(key, "missing") else self.fetched[key]

    def judge(self, name: str) -> tuple[str, str] | None:
        """(result, comment) when the key decides the signature's result; None to verify."""
        record = self.fetched.get(name)
        if record is FAILED:
            return "temperror", "key lookup failed"
        if not isinstance(record, bytes):
            return "permerror", "no key"
        return ("permerror", self.problems[name]) if self.problems[name] else None


def _verify_one(verifier: dkim.DKIM, index: int, sig: Signature, keys: _Keys) -> tuple[str, str]:
    """(result, comment) for the index-th DKIM-Signature."""
    if sig.problem:
        return PROBLEM_RESULTS.get(sig.problem, "neutral"), sig.problem[:80]
    judged = keys.judge(sig.key_name)
    if judged:
        return judged
    try:
        ok = verifier.verify(index, dnsfunc=keys.get_txt)
    except dkim.ValidationError as e:
        return "fail", str(e)[:60]
    except dkim.KeyFormatError as e:
        return "permerror", str(e)[:60]
    except dkim.DKIMException as e:
        return "neutral", str(e)[:60]
    # XXX dkimpy raises what it does not expect from hostile tags (binascii.Error for bh=a===):
    # that signature is unreadable; the message's other signatures still count.
    except Exception as e:  # noqa: BLE001
        return "neutral", f"signature not readable: {type(e).__name__}"
    return ("pass", "") if ok else ("fail", "signature did not verify")


def verify(raw: bytes, sigs: list[Signature], fetched: dict[str, object], max_bits: int,
           arc: tuple[int, bool], tags: fastverify.Tags | None = None,
           ) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """DKIM (result, comment) per signature, and the ARC chain's; safe in a worker thread.
    `arc`: (number of ARC sets, whether one of their key lookups failed, whether one of
    their signatures is too costly to verify); `tags`: those read_signature read."""
    with fastverify.reading(tags or fastverify.Tags()):
        return _verify(raw, sigs, fetched, max_bits, arc)


def _verify(raw: bytes, sigs: list[Signature], fetched: dict[str, object], max_bits: int,
            arc: tuple[int, bool]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    keys = _Keys(fetched, max_bits)
    try:
        verifier = dkim.DKIM(raw, logger=_QUIET)
        dkim_results = [_verify_one(verifier, i, sig, keys) for i, sig in enumerate(sigs)]
    # XXX dkimpy parses untrusted bytes and has crashed on some (IndexError on a header that
    # starts with a continuation line): the message could not be processed, so neutral.
    except Exception as e:  # noqa: BLE001
        log.info("dkimpy could not read the message: %s: %s", type(e).__name__, e)
        dkim_results = [("neutral", "message not readable")] * len(sigs)
    return dkim_results, _verify_arc(raw, keys, *arc)


def _verify_arc(raw: bytes, keys: _Keys, sets: int, lookup_failed: bool,
                costly: bool) -> tuple[str, str]:
    if sets == 0:
        return "none", ""
    if sets > MAX_ARC_SETS:
        return "fail", f"more than {MAX_ARC_SETS} ARC sets"
    if costly:
        return "fail", TOO_COSTLY
    if lookup_failed:  # RFC 8617 has none, pass and fail only: the comment says why
        return "fail", "key lookup failed (temporary)"
    try:
        cv, _, why = dkim.ARC(raw, logger=_QUIET).verify(dnsfunc=keys.get_txt)
    except Exception as e:  # noqa: BLE001 - untrusted bytes, as above
        return "fail", f"{type(e).__name__}"
    if cv == dkim.CV_Pass:
        return "pass", ""
    return "fail", str(why)[:60]


# -------------------------------------------------------------- on the event loop

async def check(resolver: Resolver, budget: Budget, raw: bytes, header: Header,
                max_signatures: int, max_bits: int) -> tuple[list[Result], Result]:
    """A dkim Result per signature checked (dkim=none without any) and the arc Result."""
    values, tags = header.values(b"dkim-signature"), fastverify.Tags()
    sigs = [read_signature(v, tags=tags) for v in values[:max_signatures]]
    sigs = [Signature(s.domain, s.selector, s.b, TOO_COSTLY, s.signed)
            if not s.problem and s.costly(len(header.fields)) else s for s in sigs]
    seals, arc_sigs = header.values(b"arc-seal"), header.values(b"arc-message-signature")
    arc_sets = len(seals)
    if max(len(seals), len(arc_sigs)) > MAX_ARC_SETS:  # "fail" unread: a header of thousands
        arc_sets, arc = max(len(seals), len(arc_sigs)), []  # would hold the loop for seconds
    else:
        arc = [read_signature(v, True, tags) for v in (*seals, *arc_sigs)]
    if not sigs and not arc_sets:
        return [Result("dkim", "none")], Result("arc", "none")
    if not sigs and arc_sets > MAX_ARC_SETS:  # nothing for dkimpy to read the message for
        return [Result("dkim", "none")], Result("arc", "fail", f"more than {MAX_ARC_SETS} ARC sets")
    arc_names = {s.key_name for s in arc[:2 * MAX_ARC_SETS] if s.domain and s.selector}
    keys = await fetch_keys(resolver, budget,
                            arc_names | {s.key_name for s in sigs if s.domain and s.selector})
    arc_failed = any(keys[name] is FAILED for name in arc_names)
    arc_costly = any(s.costly(len(header.fields)) for s in arc)
    work = (raw, sigs, keys, max_bits, (arc_sets, arc_failed, arc_costly), tags)
    if len(raw) * (len(sigs) + 2 * arc_sets) <= INLINE_WORK:
        dkim_results, (arc_result, arc_why) = verify(*work)
    else:
        dkim_results, (arc_result, arc_why) = await asyncio.to_thread(verify, *work)
    if len(values) > max_signatures:
        log.info("%d DKIM signatures, checked the first %d (auth.max_signatures)",
                 len(values), max_signatures)
    results = [Result("dkim", result, why, (("header", "d", s.domain), ("header", "s", s.selector),
                                            ("header", "b", s.b)),
                      s.domain.lower() if result == "pass" else "")
               for s, (result, why) in zip(sigs, dkim_results)]
    return results or [Result("dkim", "none")], Result("arc", arc_result, arc_why)
