"""Blocklist patterns: what an operator may type, and which senders each one matches."""
import pytest

from mailgate.filters.blocklist import check_pattern, first_match


@pytest.mark.parametrize("typed, stored", [
    ("*@Spam.Test", "*@spam.test"), (" eve@evil.test ", "eve@evil.test"),
    ("*.bad.test", "*.bad.test"), ("*@*.bad.test", "*@*.bad.test"), ("news-*@x.test", "news-*@x.test"),
    ("@Spam.Test", "*@spam.test")])  # Postfix's access-map form of a whole domain
def test_patterns_an_operator_may_type(typed, stored):
    assert check_pattern(typed) == stored


@pytest.mark.parametrize("typed", ["", "spam.test", "*", "*@*", "*.*", "a b@x.test",
                                   "<eve@x.test>", "eve@x.test,bob@x.test", "x@y\n.test",
                                   "x@", "@", "*@", "x@."])  # no domain
def test_patterns_refused(typed):
    with pytest.raises(ValueError):
        check_pattern(typed)


@pytest.mark.parametrize("sender, patterns, hit", [
    ("Eve@SPAM.test", ("*@spam.test",), "*@spam.test"),
    ("eve@mail.spam.test", ("*@spam.test",), None),
    ("eve@mail.bad.test", ("*.bad.test",), "*.bad.test"),
    ("eve@bad.test", ("*.bad.test",), None),
    ("eve@spam.test.example", ("*@spam.test",), None),
    ("a.b@x.test", ("a?b@x.test", "a[.]b@x.test"), None),  # only * is special
    ("a?b@x.test", ("a?b@x.test",), "a?b@x.test"),
    ("", ("*@spam.test", "*.bad.test"), None),
    ("news-daily@x.test", ("eve@x.test", "news-*@x.test"), "news-*@x.test")])
def test_which_sender_matches_which_pattern(sender, patterns, hit):
    assert first_match(sender, patterns) == hit
