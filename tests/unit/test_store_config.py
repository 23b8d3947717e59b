"""[store] and [blocklist] keys: contract names, defaults with units, refusals naming the key."""
import pytest

from mailgate import config
from mailgate.config import ConfigError


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _load(text, environ):
    with open("mailgate.toml", "w") as f:
        f.write('domains = ["example.test"]\n' + text)
    return config.load("mailgate.toml", environ)


def test_defaults_are_the_deployments_names():
    store = _load("", {}).store
    assert (store.backend, store.rules_table, store.blocked_table, store.outbound_table,
            store.state_table, store.outage_budget) == (
        "sqlite", "email-rules", "email-blocked-senders", "ses-outbound-messages",
        "mailgate-state", 600)
    assert (store.timeout, store.deadline, store.cache_ttl) == (2, 5, 10)
    assert _load("", {}).blocklist.action == "discard"


def test_legacy_environment_names_override_the_tables_and_region():
    cfg = _load('[store]\nbackend = "dynamodb"\n', {"AWS_REGION": "eu-west-1",
                                                    "DYNAMODB_BLOCKED_TABLE": "blocked-x"})
    assert (cfg.store.region, cfg.store.blocked_table) == ("eu-west-1", "blocked-x")


@pytest.mark.parametrize("text, key", [
    ('[store]\nbackend = "dynamodb"\n', "store.region"),
    ('[store]\nbackend = "redis"\n', "store.backend"),
    ('[store]\ndeadline = 0\n', "store.deadline"),
    ('[store]\ntimeout = 0\n', "store.timeout"),
    ('[store]\ncache_ttl = -1\n', "store.cache_ttl"),
    ('[blocklist]\naction = "bounce"\n', "blocklist.action"),
])
def test_bad_store_settings_name_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(text, {})
