"""The mail log's fields in Postfix's own forms, which log parsers written for Postfix expect."""
import pytest

from mailgate.maillog import delay_text


@pytest.mark.parametrize("seconds, logged", [
    (0.00009, "0"), (0.004, "0"), (0.0123, "0.01"), (0.123, "0.12"), (1.234, "1.2"),
    (9.96, "10"), (12.7, "13"), (3621.4, "3621"), (0.0, "0"),
])
def test_delay_as_postfix_logs_it_never_an_exponent(seconds, logged):
    assert delay_text(seconds) == logged
