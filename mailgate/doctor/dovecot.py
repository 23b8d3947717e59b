"""Dovecot's side of `mailgate doctor`: `doveconf -n` checked against [delivery] and the mail user.

The LMTP listener must be where [delivery] lmtp points, mail_location must name the maildirs
the fallback writes, and Dovecot must write mail as the user mailgate runs as (vmail), so each
can read what the other wrote. Where a setting is per user (a home from the userdb) and cannot be
compared, nothing is reported.
"""
from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.config import Config, parse_hostport
from mailgate.doctor import Finding, ToolFailed, run_tool

UNIT = Path("/etc/systemd/system/mailgate.service")  # where the install guide copies it
SNIPPET = "dovecot/10-mailgate.conf"
ANY_ADDRESS = {"*", "::", "[::]", "0.0.0.0"}


@dataclass
class Section:
    """One `name arg { ... }` block of doveconf's output (the root has no name)."""
    name: str = ""
    arg: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    children: list[Section] = field(default_factory=list)

    def find(self, name: str, arg: str | None = None) -> list[Section]:
        return [c for c in self.children if c.name == name and arg in (None, c.arg)]


def parse(text: str) -> Section:
    """doveconf -n's output as a tree. Written by hand: no library reads Dovecot's format, and
    doveconf prints it normalised (one setting or block edge per line)."""
    stack = [Section()]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if len(stack) > 1:
                stack.pop()
        elif line.endswith("{") and "=" not in line:
            name, _, arg = line[:-1].strip().partition(" ")
            stack[-1].children.append(Section(name, arg.strip()))
            stack.append(stack[-1].children[-1])
        else:
            key, sep, value = line.partition("=")
            if sep:
                stack[-1].settings[key.strip()] = value.strip().strip('"').strip()
    return stack[0]


def userdb_fields(conf: Section) -> dict[str, str]:
    """uid, gid, home, mail as every user gets them from the userdb's default/override fields,
    and from the args of a static userdb (`args = uid=vmail gid=vmail home=...`)."""
    fields: dict[str, str] = {}
    for db in conf.find("userdb"):
        keys = ["default_fields", "override_fields"]
        if db.settings.get("driver") == "static":
            keys.insert(1, "args")
        for key in keys:
            for item in db.settings.get(key, "").split():
                name, sep, value = item.partition("=")
                if sep:
                    fields[name] = value
    return fields


def check(config: Config, conf_file: str | None) -> tuple[list[Finding], str]:
    try:
        text, warnings = run_tool(["doveconf", *(["-c", conf_file] if conf_file else []), "-n"])
    except ToolFailed as e:
        return [Finding("dovecot", str(e), "install dovecot-core and dovecot-lmtpd, or name "
                        "the config with --dovecot-config FILE")], "dovecot not read"
    conf = parse(text)
    found = [Finding("dovecot", w, "correct the setting it names") for w in warnings]
    found += lmtp_listener(conf, config) + mail_location(conf, config) + mail_user(conf, config)
    return found, f"dovecot: LMTP {config.delivery.lmtp or 'unused'}, " \
                  f"{conf.settings.get('mail_location') or 'no mail_location'}"


def lmtp_listener(conf: Section, config: Config) -> list[Finding]:
    target = config.delivery.lmtp
    if not target:
        return []
    found = []
    protocols = conf.settings.get("protocols")
    if protocols is not None and "lmtp" not in protocols.split():
        found.append(Finding("dovecot", f"protocols = {protocols} has no lmtp, so Dovecot runs no "
                             "LMTP service", "apt-get install dovecot-lmtpd (it adds lmtp)"))
    listeners = [l for s in conf.find("service", "lmtp") for l in s.children]
    check = _unix_listener if target.startswith("unix:") else _inet_listener
    return found + check(conf, listeners, target)


def _unix_listener(conf: Section, listeners: list[Section], target: str) -> list[Finding]:
    base = conf.settings.get("base_dir", "/run/dovecot")
    paths = {f"{base}/lmtp"} | {l.arg if l.arg.startswith("/") else f"{base}/{l.arg}"
                                for l in listeners if l.name == "unix_listener"}
    if target[5:] in paths:
        return []
    return [Finding("dovecot", f"no LMTP socket at {target[5:]} ([delivery] lmtp); Dovecot's "
                    f"are {', '.join(sorted(paths))}", f'[delivery] lmtp = "unix:{base}/lmtp"')]


def _inet_listener(conf: Section, listeners: list[Section], target: str) -> list[Finding]:
    host, port = parse_hostport(target, "delivery.lmtp")
    default = conf.settings.get("listen", "*, ::")
    tcp = [(l.settings.get("address") or default, l.settings.get("port", ""))
           for l in listeners if l.name == "inet_listener"]
    if any(p == str(port) and _covers(a, host) for a, p in tcp):
        return []
    where = ", ".join(f"{a} port {p}" for a, p in tcp) or "no TCP port"
    return [Finding("dovecot", f"Dovecot's LMTP listens on {where}, not on {target} "
                    "([delivery] lmtp)", f"the inet_listener lmtp of {SNIPPET} (address = "
                    f"{host}, port = {port}), or point [delivery] lmtp at Dovecot's")]


def _covers(addresses: str, host: str) -> bool:
    entries = {a for a in re.split(r"[\s,]+", addresses) if a}
    host = "127.0.0.1" if host == "localhost" else host
    return bool(entries & ANY_ADDRESS) or host in {a.strip("[]") for a in entries}


def as_template(path: str) -> str:
    """Dovecot's %d / %n (and %Ld, %{domain}, %{username}) in mailgate's {domain} / {user} form."""
    path = re.sub(r"%L?d|%\{domain\}", "{domain}", path)
    path = re.sub(r"%L?n|%\{username\}", "{user}", path)
    return re.sub(r"/+", "/", path).rstrip("/")


def mail_location(conf: Section, config: Config) -> list[Finding]:
    template = config.maildir_template()
    if not template:
        return []
    fields = userdb_fields(conf)
    location = fields.get("mail") or conf.settings.get("mail_location", "")
    kind, _, rest = location.partition(":")
    path = rest.split(":")[0]
    wanted = template.replace("{domain}", "%d").replace("{user}", "%n")
    fix = f"mail_location = maildir:{wanted} ({SNIPPET}), or change [delivery] maildir"
    if kind != "maildir":
        return [Finding("dovecot", f"mail_location = {location or '(autodetect)'} is not a "
                        f"maildir, but mailgate's fallback writes maildirs at {template}", fix)]
    if path.startswith("~"):
        if "home" not in fields:
            return []  # each user's home comes from the userdb: nothing to compare here
        path = fields["home"] + path[1:]
    if as_template(path) != template.rstrip("/"):
        return [Finding("dovecot", f"mail_location = {location} and mailgate's [delivery] maildir "
                        f"= {template} name different directories: mail the fallback writes "
                        "would not be seen", fix)]
    return []


def mailgate_user() -> tuple[str, str, str]:
    """(user, group, where that was read): the installed unit's User=/Group=, else the shipped
    unit's (vmail)."""
    user = group = "vmail"
    origin = "the shipped mailgate.service"
    if UNIT.is_file():
        origin = str(UNIT)
        for line in UNIT.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if key == "User" and value:
                user = value
            elif key == "Group" and value:
                group = value
    return user, group, origin


def _number(name: str, lookup) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        return None


def mail_user(conf: Section, config: Config) -> list[Finding]:
    fields = userdb_fields(conf)
    uid = fields.get("uid") or conf.settings.get("mail_uid", "")
    gid = fields.get("gid") or conf.settings.get("mail_gid", "")
    user, group, origin = mailgate_user()
    fix = f"mail_uid = {user} and mail_gid = {group} ({SNIPPET}), and uid=/gid= in the userdb"
    if not uid or not gid:
        return [Finding("dovecot", "no mail_uid/mail_gid (nor uid=/gid= in the userdb): Dovecot "
                        f"writes mail as each user's own system uid, mailgate as {user}", fix)]
    found = []
    for kind, dovecot, ours, lookup in (("uid", uid, user, lambda n: pwd.getpwnam(n).pw_uid),
                                        ("gid", gid, group, lambda n: grp.getgrnam(n).gr_gid)):
        mine, theirs = _number(ours, lookup), _number(dovecot, lookup)
        if mine is None or theirs is None or mine != theirs:
            found.append(Finding("dovecot", f"Dovecot writes mail as {kind} {dovecot} "
                                 f"({theirs if theirs is not None else 'unknown name'}), mailgate "
                                 f"as {ours} ({mine if mine is not None else 'unknown name'}, from "
                                 f"{origin}): neither could read what the other wrote", fix))
    return found + _uid_range(conf, _number(uid, lambda n: pwd.getpwnam(n).pw_uid))


def _uid_range(conf: Section, uid: int | None) -> list[Finding]:
    first = int(conf.settings.get("first_valid_uid", "500") or 500)
    last = int(conf.settings.get("last_valid_uid", "0") or 0)
    if uid is None or (first <= uid and (not last or uid <= last)):
        return []
    return [Finding("dovecot", f"the mail uid {uid} is outside first_valid_uid..last_valid_uid "
                    f"({first}..{last or 'any'}): Dovecot refuses to deliver as it",
                    "widen first_valid_uid/last_valid_uid to include it")]
