"""What sync reads from an SQS body and from SES's headers, what serve reads from XFEED, and
the [sync] config checks: pure functions, no peers.

Bodies are shaped as S3, SNS and SES write them (the S3 event as moto's server sends it).
"""
import json

import pytest

from mailgate import UsageError, config
from mailgate.commands import parse_xfeed
from mailgate.s3sync import claims, headers
from mailgate.s3sync.inject import xtext
from mailgate.s3sync.notifications import BadNotification, parse
from mailgate.s3sync.queues import load_domains, queue_names

S3_EVENT = {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3",
                         "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": "inbound"},
                                "object": {"key": "mail/a+b%2Bc%C3%A9.eml", "size": 7}}}]}
SES = {"notificationType": "Received",
       "mail": {"source": "bounce@remote.test", "messageId": "0abc"},
       "receipt": {"recipients": ["alice@example.test", "x@elsewhere.test"],
                   "spamVerdict": {"status": "PASS"}, "virusVerdict": {"status": "PASS"},
                   "spfVerdict": {"status": "FAIL"}, "dkimVerdict": {"status": "GRAY"},
                   "dmarcVerdict": {"status": "PROCESSING_FAILED"},
                   "action": {"type": "S3", "bucketName": "inbound", "objectKey": "in/0abc"}}}


def sns(message: dict, type_: str = "Notification") -> str:
    return json.dumps({"Type": type_, "MessageId": "m", "TopicArn": "arn:aws:sns:x:1:t",
                       "Message": json.dumps(message)})


def test_s3_event_key_is_url_decoded_plus_is_a_space():
    [notice] = parse(json.dumps(S3_EVENT))
    assert (notice.bucket, notice.key, notice.size) == ("inbound", "mail/a b+cé.eml", 7)
    assert notice.recipients == () and notice.sender is None and notice.verdicts is None


def test_s3_test_event_and_other_events_announce_nothing():
    assert parse(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                             "Bucket": "inbound"})) == []
    removed = {"Records": [{"eventName": "ObjectRemoved:Delete", "s3": {}}]}
    assert parse(json.dumps(removed)) == []


@pytest.mark.parametrize("body", [sns(SES), json.dumps(SES)], ids=["sns-envelope", "raw"])
def test_ses_notification_in_both_deliveries(body):
    [notice] = parse(body)
    assert (notice.bucket, notice.key) == ("inbound", "in/0abc")
    assert notice.recipients == ("alice@example.test", "x@elsewhere.test")
    assert notice.sender == "bounce@remote.test" and notice.message_id == "0abc"
    assert notice.verdicts == (("x-ses-spam", "pass"), ("x-ses-virus", "pass"),
                               ("x-ses-spf", "fail"), ("x-ses-dkim", "neutral"),
                               ("x-ses-dmarc", "temperror"))


def test_s3_event_through_sns_and_subscription_confirmation():
    assert parse(sns(S3_EVENT))[0].key == "mail/a b+cé.eml"
    assert parse(sns({}, "SubscriptionConfirmation")) == []


@pytest.mark.parametrize("body, reason", [
    ('{"Records": [{"eventName": "ObjectCreated:Put"', "not JSON"),
    ("hello", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"foo": 1}', "neither an S3 event nor an SES notification"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "recipients": []}}), "empty or invalid"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "action": {"type": "SNS"}}}), "S3 action"),
    (json.dumps({"Type": "Notification", "Message": "{broken"}), "SNS Message is not JSON"),
    (json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}), "s3.bucket.name"),
    # shapes that raised AttributeError (an internal error, never acknowledged) before
    (json.dumps(S3_EVENT).replace('"mail/a+b%2Bc%C3%A9.eml"', "5"), "not a non-empty string"),
    (json.dumps(S3_EVENT).replace('"mail/a+b%2Bc%C3%A9.eml"', '""'), "not a non-empty string"),
    (json.dumps(S3_EVENT).replace('"inbound"', '["inbound"]'), "not a non-empty string"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "action": "S3"}}), "S3 action"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "action": {
        "type": "S3", "bucketName": 7, "objectKey": "in/0abc"}}}), "S3 action"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "spamVerdict": "PASS"}}),
     "receipt.spamVerdict is not an object"),
    (json.dumps({**SES, "receipt": {**SES["receipt"], "dkimVerdict": ["PASS"]}}),
     "receipt.dkimVerdict is not an object"),
])
def test_bad_bodies_say_why(body, reason):
    with pytest.raises(BadNotification, match=reason):
        parse(body)


STORED = (b"Return-Path: <bounce@remote.test>\r\n"
          b"Received: from mail.remote.test (mail-out.remote.test [192.0.2.7])\r\n"
          b" by inbound-smtp.us-east-1.amazonaws.com with SMTP id abc\r\n"
          b" for alice@example.test;\r\n Tue, 29 Jun 2021 18:48:48 +0000 (UTC)\r\n"
          b"X-SES-Spam-Verdict: PASS\r\n"
          b"X-SES-Virus-Verdict: FAIL\r\n"
          b"Authentication-Results: amazonses.com;\r\n spf=pass (spfCheck: ok) "
          b"client-ip=192.0.2.7; envelope-from=bounce@remote.test; helo=mail.remote.test;\r\n"
          b" dkim=fail header.i=@remote.test;\r\n dmarc=none header.from=remote.test;\r\n"
          b"Received: by mail.remote.test with SMTP id 1\r\n"
          b"X-SES-Spam-Verdict: FAIL\r\n"
          b"To: Alice <alice@example.test>, bob@example.test\r\n"
          b"Cc: x@elsewhere.test\r\n"
          b"Subject: hi\r\n\r\nbody\r\n")


def test_ses_block_gives_client_recipients_sender_and_verdicts():
    section = headers.header_section(STORED)
    block = headers.ses_block(section)
    assert headers.origin(block) == headers.Origin("192.0.2.7", "mail-out.remote.test",
                                                   "mail.remote.test")
    assert headers.ses_recipients(block) == ["alice@example.test"]
    assert headers.sender(block) == "bounce@remote.test"
    # the sender's own X-SES-Spam-Verdict below SES's block does not count
    assert headers.verdicts(block) == (("x-ses-spam", "pass"), ("x-ses-virus", "fail"),
                                       ("x-ses-spf", "pass"), ("x-ses-dkim", "fail"),
                                       ("x-ses-dmarc", "none"))
    assert headers.header_recipients(section) == ["alice@example.test", "bob@example.test",
                                                  "x@elsewhere.test"]


def test_no_ses_received_no_block():
    forged = b"X-SES-Spam-Verdict: PASS\r\nReceived: from a (b [192.0.2.1]) by mx.test\r\n\r\n"
    assert headers.ses_block(headers.header_section(forged)) == []
    assert headers.verdicts([]) == () and headers.origin([]) == headers.Origin()


def test_lf_only_headers_and_domain_split():
    section = headers.header_section(STORED.replace(b"\r\n", b"\n"))
    assert headers.ses_recipients(headers.ses_block(section)) == ["alice@example.test"]
    ours, foreign = headers.in_domains(["a@Example.Test", "b@x.test", "a@Example.Test"],
                                       frozenset({"example.test"}))
    assert (ours, foreign) == (["a@Example.Test"], ["b@x.test"])


def test_only_ascii_case_makes_two_spellings_one_mailbox():
    """Dovecot lower-cases A-Z only (%Lu): KELVIN SIGN (U+212A) is not "k", so
    \u212aim@ and kim@ are two recipients, each with a claim of its own; dropping one as a
    duplicate would lose its copy."""
    kelvin = "\u212aim@example.test"
    ours, _ = headers.in_domains([kelvin, "kim@example.test", "KIM@example.test"],
                                 frozenset({"example.test"}))
    assert ours == [kelvin, "kim@example.test"]
    key = claims.mailbox_key
    assert key(kelvin) != key("kim@example.test") == key("KIM@example.test")


def test_xtext_escapes_plus_equals_space_and_non_ascii():
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


def test_xfeed_arguments():
    assert parse_xfeed("SECRET=s+2Bx x-ses-spam=pass x-ses-dkim=FAIL") == (
        "s+x", (("x-ses-spam", "pass"), ("x-ses-dkim", "fail")))
    assert parse_xfeed("SECRET=abc") == ("abc", ())
    for bad in ("", "x-ses-spam=pass", "SECRET=a spam", "SECRET=a x=pa55", "SECRET=a =pass"):
        assert parse_xfeed(bad) is None, bad


@pytest.mark.parametrize("key, value, words", [
    ("BATCH", "11", "sync.batch: must be from 1 to 10"),
    ("WAIT_TIME", "21", "sync.wait_time: must be from 0 to 20 seconds"),
    ("INJECT", "localhost", "sync.inject: 'localhost' is not host:port"),
    ("METRICS", "nowhere", "sync.metrics: 'nowhere' is not host:port"),
    ("PROCESSED", "archive", "sync.processed: 'archive' is not one of tag, keep, delete"),
    ("VISIBILITY_TIMEOUT", "0", "sync.visibility_timeout: must be greater than 0"),
])
def test_sync_config_is_checked_at_start(key, value, words):
    with pytest.raises(config.ConfigError) as error:
        config.load(None, {f"MAILGATE_SYNC_{key}": value, "MAILGATE_DATA_DIR": "/nonexistent"})
    assert str(error.value) == words


def test_domains_file_adds_domains(tmp_path):
    listed = tmp_path / "domains.txt"
    listed.write_text("# the old workers' list\nExample.ORG\n\nb.example.net  # second\n")
    cfg = config.load(None, {"MAILGATE_SYNC_DOMAINS_FILE": str(listed),
                             "MAILGATE_DATA_DIR": "/nonexistent"})
    assert load_domains(cfg) == {"localhost", "example.org", "b.example.net"}
    assert queue_names(cfg, load_domains(cfg)) == [
        "b-example-net-queue", "example-org-queue", "localhost-queue"]
    listed.write_text("not a domain!\n")
    with pytest.raises(UsageError, match="'not a domain!' is not a domain name"):
        load_domains(cfg)
