"""`mailgate doctor`: Postfix, Dovecot and mailgate's config checked against each other.

Reads what an admin would run (`postconf -x`, `postconf -M`, `doveconf -n`, each with -c when
given) and mailgate's config, and prints one line per problem with its fix; exit 1 if there is
any. Nothing is started or connected to: a peer that is down is `mailgate status`'s business.
A tool that cannot be run is itself a finding.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from mailgate.config import Config, find_file

TOOL_TIMEOUT = 30.0  # seconds for one postconf/doveconf run


@dataclass(frozen=True)
class Finding:
    where: str    # postfix | dovecot | mailgate
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}. Fix: {self.fix}"


class ToolFailed(Exception):
    """postconf or doveconf could not be run or exited non-zero; the text says why."""


def run_tool(cmd: list[str]) -> tuple[str, list[str]]:
    """stdout and the stderr lines of a config tool (warnings there are findings: postconf
    exits 0 on typos and only warns)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ToolFailed(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{' '.join(cmd)} did not finish in {TOOL_TIMEOUT:.0f} s") from None
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise ToolFailed(f"{' '.join(cmd)} exited {proc.returncode}: "
                         f"{errors[-1] if errors else 'no message'}")
    return proc.stdout, errors


def findings(config: Config, config_path: str | None, postfix_dir: str | None,
             dovecot_file: str | None) -> tuple[list[Finding], list[str]]:
    """Every problem found, and a few words per peer on what was checked."""
    from mailgate.doctor import dovecot, postfix  # after Finding/run_tool exist: they use them
    found: list[Finding] = []
    if find_file(config_path, os.environ) is None:
        found.append(Finding("mailgate", "no config file, so the embedded defaults are checked "
                             "(domains = localhost)", "write /etc/mailgate/mailgate.toml "
                             "(README: Install next to Postfix and Dovecot) or pass -c FILE"))
    summary = []
    for peer in (postfix, dovecot):
        peer_found, words = peer.check(config, postfix_dir if peer is postfix else dovecot_file)
        found += peer_found
        summary.append(words)
    return found, summary


def command(args, config: Config) -> int:
    found, summary = findings(config, args.config, args.postfix_config, args.dovecot_config)
    for finding in found:
        print(finding)
    if found:
        print(f"doctor: {len(found)} problem{'s' if len(found) > 1 else ''} found")
        return 1
    print(f"doctor: no problems found ({'; '.join(summary)})")
    return 0
