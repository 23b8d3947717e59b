"""`mailgate explain`: per recipient, each filter's verdict and reason and the outcome, from the
configured chain and store; nothing delivered, nothing remembered, no mailgate running.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from backends import Backend, backend, cli, moto_server  # noqa: F401 (fixtures)
from conftest import USERS
from mailgate.admin import with_store
from mailgate.config import load
from peers import Mailgate

ALICE, BOB, CAROL = USERS
TESTS = Path(__file__).parent
EML = b"From: Eve <eve@spam.test>\nTo: alice@example.test\nSubject: Cheap stuff\n\nBuy now.\n"


def explainer(tmp_path: Path, backend: Backend, filters: list[str], **overrides) -> Mailgate:
    config = {"hostname": "mx.example.test", "domains": ["example.test"],
              "data_dir": str(tmp_path / "data"), "store": backend.store,
              "pipeline": {"filters": filters}, **overrides}
    gate = Mailgate(tmp_path / "gate", config, env={**backend.env, "PYTHONPATH": str(TESTS)})
    if backend.name == "dynamodb":
        cli(gate, "store", "init")
    cli(gate, "block", "add", ALICE, "*@spam.test")
    (tmp_path / "m.eml").write_bytes(EML)
    return gate


def explain(gate: Mailgate, tmp_path: Path, *rcpts: str, sender: str = "eve@spam.test") -> str:
    args = [a for r in rcpts for a in ("--to", r)]
    return cli(gate, "explain", str(tmp_path / "m.eml"), "--from", sender, *args).stdout


def state_keys(gate: Mailgate) -> list[str]:
    return with_store(load(str(gate.config_path), environ={}), lambda store: store.keys(""))


def test_each_filter_verdict_and_the_outcome_per_recipient(tmp_path, backend, monkeypatch):
    for name, value in backend.env.items():   # for this process's own look at the store
        monkeypatch.setenv(name, value)
    gate = explainer(tmp_path, backend, ["blocklist", "filters_for_tests:RedirectCarolToBob",
                                         "filters_for_tests:Tag"])
    out = explain(gate, tmp_path, ALICE, BOB, CAROL)
    size = len(EML.replace(b"\n", b"\r\n"))   # as it would arrive over SMTP
    assert out.startswith(f"message: {size} bytes from <eve@spam.test>, Subject: Cheap stuff\n"
                          "chain: blocklist, filters_for_tests:RedirectCarolToBob, "
                          "filters_for_tests:Tag\n"), out
    assert (f"<{ALICE}>\n"
            f"  blocklist  discard   blocklist: <eve@spam.test> matches *@spam.test blocked by "
            f"<{ALICE}>\n"
            f"  redirect   -         no opinion\n"
            f"  tag        -         no opinion\n"
            f"  => discarded: the client hears 250 2.0.0 Ok: discarded, nothing is delivered\n"
            ) in out
    assert f"<{BOB}>\n  blocklist  -         no opinion\n" in out
    assert f"  => delivered to the mailbox of <{BOB}>\n" in out
    assert (f"  redirect   redirect  carol is away\n  tag        -         no opinion\n"
            f"  => redirected to <{BOB}>\n") in out
    assert "header added: X-Test-Tag: parsed Cheap stuff\n" in out
    assert out.splitlines()[-1].startswith("nothing was delivered or sent")
    assert state_keys(gate) == []   # nothing remembered either


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_reject_shows_the_refusal_at_rcpt_and_a_failing_filter_shows_serves_451(tmp_path, backend):
    gate = explainer(tmp_path, backend, ["blocklist", "filters_for_tests:Boom"],
                     blocklist={"action": "reject"})
    out = explain(gate, tmp_path, ALICE, BOB)
    assert (f"<{ALICE}>\n  at RCPT    reject    blocklist: <eve@spam.test> matches *@spam.test "
            f"blocked by <{ALICE}>\n  => refused at RCPT: 550 5.7.1 Sender address rejected: "
            f"blocked by the recipient\n") in out
    assert ("  boom       defer     filter boom failed: RuntimeError: boom: a filter bug, "
            "on purpose\n  => deferred (the sender retries): 451 4.3.0 ") in out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_bad_input_is_exit_2(tmp_path, backend):
    gate = explainer(tmp_path, backend, ["blocklist"])
    for args, why in ((["/nonexistent.eml", "--from", "a@x.test", "--to", ALICE], "No such file"),
                      ([str(tmp_path / "m.eml"), "--from", "a@x.test", "--to", "x@elsewhere.test"],
                       "elsewhere.test is not one of domains")):
        proc = cli(gate, "explain", *args, check=False)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_filter_over_its_time_shows_serves_451(tmp_path, backend):
    gate = explainer(tmp_path, backend, ["filters_for_tests:Slow"],
                     pipeline={"filters": ["filters_for_tests:Slow"], "filter_timeout": 0.5})
    out = explain(gate, tmp_path, ALICE)
    assert ("  slow       defer     filter slow timed out after 0.5 s\n"
            "  => deferred (the sender retries): 451 4.3.0 ") in out, out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_later_filters_see_what_earlier_ones_found_as_in_serve(tmp_path, backend):
    # serve's chain hands auth's findings to vacation (no reply to a forged sender): explain too
    gate = explainer(tmp_path, backend, ["filters_for_tests:FindsForgery",
                                         "filters_for_tests:ShowsFindings"])
    out = explain(gate, tmp_path, BOB)
    assert "  shows      continue  was told spf=fail\n" in out, out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_explaining_a_bounce_or_a_vacation_leaves_the_real_message_its_notice(tmp_path, backend):
    # The bounce filter claims "told" per SES message and recipient before it builds the notice:
    # explain must not make that claim for the real DSN, nor remember a vacation reply.
    from test_bounce import dsn
    gate = explainer(tmp_path, backend, ["rules", "vacation", "bounce"])
    ses_id = "0100019explain-000000"
    with_store(load(str(gate.config_path), environ={}), lambda store: store.put_outbound(
        ses_id, {"original_sender": ALICE, "recipients": ["friend@elsewhere.test"]}))
    (tmp_path / "away.txt").write_text("Back Monday.\n")
    cli(gate, "rule", "set", BOB, "--forward", "friend@elsewhere.test", "--vacation", "on",
        "--subject", "Away", "--body-file", str(tmp_path / "away.txt"))
    (tmp_path / "dsn.eml").write_bytes(dsn("x", ses_id))
    (tmp_path / "bob.eml").write_bytes(b"From: ann@remote.test\nTo: bob@example.test\n"
                                       b"Subject: Lunch\n\nMonday?\n")
    for _ in range(2):
        out = cli(gate, "explain", str(tmp_path / "dsn.eml"), "--from", "<>", "--to", ALICE).stdout
        assert f"bounce: SES message {ses_id} from <{ALICE}>: notice instead of the DSN" in out, out
        out = cli(gate, "explain", str(tmp_path / "bob.eml"), "--from", "ann@remote.test",
                  "--to", BOB).stdout
        assert "vacation: reply to <ann@remote.test> once delivered" in out, out
        assert "would send: auto-reply to <ann@remote.test>" in out, out
    assert state_keys(gate) == []
