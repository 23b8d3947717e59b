"""Pure parts of `auth`: header fields with offsets, forged-header detection, the From domain,
DMARC records and alignment, the rendered header (parsed back with authres), config checks."""
import time

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate import config, pipeline
from mailgate.config import ConfigError
from mailgate.filters.auth import dmarc, fields
from mailgate.filters.auth import signatures
from mailgate.filters.auth.signatures import read_signature
from mailgate.filters.auth import results
from mailgate.filters.auth.results import WORDS, Result, parse, render
from mailgate.gateway import without
from mailgate.filters.auth.sender import client_address
from mailgate.dns import Answer

RAW = (b"Received: from a\r\n\tby b; now\r\n"
       b"Authentication-Results: mx.example.test; spf=pass\r\n"
       b"From: Alice <alice@Example.ORG>\r\n"
       b"Authentication-Results: other.example; dkim=pass\r\n"
       b"\r\nAuthentication-Results: mx.example.test; body, not a header\r\n")


# ---------------------------------------------------------------- fields

def test_fields_carry_their_exact_byte_spans():
    header = fields.read(RAW)
    assert [f.name for f in header.fields] == [b"received", b"authentication-results", b"from",
                                              b"authentication-results"]
    assert [RAW[f.start:f.end] for f in header.fields] == [
        b"Received: from a\r\n\tby b; now\r\n",
        b"Authentication-Results: mx.example.test; spf=pass\r\n",
        b"From: Alice <alice@Example.ORG>\r\n",
        b"Authentication-Results: other.example; dkim=pass\r\n"]
    assert header.malformed == 0


def test_removing_the_forged_field_keeps_every_other_byte():
    forged = fields.forged_results(fields.read(RAW), "mx.example.test")
    assert len(forged) == 1
    assert without(RAW, tuple((f.start, f.end) for f in forged)) == RAW.replace(
        b"Authentication-Results: mx.example.test; spf=pass\r\n", b"", 1)


@pytest.mark.parametrize("value, claimed", [
    (b" mx.example.test; spf=pass", "mx.example.test"),
    (b" MX.Example.TEST.; spf=pass", "mx.example.test"),
    (b" (a (nested) comment) mx.example.test 1; none", "mx.example.test"),
    (b' "mx.example.test"; dkim=pass', "mx.example.test"),
    (b"\r\n\tmx.example.test;\r\n\tdmarc=pass", "mx.example.test"),
    (b" mx.example.test.evil; spf=pass", "mx.example.test.evil"),
    (b" (unclosed mx.example.test; spf=pass", None),
    (rb" (a \) b) mx.example.test; spf=pass", "mx.example.test"),   # RFC 5322 quoted-pair
    (rb' "mx.example\.test"; spf=pass', "mx.example.test"),
    (b" (a)(b (c)) mx.example.test; spf=pass", "mx.example.test"),
])
def test_authserv_id_is_read_leniently(value, claimed):
    assert fields.authserv_id(value) == claimed


def test_a_claim_that_cannot_be_read_but_names_us_is_removed():
    raw = (b"Authentication-Results: (never closed mx.example.test; spf=pass\r\n"
           b"Authentication-Results: (never closed) (other.example; spf=pass\r\n\r\nbody\r\n")
    assert [f.value[:14] for f in fields.forged_results(fields.read(raw), "mx.example.test")] == \
        [b" (never closed"]


def test_a_header_of_nested_comments_is_read_in_bounded_time():
    # 100,000 nested comments before the id: quadratic once (13 s for 80 KB on the loop)
    raw = (b"Authentication-Results: " + b"(" * 100_000 + b")" * 100_000
           + b" mx.example.test; spf=pass\r\n\r\nbody\r\n")
    started = time.process_time()
    assert len(fields.forged_results(fields.read(raw), "mx.example.test")) == 1
    assert time.process_time() - started < 1.0


def test_obsolete_space_before_colon_is_still_a_field():
    raw = b"Authentication-Results : mx.example.test; spf=pass\r\n\r\nbody\r\n"
    assert len(fields.forged_results(fields.read(raw), "mx.example.test")) == 1


def test_lines_that_are_not_fields_are_skipped_and_counted():
    raw = b" leading continuation\r\nno colon here\r\nFrom: a@b.example\r\n\r\nbody\r\n"
    header = fields.read(raw)
    assert [f.name for f in header.fields] == [b"from"]
    assert header.malformed == 2


@pytest.mark.parametrize("raw, expected", [
    (b"From: Alice <alice@Example.ORG>\r\n\r\n", ("example.org", "")),
    (b"From: a@x.example, b@x.example\r\n\r\n", ("x.example", "")),
    (b"To: a@b.example\r\n\r\n", ("", "no From field")),
    (b"From: a@x.example\r\nFrom: b@y.example\r\n\r\n", ("", "2 From fields")),
    (b"From: alice\r\n\r\n", ("", "From has no domain")),
    (b"From: undisclosed-recipients:;\r\n\r\n", ("", "From has no domain")),
    (b"From: a@x.example, b@y.example\r\n\r\n", ("", "From names several domains")),
    (b"From: a@bad_domain!.example\r\n\r\n", ("", "From domain is not a domain name")),
    (b"From: " + b"(" * 1000 + b"a@x.example\r\n\r\n", ("", "From not parseable")),
])
def test_from_domain_or_why_there_is_none(raw, expected):
    assert fields.from_domain(fields.read(raw)) == expected


@pytest.mark.parametrize("addr, ip", [
    ("192.0.2.1", "192.0.2.1"), ("IPv6:2001:db8::1", "2001:db8::1"),
    ("ipv6:2001:DB8::1", "2001:db8::1"), ("[192.0.2.1]", "192.0.2.1"), ("unknown", None),
])
def test_client_address_as_postfix_forwards_it(addr, ip):
    assert client_address(addr) == ip


@pytest.mark.parametrize("value, problem", [
    (b"v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=YWJj; b=YWJj", ""),
    (b"v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=YWJj", "missing"),
    (b"v=1; a=rsa-sha256; d=x.example; i=x.example; s=s; h=from; bh=YWJj; b=YWJj", "unreadable"),
    (b"this is not a tag list", "bad tag list"),
    (b"v=1; a=rsa-sha256; d=x.example; s=s; h=to : subject; bh=YWJj; b=YWJj",
     "From field not signed"),
    (b"v=1; a=rsa-sha256; d=x.example; s=s; h=to:\r\n\tFROM; bh=YWJj; b=YWJj", ""),
])
def test_signature_problems_are_read_never_raised(value, problem):
    found = read_signature(value).problem
    assert (found.startswith(problem) if problem else found == ""), found


# ---------------------------------------------------------------- DMARC

@pytest.mark.parametrize("text, policy", [
    ("v=DMARC1; p=reject", dmarc.Policy("reject", "reject")),
    ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20",
     dmarc.Policy("quarantine", "none", "s", "s", 20)),
    ("v=DMARC1; p=bogus; rua=mailto:d@x.example", dmarc.Policy("none", "none")),
    ("v=DMARC1; p=bogus", None),
    ("v=DMARC1; rua=mailto:d@x.example", dmarc.Policy("none", "none")),
])
def test_dmarc_record(text, policy):
    assert dmarc.parse_record(text) == policy


def test_organizational_domain_from_the_public_suffix_list():
    assert dmarc.org_domain("mail.sub.example.co.uk") == "example.co.uk"
    assert dmarc.org_domain("news.example.test") == "example.test"


@pytest.mark.parametrize("domain, mode, expected", [
    ("example.org", "s", True), ("mail.example.org", "s", False),
    ("mail.example.org", "r", True), ("example.net", "r", False), ("", "r", False),
])
def test_alignment(domain, mode, expected):
    assert dmarc.aligned(domain, "example.org", mode) is expected


def spf(domain=""):
    return Result("spf", "pass" if domain else "fail", domain=domain)


def dkim(domain=""):
    return Result("dkim", "pass" if domain else "fail", domain=domain)


@pytest.mark.parametrize("from_domain, policy, at_org, spf_r, dkims, expected", [
    ("example.org", dmarc.Policy("reject", "none"), False, spf(), [dkim("example.org")],
     ("pass", "none")),
    ("example.org", dmarc.Policy("reject", "none"), False, spf("bounce.example.org"), [dkim()],
     ("pass", "none")),
    ("example.org", dmarc.Policy("reject", "none", aspf="s"), False, spf("bounce.example.org"),
     [dkim()], ("fail", "reject")),
    ("news.example.org", dmarc.Policy("reject", "quarantine"), True, spf(), [dkim("x.example")],
     ("fail", "quarantine")),
    ("example.org", None, False, spf(), [], ("none", "none")),
])
def test_dmarc_evaluation(from_domain, policy, at_org, spf_r, dkims, expected):
    assert dmarc.evaluate(from_domain, policy, at_org, spf_r, dkims) == expected


def timed_out(method, ptype, prop, value):
    return Result(method, "temperror", "timeout", ((ptype, prop, value),))


@pytest.mark.parametrize("spf_r, dkims, expected", [
    # RFC 7489 §6.6.2: an aligned check that failed for now: no conclusion, no policy
    (timed_out("spf", "smtp", "mailfrom", "b@bounce.example.org"), [dkim()], ("temperror", "none")),
    (spf(), [dkim(), timed_out("dkim", "header", "d", "example.org")], ("temperror", "none")),
    (timed_out("spf", "smtp", "helo", "mail.example.org"), [], ("temperror", "none")),
    # a stranger's timeout does not excuse the From domain's failure
    (timed_out("spf", "smtp", "mailfrom", "b@example.net"), [dkim()], ("fail", "reject")),
    (spf(), [timed_out("dkim", "header", "d", "attacker.example")], ("fail", "reject")),
])
def test_dmarc_cannot_conclude_when_an_aligned_check_failed_for_now(spf_r, dkims, expected):
    policy = dmarc.Policy("reject", "reject")
    assert dmarc.evaluate("example.org", policy, False, spf_r, dkims) == expected


@pytest.mark.parametrize("text, usable", [
    ("v=DMARC1; p=reject", True), ("V=DMARC1; p=reject", True), ("v = DMARC1 ; p=reject", True),
    ("v=DMARC1", True), ("v=dmarc1; p=reject", False), ("v=DMARC10; p=reject", False),
    ("p=reject; v=DMARC1", False),
])
def test_dmarc_version_tag_as_rfc_7489_writes_it(text, usable):
    answer = Answer("_dmarc.example.org", "TXT", ((text.encode(),),), True, 0.0)
    assert bool(dmarc._records(answer)) is usable


# ---------------------------------------------------------------- the header

def test_header_round_trips_through_authres_with_feed_verdicts():
    header = render("mx.example.test", [
        Result("spf", "pass", "client 192.0.2.1", (("smtp", "mailfrom", "a@example.org"),
                                                   ("smtp", "helo", "mail.example.org"))),
        Result("dkim", "pass", "", (("header", "d", "example.org"), ("header", "s", "sel"),
                                    ("header", "b", "ab/cd+ef"))),
        Result("dmarc", "pass", "p=reject", (("header", "from", "example.org"),
                                             ("policy", "dmarc", "reject"))),
        Result("arc", "none")],
        feed=(("x-ses-spam", "pass"), ("x-ses-virus", "fail")))
    assert header.startswith(b"Authentication-Results: mx.example.test;\r\n\t")
    assert header.endswith(b"\r\n") and all(len(line) < 998 for line in header.split(b"\r\n"))
    parsed = parse(header)
    assert parsed.authserv_id == "mx.example.test"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass"), ("arc", "none"),
        ("x-ses-spam", "pass"), ("x-ses-virus", "fail")]
    assert parsed.results[0].smtp_mailfrom == "a@example.org"
    assert (parsed.results[1].header_d, parsed.results[1].header_b) == ("example.org", "ab/cd+ef")
    assert parsed.results[2].header_from == "example.org"


def test_header_lines_stay_within_rfc_5322_limits_whatever_the_signature_says():
    header = render("mx.example.test", [
        Result("dkim", "pass", "", (("header", "d", "d" * 243 + ".example"),
                                    ("header", "s", "s" * 900), ("header", "b", "abcdefgh")))])
    assert max(len(line) for line in header.split(b"\r\n")) <= 998
    assert parse(header).results[0].header_s is None


def test_hostile_values_cannot_break_the_header():
    header = render("mx.example.test", [
        Result("dkim", "fail", "evil) ; spf=pass (", (("header", "d", "x.example; spf=pass"),
                                                      ("header", "s", "sel"))),
        Result("spf", "fail", "", (("smtp", "mailfrom", '"a;b"@x.example'),))],
        feed=(("spf; dkim", "pass"), ("x-ok", "pass (injected)")))
    parsed = parse(header)
    assert [(r.method, r.result) for r in parsed.results] == [("dkim", "fail"), ("spf", "fail")]
    assert parsed.results[0].header_d is None and parsed.results[0].header_s == "sel"


_VALUES = st.one_of(st.sampled_from(["", "abcdefgh", "ab/cd+ef", "AAAA====", "x.example",
                                     'a"b', "a;b", "é"]), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["dkim", "spf", "arc"]), result=st.sampled_from(WORDS),
       comment=st.sampled_from(["", "bad sig", "evil) x ("]),
       props=st.lists(st.tuples(st.sampled_from(["header", "smtp"]),
                                st.sampled_from(["d", "s", "b", "mailfrom"]), _VALUES),
                      max_size=4))
def test_a_clause_rendered_with_its_header_b_apart_is_what_authres_writes(method, result,
                                                                          comment, props):
    """render() writes a dkim clause's header.b on its own (so the rest can be cached): the
    text must be authres's own rendering of the whole clause."""
    clause = Result(method, result, comment, tuple(props))
    assert results._clause_text(clause) == str(results._clause(clause))


# ---------------------------------------------------------------- config

def test_dns_budget_must_leave_room_inside_the_filter_timeout(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('domains = ["example.test"]\n[pipeline]\nfilters = ["auth"]\n'
                    'filter_timeout = 8\n[dns]\nbudget = 8\n')
    with pytest.raises(ConfigError, match=r"dns\.budget.*pipeline\.filter_timeout"):
        pipeline.validate(config.load(str(path), {}))
    path.write_text(path.read_text().replace("budget = 8", "budget = 7"))
    assert pipeline.validate(config.load(str(path), {})).dns.budget == 7


@pytest.mark.parametrize("value, parsed", [
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)),
])
def test_nameserver_forms(value, parsed):
    assert config.parse_nameserver(value) == parsed


@pytest.mark.parametrize("text, key", [
    ('[dns]\nnameservers = ["dns.example:53"]\n', "dns.nameservers"),
    ('[dns]\nnameservers = ["127.0.0.1:0"]\n', "dns.nameservers"),
    ("[dns]\ntimeout = 0\n", "dns.timeout"),
    ("[auth]\nmax_key_bits = 512\n", "auth.max_key_bits"),
    ('[auth]\ndmarc_action = "bounce"\n', "auth.dmarc_action"),
])
def test_bad_dns_and_auth_settings_name_the_key(tmp_path, text, key):
    path = tmp_path / "m.toml"
    path.write_text('domains = ["example.test"]\n' + text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(str(path), {})


def test_arc_has_only_its_three_words_even_when_dns_fails():
    # RFC 8617 registers none, pass and fail for arc; a key lookup that failed is a fail
    assert signatures._verify_arc(b"", None, 1, True, False) == (
        "fail", "key lookup failed (temporary)")


OURS = "mx.example.test"


# ---------------------------------------------------------------- forged Authentication-Results

@pytest.mark.parametrize("padding", [
    b" " * 4100,                                    # white space (lines over 998 are taken)
    b"\r\n\t" + b"\r\n\t".join([b" " * 900] * 5),   # the same, folded (obs-FWS)
    b"()" * 2100,                                   # many short comments, each closed
    b" " * 4090,                                    # the id straddles the 4096th character
], ids=["spaces", "folded", "comments", "straddling"])
def test_a_claim_of_our_id_after_long_padding_is_still_removed(padding):
    value = padding + b" mx.example.test; dkim=pass header.d=victim.example"
    raw = b"Authentication-Results:" + value + b"\r\nFrom: a@victim.example\r\n\r\nbody\r\n"
    # Every reader of the header sees our authserv-id (authres does, once unfolded) ...
    unfolded = raw.split(b"\r\nFrom")[0].replace(b"\r\n\t", b" ").decode()
    assert authres.AuthenticationResultsHeader.parse(unfolded).authserv_id == OURS
    # ... so it must go, or a forged dkim=pass reaches the mailbox under our name
    assert len(fields.forged_results(fields.read(raw), OURS)) == 1


# ---------------------------------------------------------------- DMARC records

def test_a_huge_pct_is_a_record_not_a_crash():
    # A TXT record may hold many 255-octet strings: 5000 digits of pct= made int() raise
    # ValueError (Python's 4300-digit limit), out of Auth.check: 451 for every message of
    # that From domain, forever, instead of a DMARC result.
    text = "v=DMARC1; p=reject; pct=" + "0" * 5000 + "1"
    answer = Answer("_dmarc.hostile.example", "TXT", ((text.encode(),),), True, 0.0)
    dmarc._policy_in([answer])   # must not raise


@pytest.mark.parametrize("text, policy", [
    # RFC 7489 §6.6.3 step 6: a record with an "sp" tag that is not valid: with rua=, act as
    # if "v=DMARC1; p=none" was retrieved; without, no DMARC processing at all
    ("v=DMARC1; p=reject; sp=bogus", None),
    ("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@x.example", dmarc.Policy("none", "none")),
])
def test_an_invalid_sp_is_not_read_as_p(text, policy):
    assert dmarc.parse_record(text) == policy


# ---------------------------------------------------------------- the event loop

def test_a_header_of_many_arc_seals_does_not_hold_the_event_loop():
    # signatures.check reads every ARC-Seal and ARC-Message-Signature with dkimpy's tag
    # parser, on the loop, before it looks at how many there are (more than 50 is "fail"
    # anyway): 10 MB of short ARC-Seal fields held every other session for seconds (50 MB,
    # the default message_size, for ~20 s). The module promises some 30 ms at a time.
    import asyncio
    import time

    from mailgate.config.sections import Dns
    from mailgate.dns import Resolver
    from mailgate.filters.auth import signatures

    line = b"ARC-Seal: i=1; a=rsa-sha256; d=x.example; s=y; cv=none; b=abcd\r\n"
    raw = line * (10 * 1024 * 1024 // len(line)) + b"From: a@x.example\r\n\r\nbody\r\n"
    header = fields.read(raw)

    async def run() -> float:
        resolver = Resolver(Dns(nameservers=("127.0.0.1:9",), timeout=0.2, budget=0.5))
        longest, last, done = 0.0, time.monotonic(), False

        async def ticker():
            nonlocal longest, last
            while not done:
                await asyncio.sleep(0)
                now = time.monotonic()
                longest, last = max(longest, now - last), now
        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        last = time.monotonic()
        try:
            _, arc = await signatures.check(resolver, resolver.budget(), raw, header, 5, 4096)
        finally:
            done = True
            await tick
            await resolver.close()
        assert arc.result == "fail"
        return longest
    longest = asyncio.run(run())
    assert longest < 0.5, f"the loop stood still for {longest:.2f} s"


# ---------------------------------------------------------------- IDN alignment

def test_spf_for_a_u_label_sender_aligns_with_the_same_from_domain():
    # The From domain is turned into its A-label (fields._domain_of), the SPF domain is kept
    # as MAIL FROM wrote it (U-labels under SMTPUTF8): one domain, two forms, never aligned.
    from mailgate.filters.auth import sender
    spf = sender._result("192.0.2.1", "b@bücher.example", "mail.example", ("pass", ""))
    from_domain, problem = fields.from_domain(fields.read("From: <a@bücher.example>\r\n\r\n"
                                                          .encode()))
    assert (from_domain, problem) == ("xn--bcher-kva.example", "")
    assert dmarc.evaluate(from_domain, dmarc.Policy("reject", "reject"), False, spf, []) == \
        ("pass", "none")


@pytest.mark.parametrize("raw", [
    b"A: 1\r\nB: 2\r\n cont\r\nnot a field\r\nC:3\r\n\r\nbody\r\n",
    b"A: 1\r\nB: 2",                         # no body, no final CRLF
    b"\r\nbody\r\n",                          # no header at all
    b"X: y\r\n" * 25 + b"bad\r\n" * 7 + b"Z: z\r\n\r\n",
])
@pytest.mark.parametrize("lines", [1, 2, 3, 1000])
def test_reading_in_slices_reads_what_reading_at_once_does(raw, lines):
    import asyncio
    assert asyncio.run(fields.read_in_slices(raw, lines)) == fields.read(raw)
