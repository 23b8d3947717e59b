"""`mailgate status` and `check-config` as the users that run them: vmail (the service's user)
and any other (a monitoring agent), against a config installed as the guide installs it:
/etc/mailgate 0750 root:vmail, mailgate.toml 0640 root:vmail.

Another user gets one line saying which file, why and as whom, and exit 2; never a traceback.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from peers import UNPRIVILEGED_PYTHON, Mailgate, readable_source

VMAIL_GID = 5000


def install_config(gate: Mailgate, etc: Path) -> Path:
    """The gate's config copied to etc/mailgate.toml with the guide's owners and modes."""
    etc.mkdir(mode=0o750)
    os.chown(etc, 0, VMAIL_GID)
    path = etc / "mailgate.toml"
    shutil.copyfile(gate.config_path, path)
    os.chown(path, 0, VMAIL_GID)
    os.chmod(path, 0o640)
    return path


def as_user(user: str, src: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m mailgate ARGS` as `user`, from a readable copy of this tree, no MAILGATE_*."""
    pw = pwd.getpwnam(user)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    environ.update(PYTHONPATH=str(src), HOME="/nonexistent")
    return subprocess.run([str(UNPRIVILEGED_PYTHON), *args], user=pw.pw_uid, group=pw.pw_gid,
                          extra_groups=[], env=environ, cwd="/", capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def src(peer_root: Path) -> Path:
    if not UNPRIVILEGED_PYTHON.exists():
        pytest.fail(f"{UNPRIVILEGED_PYTHON} is missing: run .ci/install")
    return readable_source(peer_root / "src")


def test_vmail_runs_check_config_and_status(dovecot, mailgate_factory, peer_root, src) -> None:
    config = install_config(mailgate_factory(), peer_root / "etc")
    checked = as_user("vmail", src, "-m", "mailgate", "check-config", "-c", str(config))
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, f"{config}: ok\n", ""), \
        checked
    status = as_user("vmail", src, "-m", "mailgate", "status", "-c", str(config))
    assert status.returncode == 0 and ": ok (up " in status.stdout, status


@pytest.mark.parametrize("verb", ["status", "check-config"])
def test_other_user_gets_one_line_and_exit_2(verb, dovecot, mailgate_factory, peer_root,
                                             src) -> None:
    config = install_config(mailgate_factory(), peer_root / "etc")
    result = as_user("nobody", src, "-m", "mailgate", verb, "-c", str(config))
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.rstrip("\n").endswith(
        f"{config}: cannot read: Permission denied (as user nobody)"), result.stderr


@pytest.mark.parametrize("verb", ["status", "check-config"])
def test_system_config_behind_a_closed_directory_is_not_taken_as_absent(verb, dovecot,
                                                                        mailgate_factory,
                                                                        peer_root, src) -> None:
    """No -c: the system path is looked up; a 0750 directory must not mean "no file, defaults"."""
    config = install_config(mailgate_factory(), peer_root / "etc")
    program = ("import sys; from pathlib import Path; import mailgate.config as c; "
               "c.SYSTEM_CONFIG = Path(sys.argv[1]); from mailgate.__main__ import main; "
               "sys.exit(main(sys.argv[2:]))")  # the system path, moved into the test's root
    result = as_user("nobody", src, "-c", program, str(config), verb)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert result.stderr.rstrip("\n").endswith(
        f"{config}: cannot read: Permission denied (as user nobody)"), result.stderr
