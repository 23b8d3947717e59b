"""The README's config blocks are the defaults, key for key: an operator copies them."""
import dataclasses
import re
import tomllib
from pathlib import Path

from mailgate.config import Config

README = Path(__file__).resolve().parents[2] / "README.md"
EXCEPTIONS = {"hostname", "domains", "data_dir"}  # the README says what their defaults are


def documented() -> dict:
    """The block under "## Configuration" and the [sync] block, merged."""
    text = README.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    main = next(b for b in blocks if text.index(b) > text.index("## Configuration"))
    sync = next(b for b in blocks if b.startswith("[sync]"))
    return {**tomllib.loads(main), **tomllib.loads(sync)}


def as_toml(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_documented_value_is_the_default_and_every_key_is_documented():
    shown, defaults = documented(), Config(hostname="h")
    for f in dataclasses.fields(Config):
        if f.name in EXCEPTIONS:
            assert f.name in shown, f.name
            continue
        section = getattr(defaults, f.name)
        assert f.name in shown, f"[{f.name}] is not in the README"
        for key in dataclasses.fields(section):
            assert key.name in shown[f.name], f"{f.name}.{key.name} is not in the README"
            assert shown[f.name][key.name] == as_toml(getattr(section, key.name)), \
                f"{f.name}.{key.name}: README {shown[f.name][key.name]!r}"
        assert set(shown[f.name]) == {k.name for k in dataclasses.fields(section)}, f.name
