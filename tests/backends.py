"""The two store backends for end-to-end tests, and the admin CLI as an operator runs it.

`backend` runs a test on SQLite and on DynamoDB (moto in server mode, one server per module,
reset per test). `cli(gate, ...)` runs `python -m mailgate ... -c` the gate's own config, as
root or, with user="vmail", as the service user from the gate's copy of the source.
"""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from peers import REPO, UNPRIVILEGED_PYTHON, Mailgate, Moto


@dataclass
class Backend:
    name: str
    store: dict[str, Any] = field(default_factory=dict)   # the [store] section
    env: dict[str, str] = field(default_factory=dict)     # what mailgate needs to reach it
    moto: Moto | None = None


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite")
    moto: Moto = request.getfixturevalue("moto_server")
    if not moto.running:  # an earlier test took the cloud away
        moto.start()
    moto.reset()
    return Backend("dynamodb", {"backend": "dynamodb", "endpoint_url": moto.endpoint,
                                "region": "us-east-1"}, moto.env, moto)


def cli(gate: Mailgate, *args: str, user: str | None = None, check: bool = True,
        config_first: bool = False) -> subprocess.CompletedProcess:
    """`mailgate ARGS -c CONFIG` (or `-c CONFIG ARGS`) with the gate's config and environment;
    the test fails on an exit other than 0 unless check=False."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env.update(gate.env)
    python = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (gate.env.get("PYTHONPATH", ""), str(REPO)) if p)
    as_user: dict[str, Any] = {}
    if user is not None:  # the copy of the source Mailgate(user=...) made, and its venv
        python, env["PYTHONPATH"], env["HOME"] = str(UNPRIVILEGED_PYTHON), str(gate.root / "src"), str(gate.root)
        pw = pwd.getpwnam(user)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    config = ["-c", str(gate.config_path)]
    argv = [*config, *args] if config_first else [*args, *config]
    proc = subprocess.run([python, "-m", "mailgate", *argv],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=gate.root, stdin=subprocess.DEVNULL, **as_user)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc


def owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid
