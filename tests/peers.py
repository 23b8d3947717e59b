"""Real peers for tests: Dovecot, Postfix and mailgate itself, each in a temp dir on loopback.

Plain classes (no pytest) so benchmarks can use them too. Every start waits on a condition with
a bound and raises PeerError with the peer's log when the bound passes; every stop waits until the
ports are closed and the processes are gone. The config templates are copies of the verified
recipes, with fixed ports replaced by free ones.
"""
from __future__ import annotations

import fcntl
import imaplib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

REPO = Path(__file__).resolve().parent.parent
# An interpreter a non-root user can execute, with mailgate's deps (made by .ci/install).
UNPRIVILEGED_PYTHON = Path("/opt/mailgate-vmail-venv/bin/python")
VMAIL_UID = VMAIL_GID = 5000
PASSWORD = "secret"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
PORT_TRIES = 3          # first starts of a peer whose port another test process took meanwhile

T = TypeVar("T")


class PeerError(RuntimeError):
    """A peer did not start, stop or answer as expected; the message carries its log."""


# ---------------------------------------------------------------- waiting, ports, processes

def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> T:
    """The first truthy value of predicate(), polled until `timeout` seconds; else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not true after {timeout} s")
        time.sleep(interval)  # bounded-poll


_handed_out: set[int] = set()
# Ports handed out lately by any test process on this machine (see free_port).
PORT_REGISTRY = Path(os.environ.get("TMPDIR", "/tmp")) / "mailgate-test-ports"
PORT_MEMORY = 600.0


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, never the same one twice in
    PORT_MEMORY seconds, in this process or any other test process on the machine (pytest -n
    runs several; two of them once started moto and Dovecot on one port)."""
    try:
        registry = open(PORT_REGISTRY, "a+")  # noqa: SIM115 - closed below, lock with it
    except OSError:  # not ours to write (another user's): this process's memory only
        return _pick_port(set())
    with registry:
        fcntl.flock(registry, fcntl.LOCK_EX)  # released when the file closes
        registry.seek(0)
        now = time.time()
        recent = {}
        for line in registry.read().split():
            port, _, when = line.partition("@")
            if port.isdigit() and when.replace(".", "", 1).isdigit() and \
                    now - float(when) < PORT_MEMORY:
                recent[int(port)] = float(when)
        port = _pick_port(set(recent))
        recent[port] = now
        registry.seek(0)
        registry.truncate()
        registry.write("".join(f"{p}@{t:.0f}\n" for p, t in recent.items()))
    return port


def _pick_port(avoid: set[int]) -> int:
    for _ in range(10_000):  # the kernel picks at random among ~28,000 ephemeral ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out and port not in avoid:
            _handed_out.add(port)
            return port
    raise PeerError("no loopback port left that no test process used lately")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def greeting(port: int, host: str = "127.0.0.1") -> str:
    """The first line a server sends on connect, or "" if it does not answer."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            return s.makefile("rb").readline().decode("utf-8", "replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 on these machines reaps late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, found by walking /proc (the peers daemonize: not our children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def await_greeting(peer, port: int, name: str) -> None:
    """Wait for `peer`'s 220 on `port`; if it never comes, stop the peer and raise with its log."""
    try:
        wait_until(lambda: greeting(port).startswith("220 "), START_TIMEOUT, what=f"{name} greeting")
    except TimeoutError as e:
        peer.stop()
        raise PeerError(f"{e}\n--- {name} log ---\n{peer.log_text()}") from None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run(cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise PeerError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def run_daemon(cmd: list[str], out: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command that leaves a daemon behind. Its output goes to the file `out`, not a pipe:
    the daemon inherits stdout/stderr, and reading a pipe would wait for the daemon to exit."""
    with open(out, "w+") as f:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
        f.seek(0)
        proc.stdout = f.read()
    return proc


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_log(read: Callable[[], str], regex: str, timeout: float, name: str) -> re.Match:
    """The first match of `regex` (multiline) in the log `read()` returns, within `timeout`."""
    pattern = re.compile(regex, re.MULTILINE)
    try:
        return wait_until(lambda: pattern.search(read()), timeout, what=f"{name} log ~ {regex!r}")
    except TimeoutError as e:
        raise PeerError(f"{e}\n--- {name} log ---\n{read()}") from None


def split_address(addr: str) -> tuple[str, str]:
    user, at, domain = addr.rpartition("@")
    if not at or not user or not domain:
        raise ValueError(f"not an address: {addr!r}")
    return user, domain


def make_maildir(path: Path, uid: int = VMAIL_UID, gid: int = VMAIL_GID) -> Path:
    """cur/ new/ tmp/ owned by the mail user, 0700 as Dovecot makes them."""
    for sub in ("", "cur", "new", "tmp"):
        d = path / sub
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
    return path


def maildir_files(path: Path) -> list[bytes]:
    """Messages in new/ then cur/, each in name order (names start with the delivery time)."""
    out = []
    for sub in ("new", "cur"):
        d = path / sub
        if d.is_dir():
            out += [f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()]
    return out


# ---------------------------------------------------------------- TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")  # \Z: "$" would let a trailing newline pass


def toml_dumps(data: Mapping[str, Any]) -> str:
    """TOML for nested dicts of str/int/float/bool and lists of those (enough for mailgate.toml)."""
    lines: list[str] = []
    _toml_table(data, [], lines)
    return "\n".join(lines) + "\n"


def _toml_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        lines.append(f"[{'.'.join(_toml_key(p) for p in path)}]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _toml_table(value, path + [key], lines)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_str(text: str) -> str:
    """A TOML basic string; control characters (and DEL) escaped as TOML requires."""
    out = []
    for c in text:
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"no TOML for {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}: {value!r}")


# ---------------------------------------------------------------- clients

def _read_reply(f) -> tuple[int, str]:
    """One (possibly multi-line) SMTP/LMTP reply: code and the text lines joined by newline."""
    texts = []
    while True:
        line = f.readline()
        if not line:
            raise PeerError("connection closed while waiting for a reply")
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        texts.append(line[4:])
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), "\n".join(texts)


def _dot_stuff(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    body = b"\r\n".join(data.replace(b"\r\n", b"\n").split(b"\n"))
    if body.endswith(b"\r\n"):
        body = body[:-2]
    if not body:
        return b".\r\n"
    return re.sub(rb"(?m)^\.", b"..", body) + b"\r\n.\r\n"


class _Session:
    """A raw SMTP/LMTP client connection: send a command line, read one reply."""

    def __init__(self, host: str, port: int | None, timeout: float):
        if port is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(host)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        return _read_reply(self.file)

    def command(self, line: str, expect: int | None = None) -> tuple[int, str]:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        code, text = self.reply()
        if expect is not None and code // 100 != expect // 100:
            raise PeerError(f"{line.split()[0]} answered {code} {text}")
        return code, text

    def open(self, lhlo: str, sender: str, xforward: str = "") -> None:
        code, text = self.reply()
        if code != 220:
            raise PeerError(f"greeting {code} {text}")
        self.command(f"LHLO {lhlo}", 250)
        if xforward:
            self.command(f"XFORWARD {xforward}", 250)
        self.command(f"MAIL FROM:<{sender}>", 250)

    def close(self) -> None:
        try:
            self.command("QUIT")
        except (OSError, PeerError):
            pass  # the server may already have closed; nothing is left to learn
        self.file.close()
        self.sock.close()


def lmtp_send(host: str, port: int | None, sender: str, rcpts: Iterable[str],
              data: bytes | str, lhlo: str = "client.test", timeout: float = 30,
              xforward: str = "") -> tuple[dict[str, tuple[int, str]], list[tuple[int, str]]]:
    """One LMTP transaction: the reply to each RCPT, then ONE reply per accepted recipient.

    `port=None` means `host` is a unix socket path. DATA is skipped when no RCPT got 2xx.
    `xforward`: attributes for an XFORWARD command after LHLO ("ADDR=192.0.2.1 HELO=x").
    """
    session = _Session(host, port, timeout)
    try:
        session.open(lhlo, sender, xforward)
        rcpt_replies = {rcpt: session.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts}
        accepted = [r for r, (code, _) in rcpt_replies.items() if 200 <= code < 300]
        data_replies: list[tuple[int, str]] = []
        if accepted:
            session.command("DATA", 354)
            session.sock.sendall(_dot_stuff(data))
            data_replies = [session.reply() for _ in accepted]
    finally:
        session.close()
    return rcpt_replies, data_replies


def lmtp_rcpt(host: str, port: int | None, rcpt: str, timeout: float = 10) -> tuple[int, str]:
    """The server's answer to RCPT TO:<rcpt> in an LMTP transaction that sends no data."""
    session = _Session(host, port, timeout)
    try:
        session.open("client.test", "")
        return session.command(f"RCPT TO:<{rcpt}>")
    finally:
        session.close()


def smtp_client(address: tuple[str, int], helo: str = "client.test",
                timeout: float = 20.0) -> smtplib.SMTP:
    """An smtplib client that has said EHLO."""
    client = smtplib.SMTP(*address, local_hostname=helo, timeout=timeout)
    client.ehlo()
    return client


def smtp_send(address: tuple[str, int], sender: str, rcpts: Iterable[str], data: bytes,
              helo: str = "client.test", timeout: float = 20.0
              ) -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes] | None]:
    """One SMTP transaction: {rcpt: (code, text)} and the DATA reply (None if no RCPT passed)."""
    with smtp_client(address, helo, timeout) as client:
        client.mail(sender)
        answers = {r: client.rcpt(r) for r in rcpts}
        if not any(code == 250 for code, _ in answers.values()):
            client.rset()
            return answers, None
        return answers, client.data(data)


def swaks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run swaks with `args`; output captured as text; never raises on a non-zero exit."""
    return subprocess.run(["swaks", *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- Dovecot

DOVECOT_CONF = """\
# Self-contained Dovecot 2.3 config for mailgate tests (from the verified recipe). No /etc.
base_dir = @ROOT@/dovecot/run
state_dir = @ROOT@/dovecot/state
instance_name = @INSTANCE@
protocols = imap lmtp
listen = 127.0.0.1
log_path = @ROOT@/dovecot/log/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_fsync = never

mail_location = maildir:@ROOT@/mail/%d/%n
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 5000
last_valid_uid = 5000

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u @ROOT@/dovecot/users
}
userdb {
  driver = passwd-file
  args = username_format=%u @ROOT@/dovecot/users
  default_fields = uid=vmail gid=vmail home=@ROOT@/mail/%d/%n
}

service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = @LMTP_PORT@
  }
  unix_listener lmtp {
    mode = 0666
  }
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = @IMAP_PORT@
  }
  inet_listener imaps {
    port = 0
  }
}
protocol lmtp {
  postmaster_address = postmaster@example.test
}
"""


class Dovecot:
    """Dovecot 2.3: LMTP (inet + unix) and IMAP on free loopback ports, maildirs in ROOT/mail."""

    def __init__(self, root: Path, users: Iterable[str] = ()):
        self.root = Path(root)
        self.dir = self.root / "dovecot"
        self.conf = self.dir / "dovecot.conf"
        self.users_file = self.dir / "users"
        self.mail_root = self.root / "mail"
        self.lmtp_port, self.imap_port = free_port(), free_port()
        self.users: list[str] = []
        self.master_pid: int | None = None
        for sub in ("log", "state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_root, VMAIL_UID, VMAIL_GID)
        self.conf.write_text(DOVECOT_CONF.replace("@ROOT@", str(self.root))
                             .replace("@INSTANCE@", f"mailgate-test-{self.lmtp_port}")
                             .replace("@LMTP_PORT@", str(self.lmtp_port))
                             .replace("@IMAP_PORT@", str(self.imap_port)))
        self._write_users()
        for addr in users:
            self.add_user(addr)

    @property
    def lmtp_socket(self) -> Path:
        return self.dir / "run" / "lmtp"

    @property
    def maildir_template(self) -> str:
        """mailgate's delivery.maildir for the same tree Dovecot uses."""
        return f"{self.mail_root}/{{domain}}/{{user}}"

    def maildir(self, addr: str) -> Path:
        user, domain = split_address(addr)
        return self.mail_root / domain / user

    def add_user(self, addr: str) -> Path:
        """A passwd-file user (password "secret") and its maildir; if running, wait until known."""
        domain_dir = self.maildir(addr).parent
        domain_dir.mkdir(exist_ok=True)
        os.chown(domain_dir, VMAIL_UID, VMAIL_GID)
        path = make_maildir(self.maildir(addr))
        if addr not in self.users:
            self.users.append(addr)
            self._write_users()
            if self.running:
                # auth stats passwd-file at most once per second: a new user shows up late.
                wait_until(lambda: lmtp_rcpt("127.0.0.1", self.lmtp_port, addr)[0] == 250,
                           START_TIMEOUT, interval=0.05, what=f"dovecot knows {addr}")
        return path

    def remove_user(self, addr: str) -> None:
        """Take a user out of the passwd-file (the maildir stays); if running, wait until
        Dovecot refuses it (550 at RCPT)."""
        self.users.remove(addr)
        self._write_users()
        if self.running:
            wait_until(lambda: lmtp_rcpt("127.0.0.1", self.lmtp_port, addr)[0] == 550,
                       START_TIMEOUT, interval=0.05, what=f"dovecot forgot {addr}")

    def _write_users(self) -> None:
        # Written aside and renamed: passwd-file is re-read when it changes, never half-written.
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in self.users))
        tmp.replace(self.users_file)

    def start(self) -> None:
        proc = run_daemon(["dovecot", "-c", str(self.conf)], self.dir / "log" / "start.out")
        if proc.returncode != 0:
            raise PeerError(f"dovecot exited {proc.returncode}: {proc.stdout}\n{self.log_text()}")
        await_greeting(self, self.lmtp_port, "dovecot LMTP")
        self.master_pid = read_pid(self.dir / "run" / "master.pid")

    def stop(self) -> None:
        """SIGTERM the master; wait until its ports are closed and all its processes are gone."""
        pid = self.master_pid or read_pid(self.dir / "run" / "master.pid")
        if pid is None or not pid_alive(pid):
            self.master_pid = None
            return
        procs = descendants(pid) | {pid}
        # What `dovecot stop` does. Its own wait polls kill(pid, 0), which the exited master
        # passes for seconds here as a zombie (PID 1 reaps late); /proc shows the state.
        # The master sleeps a fixed 1 s after its children exit, so a stop takes about 1 s.
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not any(map(pid_alive, procs)), STOP_TIMEOUT, what="dovecot exit")
        wait_until(lambda: not (port_open(self.lmtp_port) or port_open(self.imap_port)),
                   STOP_TIMEOUT, what="dovecot ports closed")
        self.master_pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.master_pid is not None and pid_alive(self.master_pid)

    def fetch_imap(self, addr: str) -> list[bytes]:
        """The raw RFC 822 text of every INBOX message, read-only (no flags change)."""
        with imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10) as imap:
            imap.login(addr, PASSWORD)
            imap.select("INBOX", readonly=True)
            _, data = imap.uid("SEARCH", None, "ALL")
            out = []
            for uid in data[0].split():
                _, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
                out += [p[1] for p in parts if isinstance(p, tuple)]
        return out

    def maildir_messages(self, addr: str) -> list[bytes]:
        return maildir_files(self.maildir(addr))

    def log_text(self) -> str:
        return read_text(self.dir / "log" / "dovecot.log")

    def wait_log(self, regex: str, timeout: float = 10) -> re.Match:
        return wait_log(self.log_text, regex, timeout, "dovecot")


# ---------------------------------------------------------------- Postfix

POSTFIX_MAIN_CF = """\
# Self-contained Postfix 3.7 config for mailgate tests (from the verified recipe).
compatibility_level = 3.6
queue_directory  = @ROOT@/postfix/spool
data_directory   = @ROOT@/postfix/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = @ROOT@/postfix/log, /dev/stdout
maillog_file = @ROOT@/postfix/log/maillog

myhostname = mx.mailgate.test
mydomain = mailgate.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no

# no DNS here: numeric next hops, no client reverse lookups
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtp_dns_support_level = disabled

virtual_mailbox_domains = @DOMAINS@
virtual_transport = @VIRTUAL_TRANSPORT@

lmtp_destination_recipient_limit = 50
smtputf8_enable = no
"""

POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:@SMTPD_PORT@ inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
# after-queue content filter: content_filter = scan:[127.0.0.1]:PORT (SMTP + XFORWARD)
scan      unix  -       -       n       -       10      smtp
    -o smtp_send_xforward_command=yes
    -o disable_mime_output_conversion=yes
    -o smtp_generic_maps=
# LMTP flavour: content_filter = scanlmtp:inet:127.0.0.1:PORT
scanlmtp  unix  -       -       n       -       10      lmtp
    -o lmtp_send_xforward_command=yes
    -o disable_mime_output_conversion=yes
# re-injection listener for the filter (no content_filter here -> no loop)
127.0.0.1:@REINJECT_PORT@ inet n  -       n       -       10      smtpd
    -o content_filter=
    -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters,no_address_mappings
    -o smtpd_helo_restrictions=
    -o smtpd_client_restrictions=
    -o smtpd_sender_restrictions=
    -o smtpd_relay_restrictions=permit_mynetworks,reject
    -o smtpd_recipient_restrictions=permit_mynetworks,reject
    -o mynetworks=127.0.0.0/8
    -o smtpd_authorized_xforward_hosts=127.0.0.0/8
"""


RELOADED = "]: reload -- version"  # the master's log line once it has re-read main.cf


class Postfix:
    """Postfix 3.7 with its own config dir, queue and log under ROOT/postfix; smtpd on a free port.

    Not started by the constructor: point it somewhere first (`set_main`, `use_*`), then `start()`.
    """

    # Nothing listens on port 1: mail no test routed anywhere is deferred and stays visible in
    # the queue. (An `error:` transport would make smtpd reject the recipients at RCPT, which
    # breaks the content-filter mode, where the filter and not this transport delivers.)
    UNROUTED = "lmtp:inet:127.0.0.1:1"

    def __init__(self, root: Path, domains: Iterable[str] = ("example.test",),
                 virtual_transport: str = UNROUTED):
        self.root = Path(root)
        self.dir = self.root / "postfix"
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.smtpd_port, self.reinject_port = free_port(), free_port()
        # data/ is left to `postfix check`: it must be owned by the postfix user or master fails.
        for sub in ("etc", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.etc / "main.cf").write_text(
            POSTFIX_MAIN_CF.replace("@ROOT@", str(self.root))
            .replace("@DOMAINS@", ", ".join(domains))
            .replace("@VIRTUAL_TRANSPORT@", virtual_transport))
        (self.etc / "master.cf").write_text(
            POSTFIX_MASTER_CF.replace("@SMTPD_PORT@", str(self.smtpd_port))
            .replace("@REINJECT_PORT@", str(self.reinject_port)))
        self._backdate()
        self.check()

    def _backdate(self) -> None:
        """Age the config files: Postfix will not read a file changed in the last ~2 s (it may
        be half-written) and polls every 0.3 s until it is older, so each command after an edit
        would take about 2 s."""
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.etc / name, (past, past))

    def postconf(self, *args: str) -> str:
        """`postconf -c ETC ARGS`; any stderr is an error (typos are only warnings there)."""
        proc = run(["postconf", "-c", str(self.etc), *args])
        if proc.stderr.strip():
            raise PeerError(f"postconf {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def check(self) -> None:
        """Lint the config and create the queue directories (`postfix check`)."""
        self.postconf("-n")
        run(["postfix", "-c", str(self.etc), "check"])

    def set_main(self, **params: Any) -> None:
        """Set main.cf parameters (call `reload()` afterwards if running)."""
        if params:
            self.postconf("-e", *(f"{k}={v}" for k, v in params.items()))
            self._backdate()
            self.postconf("-n")

    def main(self, name: str) -> str:
        return self.postconf("-h", name).strip()

    def use_virtual_lmtp(self, port: int, host: str = "127.0.0.1") -> None:
        """Mode A: virtual domains are delivered over LMTP to host:port (mailgate or Dovecot)."""
        self.set_main(virtual_transport=f"lmtp:inet:{host}:{port}", content_filter="")

    def set_service(self, service: str, **options: Any) -> None:
        """Set -o options on one master.cf entry, e.g. set_service(self.public, content_filter=..)."""
        self.postconf("-P", *(f"{service}/{k}={v}" for k, v in options.items()))
        self._backdate()

    @property
    def public(self) -> str:
        """The master.cf entry of the smtpd tests send to (Debian's "smtp/inet" stands for it)."""
        return f"127.0.0.1:{self.smtpd_port}/inet"

    def use_content_filter(self, port: int, host: str = "127.0.0.1") -> None:
        """Mode B: after-queue filter over SMTP with XFORWARD at [host]:port."""
        self.set_main(content_filter=f"scan:[{host}]:{port}")

    @property
    def pid_file(self) -> Path:
        return self.spool / "pid" / "master.pid"

    @property
    def running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and pid_alive(pid)

    def start(self) -> None:
        self.postconf("-n")
        proc = run_daemon(["postfix", "-c", str(self.etc), "start"], self.dir / "log" / "start.out")
        if proc.returncode != 0:
            raise PeerError(f"postfix start exited {proc.returncode}: {proc.stdout}"
                            f"\n{self.log_text()}")
        await_greeting(self, self.smtpd_port, "postfix smtpd")

    def stop(self) -> None:
        """`postfix stop`, then wait until the master and every child are gone and ports closed."""
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid):
            return
        procs = descendants(pid) | {pid}
        run(["postfix", "-c", str(self.etc), "stop"], check=False)
        wait_until(lambda: not any(map(pid_alive, procs)), STOP_TIMEOUT, what="postfix exit")
        wait_until(lambda: not (port_open(self.smtpd_port) or port_open(self.reinject_port)),
                   STOP_TIMEOUT, what="postfix ports closed")

    def reload(self) -> None:
        """`postfix reload`, returning once the master has read the new config."""
        self.postconf("-n")
        reloads = self.log_text().count(RELOADED)
        run(["postfix", "-c", str(self.etc), "reload"])
        wait_until(lambda: self.log_text().count(RELOADED) > reloads, START_TIMEOUT,
                   what="postfix master reloaded")

    def flush(self) -> None:
        run(["postqueue", "-c", str(self.etc), "-f"])

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` reports it: one dict per message."""
        out = run(["postqueue", "-c", str(self.etc), "-j"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_empty(self) -> bool:
        return not self.queue()

    def log_text(self) -> str:
        return read_text(self.dir / "log" / "maillog")

    def wait_log(self, regex: str, timeout: float = 10) -> re.Match:
        return wait_log(self.log_text, regex, timeout, "postfix")


# ---------------------------------------------------------------- AWS (moto in server mode)

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


class Moto:
    """moto in server mode (real HTTP on a free loopback port): S3, SQS, SNS, DynamoDB, SES.

    Clients reach it with boto3 and `endpoint_url`; nothing is patched. `stop()` then `start()`
    keeps the port, so a test can take the "cloud" away and bring it back (state is lost).
    `one_at_a_time`: requests are answered in turn, so conditional writes are atomic as in
    DynamoDB (see tests/moto_one_at_a_time.py); no SQS long polls then.
    """

    def __init__(self, root: Path, one_at_a_time: bool = False):
        self.root = Path(root)
        self.one_at_a_time = one_at_a_time
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.root / "moto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Credentials and region for a process that talks to this moto (never real AWS)."""
        return dict(AWS_TEST_ENV)

    def start(self) -> "Moto":
        # free_port() is per process: another test process may take the same port first. On a
        # first start moto then moves to another port; a restart keeps its port (see above).
        for attempt in range(1 if self.proc is not None else PORT_TRIES):
            if attempt:
                self.port = free_port()
            if self._start_once():
                return self
            if "Address already in use" not in self.log_text():
                break
        raise PeerError(f"moto exited {self.proc.returncode}:\n{self.log_text()}")

    def _start_once(self) -> bool:
        """True once moto answers; False if it exited."""
        with open(self.log_path, "ab") as log:
            server = ([str(Path(__file__).with_name("moto_one_at_a_time.py"))]
                      if self.one_at_a_time else ["-m", "moto.server"])
            self.proc = subprocess.Popen(
                [sys.executable, *server, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, **AWS_TEST_ENV})
        try:
            wait_until(lambda: self.proc.poll() is not None or self._answers(), START_TIMEOUT,
                       what="moto answering")
        except TimeoutError as e:
            self.stop()
            raise PeerError(f"{e}\n--- moto log ---\n{self.log_text()}") from None
        return self.proc.poll() is None

    def _answers(self) -> bool:
        """moto's API answers on our port (something else there, e.g. a Dovecot that took the
        port first, is not moto)."""
        import http.client
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1):
                return True
        except (OSError, http.client.HTTPException):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        wait_until(lambda: not port_open(self.port), STOP_TIMEOUT, what="moto port closed")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reset(self) -> None:
        """Forget every bucket, queue and table (POST /moto-api/reset)."""
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset",
                                                      method="POST"), timeout=10).close()

    def client(self, service: str):
        import boto3
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def log_text(self) -> str:
        return read_text(self.log_path)


# ---------------------------------------------------------------- mailgate

def readable_source(src: Path) -> Path:
    """A world-readable copy of this tree's mailgate package under `src` (for PYTHONPATH), for a
    process running as another user: the repo may not be readable by them."""
    shutil.copytree(REPO / "mailgate", src / "mailgate", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [src, *src.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return src


# Environment names that would override the written config; a test's mailgate must not see them.
_CONFIG_ENV = ("LMTP_HOST", "LMTP_PORT", "INTERNAL_SMTP_PORT", "SMTP_PORT", "METRICS_PORT",
               "HEALTH_PORT")


class Mailgate:
    """`python -m mailgate serve -c ROOT/mailgate.toml` as a subprocess; log: ROOT/mailgate.log."""

    def __init__(self, root: Path, config: Mapping[str, Any],
                 env: Mapping[str, str] | None = None, args: Iterable[str] = (),
                 user: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.root / "mailgate.toml"
        self.log_path = self.root / "mailgate.log"
        self.config_path.write_text(toml_dumps(config))
        self.env = dict(env or {})
        self.args = list(args)
        self.user = user  # None: run as we are (root); else e.g. "vmail"
        self.proc: subprocess.Popen | None = None
        if user is not None:
            self._prepare_for(user)

    def _prepare_for(self, user: str) -> None:
        """Running as `user`: a world-readable copy of the current source (the repo may not be
        readable by them, and a copy tests this tree, not an installed one), and the root dir,
        data dir and log theirs. Root ignores permissions; only such a process meets them."""
        pw = pwd.getpwnam(user)
        readable_source(self.root / "src")
        data_dir = Path(self.config.get("data_dir", self.root / "data"))
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        for path in (self.root, data_dir, self.log_path):
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def address(self, section: str, key: str) -> tuple[str, int] | None:
        """(host, port) of a host:port setting such as listen.smtp, or None when it is off."""
        value = self.config.get(section, {}).get(key, "")
        if not value:
            return None
        host, _, port = value.rpartition(":")
        return host.strip("[]"), int(port)

    def listen(self, name: str) -> tuple[str, int] | None:
        return self.address("listen", name)

    @property
    def tcp_listeners(self) -> list[tuple[str, int]]:
        """Every address the config tells mailgate to listen on (SMTP, LMTP, lookup, metrics,
        health)."""
        keys = [("listen", "smtp"), ("listen", "lmtp"), ("listen", "lookup"), ("metrics", "listen"),
                ("health", "listen")]
        return [a for a in (self.address(*key) for key in keys) if a]

    @property
    def smtp(self) -> tuple[str, int] | None:
        return self.listen("smtp")

    @property
    def lmtp(self) -> tuple[str, int] | None:
        return self.listen("lmtp")

    @property
    def lookup(self) -> tuple[str, int] | None:
        return self.listen("lookup")

    def _environ(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith("MAILGATE_") and k not in _CONFIG_ENV}
        paths = [self.env.get("PYTHONPATH", ""), str(REPO), environ.get("PYTHONPATH", "")]
        if self.user is not None:  # the copy only: nothing of root's (unreadable) installs
            paths = [self.env.get("PYTHONPATH", ""), str(self.root / "src")]
            environ["HOME"] = str(self.root)
        environ.update(self.env)
        environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        environ["PYTHONUNBUFFERED"] = "1"
        return environ

    def start(self, timeout: float = START_TIMEOUT) -> "Mailgate":
        """Run it; return once every configured address accepts connections, else PeerError."""
        python = sys.executable if self.user is None else str(UNPRIVILEGED_PYTHON)
        cmd = [python, "-m", "mailgate", "serve", "-c", str(self.config_path), *self.args]
        # As `runuser -u USER` does, minus its watching parent: that one turns the child's exit
        # code into 143 and SIGKILLs 2 s after SIGTERM, and a stop must see mailgate's own exit.
        as_user = {} if self.user is None else {"user": self.user, "group": pwd.getpwnam(
            self.user).pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            # Its own session: a kill reaches anything it spawned, and ^C in the terminal
            # reaches only pytest, whose finalizers then stop it with the signal a test chose.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self._environ(), cwd=self.root,
                                         start_new_session=True, **as_user)
        addresses = self.tcp_listeners
        try:
            wait_until(lambda: self._exited() or all(port_open(p, h) for h, p in addresses),
                       timeout, what="mailgate listening")
        except TimeoutError as e:
            self._kill()
            raise PeerError(f"{e}\n--- mailgate log ---\n{self.log_text()}") from None
        if self._exited():
            raise PeerError(f"mailgate exited {self.proc.returncode} at start:\n{self.log_text()}")
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Send `sig` and wait for the exit code; past `timeout` SIGKILL it and raise PeerError."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise PeerError(f"mailgate still running {timeout} s after "
                                f"{signal.Signals(sig).name}; killed"
                                f"\n--- mailgate log ---\n{self.log_text()}") from None
        return self.proc.returncode

    def _kill(self) -> None:
        """SIGKILL its whole process group and reap it."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def restart(self) -> "Mailgate":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return read_text(self.log_path)

    def wait_log(self, regex: str, timeout: float = 10) -> re.Match:
        return wait_log(self.log_text, regex, timeout, "mailgate")
