#!/usr/bin/env python3
"""Put each bug the reliability suite guards against back, once, and watch its tests fail.

    python3 tests/mutants.py            # every mutant (about 10 minutes here)
    python3 tests/mutants.py --list
    python3 tests/mutants.py shield-removed fsync-file-removed

Each mutant is applied to a copy of the tree in a temp directory (never to this checkout), and
the tests named for it run there; a mutant "survives" when they all pass. docs/RELIABILITY.md
lists the same table. Exit status: the number of mutants that survived.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
D, K, C, S, U, L = ("tests/test_faults_delivery.py", "tests/test_faults_disk.py",
                    "tests/test_faults_crash.py", "tests/test_faults_startup.py",
                    "tests/test_faults_durability.py", "tests/test_faults_load.py")

# name: (file, text, replacement, tests that must fail); a list of (text, replacement) pairs
# where the mutant is more than one edit
MUTANTS = {
    "temp-failure-554": ("mailgate/verdict.py", 'TEMP_FAILURE = Reply(451,', 'TEMP_FAILURE = Reply(554,',
                         [f"{C}::test_bug_at_rcpt_is_451_4_3_0_and_the_session_goes_on"]),
    "delivery-deferred-554": ("mailgate/verdict.py", 'DELIVERY_DEFERRED = Reply(451,',
                              'DELIVERY_DEFERRED = Reply(554,',
                              [f"{D}::test_dovecot_unreachable_defers_then_its_return_costs_nothing"]),
    "handle-exception-554": ("mailgate/gateway.py", "        return str(TEMP_FAILURE)\n",
                             '        return "554 5.3.0 Error: internal error"\n',
                             [f"{C}::test_bug_at_rcpt_is_451_4_3_0_and_the_session_goes_on"]),
    "processing-exception-550": ("mailgate/gateway.py",
                                 'results = [Result(r, TEMP_FAILURE, "none", "deferred", "internal error")',
                                 'results = [Result(r, Reply(550, "5.3.0", "Error"), "none", "bounced", "")',
                                 [f"{C}::test_bug_while_processing_is_451_4_3_0_per_recipient_and_leaves_nothing"]),
    "budget-not-on-pool": ("mailgate/lmtppool.py",
                           "            conn.deadline = deadline\n            try:\n"
                           "                await conn.transaction(",
                           "            try:\n                await conn.transaction(",
                           [f"{D}::test_dovecot_slower_than_the_message_budget"]),
    "5xx-to-fallback": ("mailgate/deliver.py",
                        "(reply.code < 400 or reply.code >= 500 or decided(reply))",
                        "(reply.code < 400 or decided(reply))",
                        [f"{D}::test_quota_full_is_552_5_2_2_for_that_recipient_never_the_fallback"]),
    "full-mailbox-to-fallback": ("mailgate/deliver.py",
                                 'return status in ("4.2.1", "4.2.2") or status.startswith("4.7.")',
                                 "return False",
                                 ["tests/test_delivery.py::test_a_full_mailbox_is_deferred_as_dovecot_says_never_written_around_its_quota"]),
    "record-skipped-on-disconnect": ("mailgate/gateway.py",
                                     "if (not told_per_recipient and not all(r.ok for r in results)) or lost:",
                                     "if not told_per_recipient and not all(r.ok for r in results):",
                                     [f"{D}::test_client_leaving_before_the_reply_neither_loses_nor_doubles"]),
    "shield-removed": ("mailgate/gateway.py", "results = await asyncio.shield(task)",
                       "results = await task",
                       [f"{D}::test_client_leaving_before_the_reply_neither_loses_nor_doubles[reset]"]),
    "fsync-file-removed": ("mailgate/maildir.py", "            os.fsync(fd)\n", "",
                           [f"{U}::test_250_is_sent_only_after_the_copy_is_durable"]),
    "fsync-new-removed": ("mailgate/maildir.py", "            os.fsync(new_fd)\n", "            pass\n",
                          [f"{U}::test_250_is_sent_only_after_the_copy_is_durable"]),
    "tmp-not-cleaned": ("mailgate/maildir.py", "            os.unlink(base, dir_fd=tmp_fd)\n",
                        "            pass\n",
                        [f"{K}::test_disk_full_under_the_fallback_is_451_and_leaves_nothing"]),
    "unknown-falls-back": ("mailgate/deliver.py", "if reply is not None and reply.unknown:",
                           "if False:",
                           [f"{D}::test_reply_lost_after_the_final_dot_defers_and_never_falls_back"]),
    # the defects of issue 6, put back
    "probe-on-stale-connection": ("mailgate/lmtppool.py", "            conn.data_sent = False\n            await work(conn)",
                                  "            await work(conn)",
                                  [f"{D}::test_dovecot_restart_with_every_pooled_connection_open_costs_nothing"]),
    "bdat-on-stale-connection": ("mailgate/lmtp.py", "        if self.reader.received != self.consumed:\n",
                                 "        if False:\n",
                                 [f"{D}::test_dovecot_restart_under_an_idle_connection_costs_the_next_message_nothing"]),
    "bdat-refused-left-open": ("mailgate/lmtp.py", "        # Nothing goes further,",
                               "        if chunked:\n            return []\n        # Nothing goes further,",
                               ["tests/test_delivery.py::test_a_transaction_dovecot_refused_leaves_the_connection_fit_for_the_next"]),
    "fallback-bug-not-awaited": ("mailgate/deliver.py", "for i in retry), return_exceptions=True)",
                                 "for i in retry))",
                                 ["tests/unit/test_fallback_writes.py::test_a_bug_in_one_fallback_write_defers_only_its_recipient_once_all_writes_ended"]),
    "uvloop-write-error": ("mailgate/lmtp.py", [
        ("        if self.writer.transport.is_closing():\n"
         '            raise LMTPError("connection closed by Dovecot")\n', ""),
        ("        except RuntimeError as e:", "        except ZeroDivisionError as e:")],
        [f"{D}::test_dovecot_unreachable_defers_then_its_return_costs_nothing"]),
    "port-in-use-traceback": ("mailgate/service.py",
                              'raise cannot_listen(f"listen.{name}", address, e) from None', "raise",
                              [f"{S}::test_port_in_use_is_one_line_naming_the_key_exit_2"]),
    "signals-after-bind": ("mailgate/service.py", [
        ("    for sig in (signal.SIGTERM, signal.SIGINT):\n        loop.add_signal_handler(sig, stop.set)\n",
         ""),
        ("    loop.add_signal_handler(signal.SIGHUP, reload,",
         "    for sig in (signal.SIGTERM, signal.SIGINT):\n        loop.add_signal_handler(sig, stop.set)\n"
         "    loop.add_signal_handler(signal.SIGHUP, reload,")],
        [f"{S}::test_sigterm_as_soon_as_the_port_answers_is_a_clean_stop"]),
    "empty-config-reloaded": ("mailgate/service.py", "found.stat().st_size == 0", "False",
                              [f"{S}::test_broken_config_on_sighup_keeps_the_old_one_and_says_so"]),
    "data-dir-unchecked": ("mailgate/service.py", "    check_data_dir(config.data_dir)\n", "",
                           [f"{S}::test_unwritable_data_dir_is_one_line_exit_2"]),
    "reading-never-pauses": ("mailgate/server.py",
                             "            self.reading_paused = True\n            self.transport.pause_reading()\n",
                             "            self.reading_paused = True\n",
                             ["tests/test_listener.py::test_client_that_never_reads_its_replies_is_not_read_without_bound"]),
    "slowloris-line-deadline-removed": ("mailgate/server.py", "2 * timeout - (now - self.last_line)",
                                        "timeout",
                                        [f"{L}::test_500_slowloris_connections_are_closed_by_the_deadline"]),
}


def run(name: str) -> bool:
    """True when the mutant was killed (its tests failed)."""
    path, *edits, tests = MUTANTS[name]
    edits = edits[0] if len(edits) == 1 else [tuple(edits)]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
        target = tree / path
        text = target.read_text()
        for old, new in edits:
            assert text.count(old) == 1, f"{name}: {old!r} is not in {path} exactly once"
            text = text.replace(old, new)
        target.write_text(text)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *tests], cwd=tree, capture_output=True, text=True, timeout=900)
    killed = done.returncode != 0
    why = [line for line in done.stdout.splitlines() if line.startswith("E ")][:2]
    print(f"{'killed  ' if killed else 'SURVIVED'} {name}: {done.stdout.strip().splitlines()[-1]}",
          *(f"    {line[:150]}" for line in why), sep="\n", flush=True)
    return killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="MUTANT")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(MUTANTS))
        return 0
    unknown = set(args.names) - set(MUTANTS)
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    return sum(not run(name) for name in args.names or MUTANTS)


if __name__ == "__main__":
    sys.exit(main())
