"""Path safety of the maildir fallback: hostile names never lead outside the root (property test),
symlinks are never followed, and nothing is created for a name from the wire."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from mailgate import maildir
from mailgate.maildir import MaildirError, UnsafeAddress

DOMAINS = ("example.test", "other.test")
TEMPLATE = "/srv/vmail/{domain}/{user}"

hostile_parts = st.one_of(
    st.text(min_size=0, max_size=40),
    st.sampled_from(["..", ".", "../..", "a/../../etc", "%2e%2e", "..%2f", "a\0b", "\u2024\u2024",
                     "\uff0e\uff0e", "a/b", "/etc/passwd", "~root", "\\..\\", " ..", "A..B"]),
    st.lists(st.sampled_from(["..", "/", ".", "a", "%2f", "\0", "\u2215", "\u002e"]), max_size=8)
    .map("".join),
)


@settings(max_examples=600, deadline=None)
@given(local=hostile_parts, domain=st.one_of(hostile_parts, st.sampled_from(DOMAINS)))
def test_hostile_addresses_stay_under_root(local, domain):
    try:
        t = maildir.target(TEMPLATE, f"{local}@{domain}", DOMAINS)
    except UnsafeAddress:
        return
    path = os.path.normpath(os.path.join(t.root, *t.parts))
    assert path.startswith("/srv/vmail/") and os.path.dirname(os.path.dirname(path)) == "/srv/vmail"
    assert all(p not in ("", ".", "..") and "/" not in p and "\0" not in p for p in t.parts)
    assert t.parts[0] in DOMAINS and t.parts[1].isascii()


@pytest.mark.parametrize("address", ["../x@example.test", "a/b@example.test", "x@../example.test",
                                     "x@example.test/..", ".hidden@example.test", "a..b@example.test",
                                     "x@notours.test", "noat", "\u00e9@example.test",
                                     "\uff0e\uff0e@example.test", "a\0@example.test"])
def test_unsafe_examples_refused(address):
    with pytest.raises(UnsafeAddress):
        maildir.target(TEMPLATE, address, DOMAINS)


def test_case_follows_dovecot_lowercasing():
    assert maildir.target(TEMPLATE, "Alice@Example.TEST", DOMAINS).parts == ("example.test", "alice")


def test_case_folding_is_ascii_only_as_dovecots():
    """str.lower() makes U+212A KELVIN SIGN an ASCII "k": "\u212aate" is not kate (Dovecot
    refuses the name), so it must never name kate's maildir."""
    with pytest.raises(UnsafeAddress):
        maildir.split_address("\u212aate@example.test", DOMAINS)


def test_a_placeholder_inside_a_path_component_names_the_right_directory():
    t = maildir.target("/srv/vmail/d-{domain}/{user}", "alice@example.test", DOMAINS)
    assert os.path.join(t.root, *t.parts) == "/srv/vmail/d-example.test/alice"
    t = maildir.target("/srv/vmail/{domain}/u-{user}/Maildir", "alice@example.test", DOMAINS)
    assert os.path.join(t.root, *t.parts) == "/srv/vmail/example.test/u-alice/Maildir"


@pytest.fixture
def root(tmp_path):
    (tmp_path / "example.test").mkdir()
    return tmp_path


def make(root, user):
    for sub in ("cur", "new", "tmp"):
        (root / "example.test" / user / sub).mkdir(parents=True)


def test_write_is_in_new_with_mode_0600(root):
    make(root, "alice")
    template = f"{root}/{{domain}}/{{user}}"
    name = maildir.deliver(template, "alice@example.test", DOMAINS, b"Subject: x\r\n\r\nbody\r\n")
    path = root / "example.test" / "alice" / "new" / name
    stored = b"Subject: x\n\nbody\n"  # Dovecot's maildir form: LF line endings
    assert path.read_bytes() == stored
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not list((root / "example.test" / "alice" / "tmp").iterdir())
    assert name.endswith(f",S={len(stored)}")


def test_missing_maildir_is_not_created(root):
    template = f"{root}/{{domain}}/{{user}}"
    with pytest.raises(MaildirError):
        maildir.deliver(template, "bob@example.test", DOMAINS, b"x\r\n")
    assert not (root / "example.test" / "bob").exists()
    assert not maildir.exists(template, "bob@example.test", DOMAINS)


@pytest.mark.parametrize("link_at", ["user", "new", "domain"])
def test_symlinks_are_never_followed(root, tmp_path_factory, link_at):
    outside = tmp_path_factory.mktemp("outside")
    for sub in ("cur", "new", "tmp"):
        (outside / "victim" / sub).mkdir(parents=True)
    template = f"{root}/{{domain}}/{{user}}"
    if link_at == "user":
        (root / "example.test" / "mallory").symlink_to(outside / "victim")
    elif link_at == "new":
        make(root, "mallory")
        (root / "example.test" / "mallory" / "new").rmdir()
        (root / "example.test" / "mallory" / "new").symlink_to(outside / "victim" / "new")
    else:
        os.rename(root / "example.test", root / "moved")
        (root / "example.test").symlink_to(outside)
        (outside / "mallory").symlink_to(outside / "victim")
    with pytest.raises(MaildirError):
        maildir.deliver(template, "mallory@example.test", DOMAINS, b"x\r\n")
    assert [list((outside / "victim" / sub).iterdir()) for sub in ("cur", "new", "tmp")] == [[], [], []]


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failed_write_leaves_no_descriptor_open(root, tmp_path_factory):
    """new/ that cannot be opened (a symlink, refused; missing; not ours): every attempt is a
    MaildirError, and none may leave a descriptor behind in the long-running serve."""
    make(root, "bob")
    box = root / "example.test" / "bob"
    (box / "new").rename(box / "new.real")
    (box / "new").symlink_to(box / "new.real")
    template = f"{root}/{{domain}}/{{user}}"
    before = open_descriptors()
    for _ in range(20):
        with pytest.raises(MaildirError):
            maildir.deliver(template, "bob@example.test", DOMAINS, b"Subject: x\r\n\r\nx\r\n")
    left = [os.readlink(f"/proc/self/fd/{fd}") for fd in open_descriptors() - before
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert left == []
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "new.real") == []
