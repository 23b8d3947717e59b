"""The DATA reader and the wire encoder against line-by-line references, in arbitrary pieces.

The reader must give exactly what a line-by-line reader gives (CRLF lines, a leading dot
dropped, the first ".\r\n" line ends it; aiosmtpd 1.4.6's semantics) and leave what follows for
the next command, however the socket cuts the stream; the encoder, windowed, exactly what the
one-piece encoding gives (and for BDAT, the same without dot-stuffing).
"""
import re

from hypothesis import given, settings, strategies as st

from mailgate import dataphase, maildir, wireform

ALPHABET = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"x" * 700])
STREAMS = st.lists(ALPHABET, max_size=60).map(b"".join)


def by_lines(stream: bytes, size_limit: int = 1 << 20) -> tuple[bytes | None, bytes]:
    """The reference: (content, or None when it is over the limit, quoting dots not counted
    (RFC 1870 §6); what follows the end)."""
    lines, pos = [], 0
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line, pos = stream[pos:end], end
        if line == b".\r\n":
            content = b"".join(lines)
            return (content if len(content) <= size_limit else None), stream[pos:]
        lines.append(line[1:] if line.startswith(b".") else line)


def read_in_pieces(stream: bytes, cuts: list[int], size_limit: int = 1 << 20):
    """Fed as a socket would deliver it; the rest is what came with the end and after it."""
    reader = dataphase.MessageReader(size_limit)
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        ended = reader.feed(bytearray(stream[start:end]))
        if ended is not None:
            return ended[0], ended[1] + stream[end:]
    raise AssertionError("the message never ended")


@settings(max_examples=400, deadline=None)
@given(STREAMS, STREAMS, st.lists(st.integers(0, 3000), max_size=8))
def test_reader_agrees_with_the_line_reader(message, rest, cuts):
    stream = message + b"\r\n.\r\n" + rest + b"\r\n"
    content, left = read_in_pieces(stream, sorted(c for c in cuts if c < len(stream)))
    assert (content, left) == by_lines(stream)


@settings(max_examples=400, deadline=None)
@given(STREAMS, st.lists(st.integers(0, 3000), max_size=8), st.integers(0, 3000))
def test_reader_refuses_exactly_what_is_over_the_limit(message, cuts, limit):
    stream = message + b"\r\n.\r\nQUIT\r\n"
    got = read_in_pieces(stream, sorted(c for c in cuts if c < len(stream)), size_limit=limit)
    assert got == by_lines(stream, limit)


def test_reader_takes_long_lines_and_refuses_only_by_size():
    line = b"y" * 5000 + b"\r\n"
    assert read_in_pieces(line + b".\r\nQUIT\r\n", [3000]) == (line, b"QUIT\r\n")
    assert read_in_pieces(line * 3 + b".\r\nNOOP\r\n", [], size_limit=10000) == (None, b"NOOP\r\n")
    assert read_in_pieces(line + b".\r\n", [5003, 5004], size_limit=len(line)) == (line, b"")


def test_quoting_dots_do_not_count_against_the_size_limit():
    """RFC 1870 §6: a message of 300 lines ".xx" is 1500 bytes as delivered, 1800 as sent."""
    stuffed = b"..xx\r\n" * 300
    delivered = b".xx\r\n" * 300
    assert read_in_pieces(stuffed + b".\r\n", [700, 1400], size_limit=1500) == (delivered, b"")
    assert read_in_pieces(stuffed + b".\r\n", [700, 1400], size_limit=1499) == (None, b"")


def test_reader_never_ends_on_a_bare_lf_dot():
    stream = b"a\n.\nMAIL FROM:<x>\n.\r\n\r\n.\r\n"
    assert read_in_pieces(stream, [2, 4]) == by_lines(stream)
    assert read_in_pieces(stream, [])[0] == b"a\n.\nMAIL FROM:<x>\n.\r\n\r\n"


def one_piece(data: bytes) -> bytes:
    """The encoding as it was before windows: normalise, stuff, terminate."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"


@settings(max_examples=400, deadline=None)
@given(STREAMS, st.integers(2, 64))
def test_windowed_encoding_is_the_one_piece_encoding(data, chunk):
    prefix = b"Received: x\r\n"
    joined = b"".join(bytes(p) for p in wireform.data_chunks((prefix, data), chunk))
    assert joined + b".\r\n" == one_piece(prefix + data)


@settings(max_examples=400, deadline=None)
@given(STREAMS)
def test_bdat_form_is_the_data_form_but_for_dot_stuffing(data):
    """BDAT counts octets: the same CRLF lines and final CRLF as DATA, no dot doubled."""
    whole = b"Received: x\r\n" + data
    chunked = wireform.bdat_data(whole)
    assert re.sub(rb"(?m)^\.", b"..", chunked) + b".\r\n" == one_piece(whole)
    assert wireform.bdat_data(chunked, crlf_checked=True) == chunked


def test_unchanged_windows_are_slices_not_copies():
    data = b"line\r\n" * 100_000
    pieces = list(wireform.data_chunks((data,)))
    assert all(isinstance(p, memoryview) and p.obj is data for p in pieces)
    assert max(map(len, pieces)) <= wireform.CHUNK


def test_fallback_names_differ_within_one_second():
    names = [maildir.unique_name() for _ in range(1000)]
    assert len(set(names)) == 1000
    assert len({n.split(".")[0] for n in names}) <= 2  # the same second, or two at most
