"""Config: file, environment overrides, validation naming the key; check-config's exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate import config, pipeline
from mailgate.config import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """
hostname = "mx.example.test"
domains = ["example.test"]
[listen]
smtp = "127.0.0.1:10025"
lmtp = "127.0.0.1:10024"
[delivery]
lmtp = "127.0.0.1:24"
maildir = "/var/vmail/{domain}/{user}"
"""


def write(tmp_path, text):
    path = tmp_path / "mailgate.toml"
    path.write_text(text)
    return str(path)


def test_contract_keys_load(tmp_path):
    cfg = config.load(write(tmp_path, GOOD), {})
    assert cfg.hostname == "mx.example.test"
    assert cfg.domains == ("example.test",)
    assert cfg.listen.smtp == "127.0.0.1:10025" and cfg.listen.lmtp == "127.0.0.1:10024"
    assert cfg.delivery.lmtp == "127.0.0.1:24"
    assert cfg.delivery.maildir == "/var/vmail/{domain}/{user}"
    assert cfg.delivery.create_maildirs == ()  # a file gets no maildirs created for it


def test_embedded_defaults_deliver_somewhere_local():
    cfg = config.load(None, {"MAILGATE_DATA_DIR": "/srv/mg"})
    assert cfg.domains == ("localhost",)
    assert cfg.maildir_template() == "/srv/mg/mail/{domain}/{user}"
    assert cfg.delivery.create_maildirs == ("postmaster@localhost",)


def test_the_delivery_record_outlives_the_senders_retries():
    """A permanent failure beside a delivered recipient is 451 over SMTP: Postfix retries it
    until its maximal_queue_lifetime (5 days by default), and every retry after the record is
    gone would deliver again to the recipients who have it."""
    cfg = config.load(None, {"MAILGATE_DATA_DIR": "/srv/mg"})
    assert cfg.delivery.delivery_record >= 5 * 24 * 3600


@pytest.mark.parametrize("env, key, value", [
    ({"MAILGATE_LIMITS_MAX_RECIPIENTS": "5"}, ("limits", "max_recipients"), 5),
    ({"MAILGATE_DELIVERY_LMTP": "unix:/run/dovecot/lmtp"}, ("delivery", "lmtp"), "unix:/run/dovecot/lmtp"),
    ({"MAILGATE_LOG_SYSLOG": "yes"}, ("log", "syslog"), True),
    ({"LMTP_HOST": "10.0.0.5", "LMTP_PORT": "2424"}, ("delivery", "lmtp"), "10.0.0.5:2424"),
    ({"INTERNAL_SMTP_PORT": "2525"}, ("listen", "smtp"), "127.0.0.1:2525"),
    ({"METRICS_PORT": "9100"}, ("metrics", "listen"), "127.0.0.1:9100"),
    ({"HEALTH_PORT": "9101"}, ("health", "listen"), "127.0.0.1:9101"),
    ({"SMTP_PORT": "587"}, ("relay", "smtp"), "127.0.0.1:587"),
])
def test_environment_overrides_one_key(tmp_path, env, key, value):
    cfg = config.load(write(tmp_path, GOOD), env)
    assert getattr(getattr(cfg, key[0]), key[1]) == value


def test_internal_smtp_port_moves_the_feed_with_the_listener(tmp_path):
    """sync.inject is "serve's SMTP listener": INTERNAL_SMTP_PORT, which moves listen.smtp,
    moves it too (else a sync started with the same environment injects where nothing
    listens), unless sync.inject is set itself, in the file or as MAILGATE_SYNC_INJECT."""
    cfg = config.load(write(tmp_path, GOOD), {"INTERNAL_SMTP_PORT": "2525"})
    assert cfg.listen.smtp == cfg.sync.inject == "127.0.0.1:2525"
    cfg = config.load(write(tmp_path, GOOD), {"INTERNAL_SMTP_PORT": "2525",
                                              "MAILGATE_SYNC_INJECT": "127.0.0.1:2626"})
    assert (cfg.listen.smtp, cfg.sync.inject) == ("127.0.0.1:2525", "127.0.0.1:2626")
    own = write(tmp_path, GOOD + '[sync]\ninject = "unix:/run/mailgate/smtp"\n')
    cfg = config.load(own, {"INTERNAL_SMTP_PORT": "2525"})
    assert (cfg.listen.smtp, cfg.sync.inject) == ("127.0.0.1:2525", "unix:/run/mailgate/smtp")


def test_list_from_environment(tmp_path):
    cfg = config.load(write(tmp_path, GOOD), {"MAILGATE_DOMAINS": "a.test, b.test"})
    assert cfg.domains == ("a.test", "b.test")


@pytest.mark.parametrize("text, key", [
    (GOOD + "[listen.extra]\n", "listen.extra"),
    (GOOD.replace("[listen]", "[listen]\nsmpt = \"x:1\""), "listen.smpt"),
    (GOOD + "colour = 1\n", "colour"),
    (GOOD.replace('domains = ["example.test"]', 'domains = "example.test"'), "domains"),
    (GOOD.replace('lmtp = "127.0.0.1:24"', 'lmtp = "127.0.0.1"'), "delivery.lmtp"),
    (GOOD.replace('{domain}/{user}', 'fixed'), "delivery.maildir"),
    (GOOD + "[limits]\nmax_recipients = 0\n", "limits.max_recipients"),
    (GOOD.replace('maildir = "/var/vmail/{domain}/{user}"', 'maildir = ""\ncreate_maildirs = ["a@example.test"]'),
     "delivery.create_maildirs"),
    (GOOD.replace('[delivery]', '[delivery]\ncreate_maildirs = ["../x@example.test"]'),
     "delivery.create_maildirs"),
    (GOOD.replace('domains = ["example.test"]', 'domains = ["Example.test"]'), "domains"),
    (GOOD.replace('domains = ["example.test"]', 'domains = ["ex_ample.test"]'), "domains"),
    (GOOD + "[limits]\nmessage_timeout = 600\n", "limits.message_timeout"),
    (GOOD + "[sync]\nwait_time = 0.5\n", "sync.wait_time: must be a whole number of seconds"),
    (GOOD + "[sync]\nvisibility_timeout = 2.5\n",
     "sync.visibility_timeout: must be a whole number of seconds"),
    (GOOD + "[listen]\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(write(tmp_path, text), {})


def test_unknown_filter_names_the_key(tmp_path):
    cfg = config.load(write(tmp_path, GOOD + "[pipeline]\nfilters = [\"nosuchfilter\"]\n"), {})
    with pytest.raises(ConfigError, match=r"pipeline\.filters: unknown filter 'nosuchfilter'"):
        pipeline.validate(cfg)


def test_bad_environment_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"limits\.max_recipients"):
        config.load(write(tmp_path, GOOD), {"MAILGATE_LIMITS_MAX_RECIPIENTS": "many"})


def check_config(*args):
    return subprocess.run([sys.executable, "-m", "mailgate", "check-config", *args],
                          capture_output=True, text=True, timeout=30)


def check_config_with(tmp_path, text, **env):
    """check-config on `text` with only these variables (and what Python needs) set."""
    import os
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
    return subprocess.run([sys.executable, "-m", "mailgate", "check-config", "-c",
                           write(tmp_path, text)],
                          env={**base, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_an_unknown_environment_key_is_named_as_the_operator_set_it(tmp_path):
    """A MAILGATE_<SECTION>_<KEY> with a key the section lacks (a typo) stops every command,
    naming the variable, not a key no config file holds."""
    typo = check_config_with(tmp_path, GOOD, MAILGATE_DELIVERY_LMTP_TIMOUT="3")
    assert (typo.returncode, typo.stderr) == (2, (
        "mailgate: config error: MAILGATE_DELIVERY_LMTP_TIMOUT (environment): unknown key "
        "delivery.lmtp_timout\n"))
    bare = check_config_with(tmp_path, GOOD, MAILGATE_LISTEN="127.0.0.1:25")
    assert (bare.returncode, bare.stderr) == (2, (
        "mailgate: config error: MAILGATE_LISTEN (environment): [listen] is a section: set "
        "MAILGATE_LISTEN_<KEY>\n"))


def test_a_variable_that_is_no_setting_at_all_is_ignored_with_a_warning(tmp_path):
    """Kubernetes sets MAILGATE_PORT=tcp://... and friends in every pod of a namespace with a
    Service named mailgate (or mailgate-metrics): they must not stop mailgate. Named on stderr,
    so a misspelt top-level key is seen; the file stays strict."""
    stray = check_config_with(tmp_path, GOOD, MAILGATE_FOO="1",
                              MAILGATE_PORT="tcp://10.0.0.7:25",
                              MAILGATE_PORT_25_TCP_ADDR="10.0.0.7",
                              MAILGATE_METRICS_SERVICE_HOST="10.0.0.8",
                              MAILGATE_HOSTNAME="mx.other.test")
    assert stray.returncode == 0, stray.stderr
    assert stray.stderr == "".join(
        f"mailgate: warning: {name} (environment): not a mailgate setting, ignored\n"
        for name in ("MAILGATE_FOO", "MAILGATE_METRICS_SERVICE_HOST", "MAILGATE_PORT",
                     "MAILGATE_PORT_25_TCP_ADDR"))
    assert stray.stdout.endswith("mailgate.toml: ok\n")


@pytest.mark.parametrize("env", [{"MAILGATE_LISTEN_SMTP": "127.0.0.1:2525"},
                                 {"INTERNAL_SMTP_PORT": "2525"}])
def test_a_string_where_a_table_belongs_is_a_config_error_with_the_environment_too(tmp_path,
                                                                                   env):
    text = 'hostname = "mx.example.test"\ndomains = ["example.test"]\nlisten = "x"\n'
    wrong = check_config_with(tmp_path, text, **env)
    assert (wrong.returncode, wrong.stderr) == (2, "mailgate: config error: listen: expected a "
                                                   "table\n")


def test_check_config_cli(tmp_path):
    good = check_config("-c", write(tmp_path, GOOD))
    assert good.returncode == 0, good.stderr
    (tmp_path / "bad.toml").write_text(GOOD + "[delivery]\n")
    bad = check_config("-c", str(tmp_path / "bad.toml"))
    assert bad.returncode == 2
    (tmp_path / "typo.toml").write_text(GOOD.replace("hostname", "hostnmae"))
    typo = check_config("-c", str(tmp_path / "typo.toml"))
    assert typo.returncode == 2 and "hostnmae: unknown key" in typo.stderr


def test_cli_usage_and_version():
    usage = subprocess.run([sys.executable, "-m", "mailgate"], capture_output=True, timeout=30)
    assert usage.returncode == 2
    version = subprocess.run([sys.executable, "-m", "mailgate", "--version"],
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("mailgate ")


def test_config_not_utf8_is_one_config_error_line(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(GOOD.encode() + '# réglages\n'.encode("latin-1"))
    latin1 = check_config("-c", str(tmp_path / "latin1.toml"))
    assert latin1.returncode == 2
    assert latin1.stderr == (f"mailgate: config error: {tmp_path / 'latin1.toml'}: not UTF-8 "
                             f"text: byte 0xe9 at offset {len(GOOD) + 3}; save it as UTF-8\n")


def unit_data_dir(unit: str, monkeypatch) -> str:
    """data_dir as the systemd unit gives it to mailgate: StateDirectory= becomes
    $STATE_DIRECTORY, an Environment=MAILGATE_DATA_DIR= would win over it."""
    lines = (REPO / "systemd" / unit).read_text().splitlines()
    state = [line.split("=", 1)[1].split()[0] for line in lines
             if line.startswith("StateDirectory=")]
    monkeypatch.setenv("STATE_DIRECTORY", f"/var/lib/{state[0]}")
    environ = dict(line.split("=", 1)[1].split("=", 1) for line in lines
                   if line.startswith("Environment="))
    return config.load(None, {k: v for k, v in environ.items() if k != "MAILGATE_CONFIG"}).data_dir


def test_sync_unit_and_a_root_shell_share_the_exactly_once_memory(monkeypatch):
    """`mailgate sync replay` typed in a root shell must find what the unit's feed delivered:
    the same data_dir, so the same {data_dir}/mailgate.sqlite3 (and serve's too)."""
    monkeypatch.setattr(config.sections.os, "geteuid", lambda: 0)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", REPO / "no-such-file.toml")
    shell = config.load(None, {}).data_dir
    assert shell == "/var/lib/mailgate"
    assert unit_data_dir("mailgate-sync.service", monkeypatch) == shell
    assert unit_data_dir("mailgate.service", monkeypatch) == shell


def test_admin_commands_as_the_service_user_use_the_units_store(tmp_path, monkeypatch):
    """README: "Run these as root or as the service user". In a vmail shell (`runuser -u vmail
    -- mailgate block add ...`) the block must land in the store serve reads: the unit's
    StateDirectory, which vmail owns, not ~/.local/share/mailgate. A user who may not write it
    keeps the per-user default. (SYSTEM_DATA_DIR stands for /var/lib/mailgate here.)"""
    import os
    state = tmp_path / "var-lib-mailgate"
    monkeypatch.setattr(config.sections, "SYSTEM_DATA_DIR", str(state), raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", REPO / "no-such-file.toml")
    for name in ("STATE_DIRECTORY", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    vmail = os.getuid() or 5000     # a user other than root: the test may run as root
    monkeypatch.setattr(config.sections.os, "geteuid", lambda: vmail)
    assert config.load(None, {}).data_dir == str(tmp_path / "home/.local/share/mailgate")
    state.mkdir(mode=0o700)         # as systemd makes StateDirectory=mailgate for User=vmail
    os.chown(state, vmail, -1)
    shell = config.load(None, {}).data_dir
    monkeypatch.setenv("STATE_DIRECTORY", str(state))        # systemd/mailgate.service
    assert shell == config.load(None, {}).data_dir == str(state)


def test_a_reload_applies_what_the_rebuilt_chain_reads_and_keeps_what_was_built_once():
    import dataclasses
    from mailgate.config import Config
    from mailgate.config.sections import Store
    from mailgate.service import keep_running
    running = Config(domains=("example.test",), store=Store(outage_budget=600, path="/a.db"))
    new = dataclasses.replace(running, store=Store(outage_budget=60, path="/b.db"))
    kept, stale = keep_running(new, running)
    assert kept.store.outage_budget == 60        # the rules filter the reload builds reads it
    assert kept.store.path == "/a.db" and stale == ["store.path"]   # the store is built once
