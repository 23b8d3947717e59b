"""The fallback writer: a message straight into a user's existing maildir when Dovecot can't take it.

Paths are built only from a recipient that passed a strict check, and walked one component at a
time from the configured root with O_NOFOLLOW, so no symlink, `..` or odd byte can lead outside.
A write is durable before we say so: tmp/ -> fsync -> rename into new/ -> fsync new/. Any failure
raises MaildirError and the caller defers; nothing is ever created for a name from the wire.
"""
from __future__ import annotations

import itertools
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Sequence

from mailgate import faults
from mailgate.wireform import windows

# Stricter than RFC 5321 on purpose: these names become directory names.
LOCAL_PART = re.compile(r"[a-z0-9_+=-]+(?:\.[a-z0-9_+=-]+)*\Z")
LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_counter = itertools.count(1)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Bytes converted (GIL held) and written (GIL free) at a time: bench/largemail.py showed the
# small messages' tail shorter with 64 KB than with 256 KB while a 30 MB one is written.
WRITE_CHUNK = 64 * 1024


class MaildirError(Exception):
    """The message could not be written durably; the recipient is deferred."""


class UnsafeAddress(MaildirError):
    """The address cannot name a maildir (refused before any file system access)."""


@dataclass(frozen=True)
class Target:
    root: str                  # the part of the template before any placeholder
    parts: tuple[str, ...]     # components below root, validated


def is_domain(name: str) -> bool:
    """A lower-case LDH domain name: safe as a directory name, and what `domains` must hold."""
    return 0 < len(name) <= 253 and all(LABEL.match(label) for label in name.split("."))


def split_address(address: str, domains: tuple[str, ...]) -> tuple[str, str]:
    """(user, domain) lower-cased as Dovecot's default auth_username_format %Lu does: ASCII
    only (str.lower() would make U+212A KELVIN SIGN a "k", and so another user's name)."""
    user, at, domain = address.rpartition("@")
    if not address.isascii():
        raise UnsafeAddress(f"not an ASCII address: {address!r}")
    user, domain = user.lower(), domain.lower()
    if not at or len(user) > 64 or not LOCAL_PART.match(user):
        raise UnsafeAddress(f"local part not usable as a maildir name: {address!r}")
    if domain not in domains or not is_domain(domain):
        raise UnsafeAddress(f"domain not served: {address!r}")
    return user, domain


def target(template: str, address: str, domains: tuple[str, ...]) -> Target:
    user, domain = split_address(address, domains)
    # The root ends at the last "/" before the first placeholder: in "/srv/d-{domain}/{user}"
    # the "d-" belongs to a component the address names.
    root = template[:template.rindex("/", 0, template.index("{")) + 1].rstrip("/") or "/"
    below = template[len(root):].format(user=user, domain=domain)
    parts = tuple(p for p in below.split("/") if p)
    if any(p in (".", "..") for p in parts) or "\0" in below:
        raise UnsafeAddress(f"unsafe maildir path for {address!r}")
    return Target(root, parts)


def _open_dirs(t: Target) -> int:
    """Walk from the root to the maildir without following links; the maildir's fd."""
    fd = os.open(t.root, _DIR_FLAGS)
    try:
        for part in t.parts:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def exists(template: str, address: str, domains: tuple[str, ...]) -> bool:
    try:
        fd = _open_dirs(target(template, address, domains))
    except (OSError, UnsafeAddress):
        return False
    try:
        for sub in ("cur", "new", "tmp"):
            os.close(os.open(sub, _DIR_FLAGS, dir_fd=fd))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def unique_name() -> str:
    """Dovecot-style maildir base name: <secs>.M<usecs>P<pid>Q<n>.<host> (",S=<size>" follows
    in new/, as Dovecot adds it once the size is known)."""
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{host}"


def deliver(template: str, address: str, domains: tuple[str, ...],
            data: bytes | Sequence[bytes]) -> str:
    """Write `data` (CRLF form; one piece or several in a row) into new/ of the recipient's
    maildir, durably; the file's name."""
    parts = (data,) if isinstance(data, bytes) else tuple(data)
    t = target(template, address, domains)
    try:
        fd = _open_dirs(t)
    except OSError as e:
        raise MaildirError(f"no maildir for {address}: {e.strerror}") from None
    try:
        return _write(fd, unique_name(), parts)
    except OSError as e:
        raise MaildirError(f"maildir write for {address} failed: {e.strerror}") from None
    finally:
        os.close(fd)


def _write(maildir_fd: int, base: str, parts: tuple[bytes, ...]) -> str:
    tmp_fd = os.open("tmp", _DIR_FLAGS, dir_fd=maildir_fd)
    try:
        new_fd = os.open("new", _DIR_FLAGS, dir_fd=maildir_fd)
    except BaseException:  # a mailbox Dovecot cannot write either: each retry must not leak
        os.close(tmp_fd)
        raise
    try:
        owner = os.fstat(maildir_fd)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=tmp_fd)
        try:
            if os.geteuid() == 0:  # files belong to the mail owner, as Dovecot writes them
                os.fchown(fd, owner.st_uid, owner.st_gid)
            name = f"{base},S={_write_lf(fd, parts)}"
            os.fsync(fd)
            faults.point("before-fallback-rename")
            # Inside the try: a failed rename (new/ not writable) must not leave the file in tmp/.
            os.rename(base, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
        except BaseException:
            os.unlink(base, dir_fd=tmp_fd)
            raise
        finally:
            os.close(fd)
        try:
            os.fsync(new_fd)
        except OSError:  # not durable, so we will say 4xx: the retry must not find a copy here
            os.unlink(name, dir_fd=new_fd)
            raise
        faults.point("after-fallback-rename")
        return name
    finally:
        os.close(tmp_fd)
        os.close(new_fd)


def _write_lf(fd: int, parts: tuple[bytes, ...]) -> int:
    """Write `parts` in Dovecot's maildir form (LF endings, mail_save_crlf = no), a window at
    a time: no whole copy of a large message, and the GIL is let go between windows."""
    size = 0
    for part in parts:
        for start, end in windows(part, WRITE_CHUNK):
            view = memoryview(part[start:end].replace(b"\r\n", b"\n"))
            size += len(view)
            while view:
                view = view[os.write(fd, view):]
    return size


def create(template: str, address: str, domains: tuple[str, ...]) -> None:
    """Create a maildir named in the config (never one named over the wire)."""
    t = target(template, address, domains)
    path = os.path.join(t.root, *t.parts)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
