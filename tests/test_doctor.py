"""`mailgate doctor` on real Postfix and Dovecot configs: the shipped snippets (clean), then each
pitfall an operator meets, one at a time, with the real postconf and doveconf reading them.

A site is what the install guide builds: the lint base configs (a stock loopback Postfix and a
self-contained Dovecot) plus the shipped snippets, and the README's mailgate.toml. Nothing runs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import REPO, run

MODES = ["lmtp-transport", "content-filter"]


@dataclass
class Site:
    root: Path

    @property
    def postfix(self) -> Path:
        return self.root / "postfix"

    @property
    def dovecot(self) -> Path:
        return self.root / "dovecot" / "dovecot.conf"

    @property
    def snippet(self) -> Path:
        return self.root / "dovecot" / "10-mailgate.conf"

    @property
    def mailgate(self) -> Path:
        return self.root / "mailgate.toml"

    def postconf(self, *args: str) -> None:
        run(["postconf", "-c", str(self.postfix), *args])

    def doctor(self, *extra: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
        environ["PYTHONPATH"] = str(REPO)
        return subprocess.run(
            [sys.executable, "-m", "mailgate", "doctor", "-c", str(self.mailgate),
             "--postfix-config", str(self.postfix), "--dovecot-config", str(self.dovecot), *extra],
            capture_output=True, text=True, timeout=60, env=environ, stdin=subprocess.DEVNULL)

    def findings(self) -> list[str]:
        """The problem lines of a doctor run that must fail (exit 1, nothing on stderr)."""
        result = self.doctor()
        assert (result.returncode, result.stderr) == (1, ""), result
        lines = result.stdout.splitlines()
        assert re.fullmatch(r"doctor: \d+ problems? found", lines[-1]), lines
        return lines[:-1]


def guide_config() -> str:
    """mailgate.toml exactly as the README's install guide writes it."""
    text = (REPO / "README.md").read_text()
    return re.search(r"(?ms)^cat > /etc/mailgate/mailgate.toml <<'EOF'\n(.*?)^EOF$", text).group(1)


def build(root: Path, mode: str) -> Site:
    """Postfix and Dovecot configured as the guide says, from the files the guide copies."""
    site = Site(root)
    site.postfix.mkdir()
    main = (REPO / ".ci/postfix-main.cf.in").read_text().replace("@ROOT@", str(root / "spool"))
    (site.postfix / "main.cf").write_text(main + (REPO / f"postfix/main.cf.{mode}").read_text())
    (site.postfix / "master.cf").write_text((REPO / ".ci/postfix-master.cf.in").read_text())
    if mode == "content-filter":
        site.postconf("-M#", "smtp/inet")
        with open(site.postfix / "master.cf", "a") as master:
            master.write((REPO / "postfix/master.cf.content-filter").read_text())
    site.dovecot.parent.mkdir()
    (site.dovecot.parent / "users").touch()
    site.snippet.write_text((REPO / "dovecot/10-mailgate.conf").read_text())
    site.dovecot.write_text((REPO / ".ci/dovecot-lint.conf.in").read_text()
                            .replace("@ROOT@", str(site.dovecot.parent))
                            .replace("@SNIPPET@", str(site.snippet)))
    site.mailgate.write_text(guide_config())
    return site


@pytest.fixture(params=MODES)
def site(request, tmp_path: Path) -> Site:
    return build(tmp_path, request.param)


@pytest.fixture
def mode_a(tmp_path: Path) -> Site:
    return build(tmp_path, "lmtp-transport")


@pytest.fixture
def mode_b(tmp_path: Path) -> Site:
    return build(tmp_path, "content-filter")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_shipped_snippets_are_clean(site: Site) -> None:
    result = site.doctor()
    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout.startswith("doctor: no problems found ("), result.stdout


def test_served_domain_in_mydestination(site: Site) -> None:
    """Debian's prompt answered with the domain: example.org lands in mydestination."""
    site.postconf("-e", "mydestination = $myhostname, example.org, localhost")
    [line] = site.findings()
    assert line.startswith("postfix: mydestination lists example.org, a domain mailgate serves: ")
    assert "550 5.1.1 User unknown in local recipient table" in line
    assert line.endswith("Fix: postconf -e 'mydestination = mx.example.org, localhost' "
                         "(keep it in virtual_mailbox_domains)")


def test_served_domain_in_relay_domains(site: Site) -> None:
    site.postconf("-e", "relay_domains = example.org")
    [line] = site.findings()
    assert line.startswith("postfix: relay_domains lists example.org, a domain mailgate serves")


def test_transport_not_pointing_at_mailgate(mode_a: Site) -> None:
    """Mode A with virtual_transport straight to Dovecot: mailgate never sees the mail."""
    mode_a.postconf("-e", "virtual_transport = lmtp:inet:127.0.0.1:24")
    [line] = mode_a.findings()
    assert line.startswith("postfix: virtual_transport = lmtp:inet:127.0.0.1:24 does not reach "
                           "mailgate's [listen] lmtp")
    assert line.endswith("Fix: postconf -e 'virtual_transport = lmtp:inet:127.0.0.1:10024'")


def test_content_filter_not_pointing_at_mailgate(mode_b: Site) -> None:
    mode_b.postconf("-P", "smtp/inet/content_filter=scan:[127.0.0.1]:10026")
    [line] = mode_b.findings()
    assert line.startswith("postfix: content_filter = scan:[127.0.0.1]:10026 does not reach "
                           "mailgate's [listen] smtp: it goes to [127.0.0.1]:10026, mailgate "
                           "listens on 127.0.0.1:10025")


def test_no_rcpt_time_rejection(site: Site) -> None:
    """The backscatter setup: Postfix accepts any address and bounces unknown ones later."""
    site.postconf("-X", "virtual_mailbox_maps")
    [line] = site.findings()
    assert line.startswith("postfix: virtual_mailbox_maps is empty, so Postfix accepts any "
                           "address at example.org")
    assert line.endswith("Fix: postconf -e 'virtual_mailbox_maps = "
                         "socketmap:inet:127.0.0.1:10027:recipients'")


def test_lookup_at_the_wrong_address(site: Site) -> None:
    site.postconf("-e", "virtual_mailbox_maps = socketmap:inet:127.0.0.1:10028:recipients")
    [line] = site.findings()
    assert line.startswith("postfix: virtual_mailbox_maps asks socketmap:inet:127.0.0.1:10028:"
                           "recipients, but mailgate's lookup is 127.0.0.1:10027")


def test_content_filter_in_main_cf_catches_local_and_outbound_mail(mode_b: Site) -> None:
    mode_b.postconf("-e", "content_filter = scan:[127.0.0.1]:10025")
    [line] = mode_b.findings()
    assert line.startswith("postfix: content_filter = scan:[127.0.0.1]:10025 is set in main.cf, "
                           "so local submissions and what your users send out go through "
                           "mailgate too")


def test_content_filter_on_the_submission_port(mode_b: Site) -> None:
    mode_b.postconf("-M", "submission/inet=submission inet n - y - - smtpd "
                    "-o content_filter=scan:[127.0.0.1]:10025")
    [line] = mode_b.findings()
    assert line.startswith("postfix: master.cf submission/inet sets content_filter=")


def test_no_address_mappings_on_the_filtered_smtpd(mode_b: Site) -> None:
    """FILTER_README's content-filter recipe puts receive_override_options=no_address_mappings
    on the smtpd with the content_filter, for the re-injection to expand aliases. mailgate
    delivers itself: postmaster@ (the guide's alias) reaches it unexpanded and is refused after
    Postfix queued it, a bounce."""
    mode_b.postconf("-P", "smtp/inet/receive_override_options=no_address_mappings")
    [line] = mode_b.findings()
    assert line.startswith("postfix: master.cf smtp/inet sets receive_override_options="
                           "no_address_mappings, which turns off virtual alias expansion: "), line
    assert "reaches mailgate unexpanded" in line
    assert line.endswith("Fix: remove no_address_mappings from smtp/inet")


def test_no_address_mappings_in_main_cf(site: Site) -> None:
    site.postconf("-e", "receive_override_options = no_unknown_recipient_checks, "
                  "no_address_mappings")
    found = site.findings()
    assert any(line.startswith("postfix: receive_override_options = no_unknown_recipient_checks,"
                               " no_address_mappings in main.cf turns off virtual alias "
                               "expansion: ") for line in found), found


def test_no_address_mappings_where_mailgate_is_not_reached_is_no_problem(mode_b: Site) -> None:
    """The re-injection listener of mailgate's own mail (master.cf.content-filter) skips the
    filter: what it does with aliases is not mailgate's to judge."""
    mode_b.postconf("-M", "127.0.0.1:10026/inet=127.0.0.1:10026 inet n - n - 10 smtpd "
                    "-o content_filter= -o receive_override_options=no_address_mappings")
    result = mode_b.doctor()
    assert (result.returncode, result.stderr) == (0, ""), result


def test_dovecot_lmtp_not_at_delivery_lmtp(site: Site) -> None:
    edit(site.snippet, "port = 24", "port = 2424")
    [line] = site.findings()
    assert line.startswith("dovecot: Dovecot's LMTP listens on 127.0.0.1 port 2424, not on "
                           "127.0.0.1:24 ([delivery] lmtp)")


def test_maildir_template_disagrees_with_mail_location(site: Site) -> None:
    edit(site.snippet, "mail_location = maildir:/var/vmail/%d/%n",
         "mail_location = maildir:~/Maildir")
    [line] = site.findings()  # home=/var/vmail/%d/%n from the userdb: one level too high
    assert line.startswith("dovecot: mail_location = maildir:~/Maildir and mailgate's "
                           "[delivery] maildir = /var/vmail/{domain}/{user} name different "
                           "directories")
    assert line.endswith("Fix: mail_location = maildir:/var/vmail/%d/%n "
                         "(dovecot/10-mailgate.conf), or change [delivery] maildir")


def test_vmail_uid_gid_not_matching(site: Site) -> None:
    """Dovecot's userdb hands out another owner than the vmail user mailgate runs as."""
    edit(site.dovecot, "default_fields = uid=vmail gid=vmail",
         "default_fields = uid=nobody gid=nogroup")
    edit(site.dovecot, "first_valid_uid = 5000", "first_valid_uid = 500")
    edit(site.dovecot, "last_valid_uid = 5000", "last_valid_uid = 0")
    lines = site.findings()
    assert [line.split(" (")[0] for line in lines] == [
        "dovecot: Dovecot writes mail as uid nobody", "dovecot: Dovecot writes mail as gid nogroup"]
    assert "mailgate as vmail (5000, from the shipped mailgate.service)" in lines[0]


def test_static_userdb_args_are_the_mail_user(site: Site) -> None:
    """A static userdb gives uid, gid and home in args; no default_fields needed."""
    edit(site.dovecot, "driver = passwd-file\n  args = username_format=%u "
         f"{site.dovecot.parent}/users\n  default_fields = ",
         "driver = static\n  args = ")
    result = site.doctor()
    assert (result.returncode, result.stderr) == (0, ""), result
    edit(site.dovecot, "args = uid=vmail gid=vmail", "args = uid=nobody gid=vmail")
    assert site.findings()[0].startswith("dovecot: Dovecot writes mail as uid nobody")


@pytest.mark.parametrize("kind", ["texthash", "hash", "file"])
def test_virtual_mailbox_domains_from_a_table_or_file(mode_a: Site, kind: str) -> None:
    table = mode_a.postfix / "vdomains"
    table.write_text("example.net OK\nexample.org OK\n" if kind != "file"
                     else "# served here\nexample.net, example.org\n")
    if kind == "hash":
        run(["postmap", "-c", str(mode_a.postfix), f"hash:{table}"])
    mode_a.postconf("-e", f"virtual_mailbox_domains = {'' if kind == 'file' else kind + ':'}"
                    f"{table}")
    result = mode_a.doctor()
    assert (result.returncode, result.stderr) == (0, ""), result
    table.write_text("example.net OK\n")
    if kind == "hash":
        run(["postmap", "-c", str(mode_a.postfix), f"hash:{table}"])
    [line] = mode_a.findings()
    assert line.startswith("postfix: virtual_mailbox_domains does not list example.org")


def test_virtual_mailbox_domains_from_a_database_is_not_guessed(mode_a: Site) -> None:
    """A table on a server (doctor connects to nothing) is no finding: it is named as unread."""
    cf = mode_a.postfix / "mysql-domains.cf"
    cf.write_text("hosts = 127.0.0.1\nuser = postfix\npassword = x\ndbname = mail\n"
                  "query = SELECT 1 FROM domains WHERE name = '%s'\n")
    mode_a.postconf("-e", f"virtual_mailbox_domains = mysql:{cf}")
    result = mode_a.doctor()
    assert (result.returncode, result.stderr) == (0, ""), result
    assert "(virtual_mailbox_domains not read for example.org)" in result.stdout


def test_postconf_warnings_are_findings(site: Site) -> None:
    with open(site.postfix / "main.cf", "a") as main:
        main.write("virtual_mailbox_domain = example.org\n")  # a typo Postfix only warns about
    [line] = site.findings()
    assert re.match(r"postfix: postconf: warning: .*main\.cf: unused parameter: "
                    r"virtual_mailbox_domain=example\.org\. Fix: ", line), line


def test_unreadable_postfix_config_is_a_finding(site: Site) -> None:
    result = site.doctor("--postfix-config", str(site.root / "nowhere"))
    assert result.returncode == 1 and result.stderr == "", result
    assert result.stdout.startswith(f"postfix: postconf -c {site.root / 'nowhere'} -x exited 1"), \
        result.stdout
