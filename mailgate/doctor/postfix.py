"""Postfix's side of `mailgate doctor`: main.cf as `postconf -x` expands it, master.cf as
`postconf -M` lists it, checked against mailgate's domains and listeners.

Mode A (virtual_transport to mailgate's LMTP) or mode B (content_filter on the public smtpd) is
told from the config itself; each finding names the parameter and the postconf line that fixes it.
"""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field

from mailgate.config import Config
from mailgate.doctor import TOOL_TIMEOUT, Finding, ToolFailed, run_tool
from mailgate.lookup import MAP_NAME

# "-o name=value" or "-o { name = value with spaces }" in a master.cf command line.
OPTION = re.compile(r"-o\s+(?:\{\s*([^=}\s]+)\s*=\s*([^}]*?)\s*\}|([^=\s]+)=(\S*))")
SOCKETMAP = re.compile(r"(?:proxy:)?socketmap:(.+):([^:]+)")
# Table types postmap -q reads from a local file (others would connect to a server).
LOCAL_TABLES = {"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline", "static",
                "regexp", "pcre"}
LOCAL_EFFECT = {
    "mydestination": "Postfix delivers it to local Unix accounts and refuses every mailbox user "
                     "(550 5.1.1 User unknown in local recipient table)",
    "relay_domains": "Postfix relays its mail elsewhere instead of handing it to mailgate",
    "virtual_alias_domains": "Postfix accepts only aliases there and refuses every mailbox",
}


@dataclass(frozen=True)
class Service:
    name: str
    type: str
    command: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"

    @property
    def public(self) -> bool:
        """The smtpd that takes mail from the Internet: port 25, as Debian's "smtp inet" entry,
        or the "smtpd pass" one behind postscreen."""
        if self.command != "smtpd":
            return False
        return self.type == "pass" or (self.type == "inet" and
                                       self.name.rpartition(":")[2] in ("smtp", "25"))


@dataclass(frozen=True)
class Postfix:
    main: dict[str, str]
    services: list[Service]

    def param(self, service: Service, name: str) -> str:
        return service.options.get(name, self.main.get(name, ""))

    def service(self, name: str, type_: str) -> Service | None:
        return next((s for s in self.services if (s.name, s.type) == (name, type_)), None)


def read(config_dir: str | None) -> tuple[Postfix, list[str]]:
    postconf = ["postconf", *(["-c", config_dir] if config_dir else [])]
    main_text, warnings = run_tool([*postconf, "-x"])
    master_text, more = run_tool([*postconf, "-M"])
    main = {}
    for line in main_text.splitlines():
        name, sep, value = line.partition(" =")
        if sep:
            main[name.strip()] = value.strip()
    return Postfix(main, parse_master(master_text)), list(dict.fromkeys(warnings + more))


def parse_master(text: str) -> list[Service]:
    services = []
    for line in text.splitlines():
        fields = line.split(None, 7)
        if len(fields) == 8 and not line.startswith("#"):
            options = {m[0] or m[2]: m[1] if m[0] else m[3] for m in OPTION.findall(fields[7])}
            services.append(Service(fields[0], fields[1], fields[7].split()[0], options))
    return services


def listed(value: str) -> list[str]:
    """The domain names in a Postfix list (tables and files left out)."""
    return [d.lower() for d in re.split(r"[\s,]+", value) if d and ":" not in d
            and not d.startswith("/")]


def endpoint(text: str) -> tuple[str, str]:
    """("127.0.0.1", "10024") from "inet:127.0.0.1:10024", "[127.0.0.1]:10024" or
    "localhost:10024"."""
    host, _, port = text.removeprefix("inet:").rpartition(":")
    host = host.strip("[]").lower()
    return ("127.0.0.1" if host == "localhost" else host), port


def check(config: Config, config_dir: str | None) -> tuple[list[Finding], str]:
    try:
        pf, warnings = read(config_dir)
    except ToolFailed as e:
        return [Finding("postfix", str(e), "install postfix, or name its config directory "
                        "with --postfix-config DIR")], "postfix not read"
    found = [Finding("postfix", w, "correct the setting it names (a typo is only a warning)")
             for w in warnings]
    domain_found, note = domains(pf, config, config_dir)
    found += duplicates(pf) + domain_found
    mode, target_found = transport(pf, config)
    words = f"postfix: {mode}" + (f" ({note})" if note else "")
    return (found + target_found + rcpt_rejection(pf, config) + filter_scope(pf)
            + alias_expansion(pf, mode.startswith("mode B"))), words


def duplicates(pf: Postfix) -> list[Finding]:
    counts = Counter(s.key for s in pf.services)
    return [Finding("postfix", f"master.cf defines {key} {n} times", f"keep one entry "
                    f"(postconf -M {key} lists them; postconf -M# {key} comments out all)")
            for key, n in counts.items() if n > 1]


def domains(pf: Postfix, config: Config, config_dir: str | None) -> tuple[list[Finding], str]:
    """Findings, and a note when virtual_mailbox_domains has a table doctor cannot read."""
    found, unsure = [], []
    for domain in config.domains:
        for param, effect in LOCAL_EFFECT.items():
            entries = listed(pf.main.get(param, ""))
            if domain in entries:
                rest = ", ".join(e for e in entries if e != domain)
                found.append(Finding("postfix", f"{param} lists {domain}, a domain mailgate "
                                     f"serves: {effect}",
                                     f"postconf -e '{param} = {rest}' (keep it in "
                                     f"virtual_mailbox_domains)"))
        listing = lists(pf.main.get("virtual_mailbox_domains", ""), domain, config_dir)
        if listing is None:
            unsure.append(domain)
        elif not listing:
            found.append(Finding("postfix", f"virtual_mailbox_domains does not list {domain}",
                                 f"postconf -e 'virtual_mailbox_domains = "
                                 f"{', '.join(config.domains)}'"))
    note = f"virtual_mailbox_domains not read for {', '.join(unsure)}" if unsure else ""
    return found, note


def lists(value: str, domain: str, config_dir: str | None, depth: int = 0) -> bool | None:
    """Whether a Postfix domain list holds `domain`: names, /files of names, and tables (asked
    with postmap -q, local files only: doctor connects to nothing). None: it could not be told
    (a table of another kind, an unreadable file), which is no finding."""
    unsure = False
    for entry in (e for e in re.split(r"[\s,]+", value) if e):
        if entry.startswith("/"):
            try:
                with open(entry, encoding="utf-8", errors="replace") as f:
                    text = " ".join(line.split("#")[0] for line in f)
            except OSError:
                unsure = True
                continue
            hit = lists(text, domain, config_dir, depth + 1) if depth < 3 else None
        elif ":" in entry:
            hit = _query(entry, domain, config_dir)
        else:
            hit = entry.lower() == domain
        if hit:
            return True
        unsure = unsure or hit is None
    return None if unsure else False


def _query(table: str, key: str, config_dir: str | None) -> bool | None:
    if table.partition(":")[0] not in LOCAL_TABLES:
        return None
    try:
        proc = subprocess.run(["postmap", *(["-c", config_dir] if config_dir else []), "-q",
                               key, table], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode == 0:
        return True
    # Exit 1 is both "not found" and postmap's fatal errors (an unreadable table): only a
    # quiet exit 1 says the key is not there.
    return False if proc.returncode == 1 and not proc.stderr.strip() else None


def points_at(pf: Postfix, spec: str, address: str, command: str) -> str:
    """"" when transport:nexthop `spec` reaches `address` through a `command` service, else
    why not."""
    name, _, nexthop = spec.partition(":")
    service = pf.service(name, "unix")
    if service is None:
        return f"master.cf has no {name}/unix service"
    if service.command != command:
        return f"master.cf's {name} service runs {service.command}, not {command}"
    if not address:
        return "that mailgate listener is off"
    if endpoint(nexthop) != endpoint(address):
        return f"it goes to {nexthop or 'no next hop'}, mailgate listens on {address}"
    return ""


def transport(pf: Postfix, config: Config) -> tuple[str, list[Finding]]:
    """Mode B when any smtpd (or main.cf) has a content_filter, else mode A."""
    filters = {pf.param(s, "content_filter") for s in pf.services if s.command == "smtpd"}
    filters = {f for f in filters | {pf.main.get("content_filter", "")} if f}
    if not filters:
        spec = pf.main.get("virtual_transport", "")
        why = points_at(pf, spec, config.listen.lmtp, "lmtp")
        lmtp = config.listen.lmtp or "127.0.0.1:10024"
        fix = f"postconf -e 'virtual_transport = lmtp:inet:{lmtp}'"
        found = [Finding("postfix", f"virtual_transport = {spec} does not reach mailgate's "
                         f"[listen] lmtp: {why}", fix)] if why else []
        return "mode A, LMTP transport", found
    host, port = endpoint(config.listen.smtp or "127.0.0.1:10025")
    found = []
    for spec in sorted(filters):
        why = points_at(pf, spec, config.listen.smtp, "smtp")
        if why and points_at(pf, spec, config.listen.lmtp, "lmtp"):  # LMTP flavour: fine too
            found.append(Finding("postfix", f"content_filter = {spec} does not reach mailgate's "
                                 f"[listen] smtp: {why}", f"-o content_filter=scan:[{host}]:{port} "
                                 "on the smtp inet entry, with the scan service "
                                 "(postfix/master.cf.content-filter)"))
    return "mode B, content filter", found + _unfiltered_transport(pf, config)


def _unfiltered_transport(pf: Postfix, config: Config) -> list[Finding]:
    """Mode B: mail that skips the filter (local submissions, mailgate's own replies) still
    needs Dovecot, through virtual_transport."""
    spec = pf.main.get("virtual_transport", "")
    targets = [a for a in (config.delivery.lmtp, config.listen.lmtp) if a]
    if any(not points_at(pf, spec, a, "lmtp") for a in targets) or spec.startswith("lmtp:unix:"):
        return []
    return [Finding("postfix", f"virtual_transport = {spec} reaches neither Dovecot's LMTP "
                    f"({config.delivery.lmtp or 'off'}) nor mailgate's, so mail that skips the "
                    "content filter is not delivered to Dovecot",
                    f"postconf -e 'virtual_transport = lmtp:inet:{config.delivery.lmtp}'")]


def rcpt_rejection(pf: Postfix, config: Config) -> list[Finding]:
    maps = pf.main.get("virtual_mailbox_maps", "")
    lookup = config.listen.lookup
    wanted = f"socketmap:inet:{lookup or '127.0.0.1:10027'}:{MAP_NAME}"
    found = []
    if pf.main.get("smtpd_reject_unlisted_recipient", "yes") == "no":
        found.append(Finding("postfix", "smtpd_reject_unlisted_recipient = no: unknown users are "
                             "accepted and bounced later",
                             "postconf -X smtpd_reject_unlisted_recipient"))
    unverified = "reject_unverified_recipient" in pf.main.get("smtpd_recipient_restrictions", "")
    if not maps.strip() and not unverified:
        found.append(Finding("postfix", "virtual_mailbox_maps is empty, so Postfix accepts any "
                             f"address at {', '.join(config.domains)} and bounces unknown ones "
                             "later (backscatter to forged senders)",
                             f"postconf -e 'virtual_mailbox_maps = {wanted}'"))
    for entry in re.split(r"[\s,]+", maps):
        m = SOCKETMAP.fullmatch(entry)
        if m and (not lookup or endpoint(m[1]) != endpoint(lookup) or m[2] != MAP_NAME):
            found.append(Finding("postfix", f"virtual_mailbox_maps asks {entry}, but mailgate's "
                                 f"lookup is {lookup or 'off ([listen] lookup)'}: every RCPT for "
                                 "your domains gets 451", f"postconf -e 'virtual_mailbox_maps = "
                                 f"{wanted}' and set [listen] lookup"))
    for s in pf.services:
        if s.public and "no_unknown_recipient_checks" in pf.param(s, "receive_override_options"):
            found.append(Finding("postfix", f"master.cf {s.key} sets receive_override_options="
                                 "no_unknown_recipient_checks: unknown users are accepted there",
                                 f"remove that option from {s.key}"))
    return found


def filter_scope(pf: Postfix) -> list[Finding]:
    """content_filter belongs on the public smtpd only: mailgate refuses other domains (5.7.1)."""
    found = []
    spec = pf.main.get("content_filter", "")
    if spec:
        found.append(Finding("postfix", f"content_filter = {spec} is set in main.cf, so local "
                             "submissions and what your users send out go through mailgate too, "
                             "which refuses them as relaying (550 5.7.1)",
                             f"postconf -X content_filter, and set -o content_filter={spec} on "
                             "the smtp inet entry only (postfix/master.cf.content-filter)"))
    for s in pf.services:
        value = s.options.get("content_filter", "")
        if value and not s.public and s.command in ("smtpd", "pickup", "qmqpd"):
            found.append(Finding("postfix", f"master.cf {s.key} sets content_filter={value}: "
                                 "local or outbound mail submitted there goes through mailgate, "
                                 "which refuses it as relaying (550 5.7.1)",
                                 f"remove -o content_filter from {s.key}"))
    return found


NO_MAPPINGS = ("mailgate does no alias expansion and nothing expands them after it, so mail to "
               "a virtual alias (postmaster@, abuse@) reaches mailgate unexpanded and is "
               "refused 550 5.1.1 after Postfix queued it: a bounce")


def alias_expansion(pf: Postfix, filtered: bool) -> list[Finding]:
    """receive_override_options=no_address_mappings on the way to mailgate: FILTER_README's
    re-injection design, where the filter's re-injection expands aliases. mailgate delivers
    itself. Mode A: every service that takes mail in; mode B: those with the content_filter."""
    def off(value: str) -> bool:
        return "no_address_mappings" in re.split(r"[\s,]+", value)
    found = []
    if off(pf.main.get("receive_override_options", "")):
        found.append(Finding("postfix", "receive_override_options = "
                             f"{pf.main['receive_override_options']} in main.cf turns off "
                             f"virtual alias expansion: {NO_MAPPINGS}",
                             "postconf -e 'receive_override_options = ' (or remove "
                             "no_address_mappings from it)"))
    for s in pf.services:
        value = s.options.get("receive_override_options", "")
        if (s.command in ("smtpd", "pickup", "qmqpd") and off(value)
                and (not filtered or pf.param(s, "content_filter"))):
            found.append(Finding("postfix", f"master.cf {s.key} sets receive_override_options="
                                 f"{value}, which turns off virtual alias expansion: "
                                 f"{NO_MAPPINGS}",
                                 f"remove no_address_mappings from {s.key}"))
    return found
