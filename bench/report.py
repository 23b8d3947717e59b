"""BENCHMARKS.md from one run of bench/throughput.py: settings, rates, ratios, profile.

The file is regenerated whole on every run, except the "## Notes" section at its end, which is
carried over so that readings written by hand survive the next run.
"""
from __future__ import annotations

from pathlib import Path
from statistics import median

TARGET_DIRECT, TARGET_POSTFIX = 0.85, 1.3
NOTES = "## Notes"
TOP = 15
LABELS = {"a": "(a) mailgate", "b": "(b) direct", "c": "(c) Postfix"}


def _by_path(runs) -> dict[str, list]:
    return {p: [r for r in runs if r.path == p] for p in "abc"}


def _median_rate(runs) -> float:
    return median(r.rate for r in runs)


def _cpu_ms(run) -> float:
    return 1000 * run.gate_cpu / run.messages


def _met(value: float, target: float) -> str:
    return "**met**" if value >= target else "**missed**"


def header(facts: dict, args) -> list[str]:
    reuse = "`-d` (one connection per session)" if args.reuse else \
        "no `-d`: a new connection per message, as in the recipe baselines"
    return [
        "# Benchmarks", "",
        "Written by `bench/throughput.py` (its docstring says what it measures and why). "
        f"Regenerated whole on each run except `{NOTES}` at the end.", "",
        "## Throughput: mailgate vs Dovecot direct vs Postfix → Dovecot", "",
        f"- date: {facts['date']}",
        f"- machine: {facts['machine']}; maildirs on {facts['filesystem']}",
        f"- versions: mailgate {facts['mailgate']}, Python {facts['python']}, "
        f"uvloop {facts['uvloop']}, Dovecot {facts['dovecot']}, "
        f"Postfix {facts['postfix']}",
        f"- command: `{facts['command']}`", "",
        "Settings:",
        f"- load, the same on all three paths: `smtp-source -s {args.sessions} -m {args.messages} "
        f"-l {args.size} -f bench@client.test -t bench-PATH-ROUND@example.test -M client.test`"
        f"{' -d' if args.reuse else ''} (plus `-L` for (b)); {reuse}; one recipient per message, "
        "a fresh recipient (empty maildir) per run.",
        f"- Dovecot: `mail_fsync = {args.fsync}`"
        f"{' (Dovecot’s default)' if args.fsync == 'optimized' else ' (not Dovecot’s default)'}"
        "; "
        "otherwise the config of `tests/peers.py` (passwd-file userdb, maildir, inet LMTP).",
        "- mailgate: `log.level = \"info\"` as operators run it (3 log lines per message, to a "
        "file), metrics and health listeners on, maildir fallback on, empty filter chain, "
        "`lmtp_connections = 8`, `recipient_cache = 60` (the defaults); uvloop if installed.",
        "- Postfix: `tests/peers.py` config, `virtual_transport = lmtp:inet:127.0.0.1:DOVECOT`.",
        "- timing: from the start of smtp-source until it exited **and** all messages were in the "
        "maildir (for (c) that is time to delivery, not to 250). Paths alternate in each round, "
        f"order rotated; before the rounds, {args.warmup} warm-up messages per path (not "
        "counted); between runs, Postfix's queue empty, a 1 s pause, and up to 120 s for the "
        "cores to fall below 10 % busy.", "",
    ]


def results_table(runs) -> list[str]:
    by = _by_path(runs)
    lines = ["### Results (msg/s)", "",
             "| round | order | (a) mailgate | (b) direct | (c) Postfix | a/b | a/c "
             "| mailgate CPU ms/msg | others' load a/b/c |", "|---" * 9 + "|"]
    for a, b, c in zip(by["a"], by["b"], by["c"]):
        others = "/".join(f"{r.others:.0%}" for r in (a, b, c))
        tries = f" ({a.attempt} tries)" if a.attempt > 1 else ""
        lines.append(f"| {a.round}{tries} | {a.order} | {a.rate:.0f} | {b.rate:.0f} | {c.rate:.0f} "
                     f"| {a.rate / b.rate:.2f} | {a.rate / c.rate:.2f} | {_cpu_ms(a):.2f} "
                     f"| {others} |")
    ra, rb, rc = (_median_rate(by[p]) for p in "abc")
    lines.append(f"| **median** | | **{ra:.0f}** | **{rb:.0f}** | **{rc:.0f}** "
                 f"| **{ra / rb:.2f}** | **{ra / rc:.2f}** "
                 f"| **{median(_cpu_ms(r) for r in by['a']):.2f}** | |")
    return lines + ["", "Others' load: share of both cores busy with processes this benchmark "
                    "did not start (the machine is shared). A round in which it passed 15 % in "
                    "any run was measured again, up to 3 tries; the table shows the last.", ""]


def _machine_ms(run) -> float:
    return 1000 * run.machine_cpu / run.messages


def cpu_lines(by: dict[str, list]) -> list[str]:
    """mailgate's own CPU, and every process's CPU per message: the budget on a busy box."""
    gate = by["a"]
    user = median(1000 * r.gate_user / r.messages for r in gate)
    system = median(1000 * r.gate_sys / r.messages for r in gate)
    busy = {p: median(r.busy for r in by[p]) for p in "abc"}
    whole = {p: median(_machine_ms(r) for r in by[p]) for p in "abc"}
    allowed = whole["b"] * (1 / TARGET_DIRECT - 1)
    return [
        f"- mailgate CPU: {median(_cpu_ms(r) for r in gate):.2f} ms per message (median; "
        f"rounds: {', '.join(f'{_cpu_ms(r):.2f}' for r in gate)}), of which user {user:.2f}, "
        f"system {system:.2f} (all threads, from /proc/PID/stat).",
        f"- all processes' CPU per message (from /proc/stat): (a) {whole['a']:.2f} ms, "
        f"(b) {whole['b']:.2f} ms, (c) {whole['c']:.2f} ms; cores busy (a) {busy['a']:.0%}, "
        f"(b) {busy['b']:.0%}, (c) {busy['c']:.0%}. Where the cores are saturated, "
        f"{TARGET_DIRECT} × direct leaves mailgate's path about {allowed:.2f} ms per message "
        f"more than (b); it used {whole['a'] - whole['b']:.2f} ms more.",
    ]


def targets(runs, rss_kib: int, relays: dict[str, int]) -> list[str]:
    by = _by_path(runs)
    ra, rb, rc = (_median_rate(by[p]) for p in "abc")
    accepted = median(r.messages / r.source_seconds for r in by["c"])
    paired_b = median(a.rate / b.rate for a, b in zip(by["a"], by["b"]))
    paired_c = median(a.rate / c.rate for a, c in zip(by["a"], by["c"]))
    return [
        "### Against the targets", "",
        "| ratio | of the medians | median of the per-round ratios | target | |",
        "|---|---|---|---|---|",
        f"| mailgate / direct | {ra / rb:.2f} | {paired_b:.2f} | ≥ {TARGET_DIRECT} "
        f"| {_met(ra / rb, TARGET_DIRECT)} |",
        f"| mailgate / Postfix→Dovecot | {ra / rc:.2f} | {paired_c:.2f} | ≥ {TARGET_POSTFIX} "
        f"| {_met(ra / rc, TARGET_POSTFIX)} |", "",
        "(met/missed judges the ratio of the medians; where the two columns disagree the "
        "rounds disagreed too, and the run says little either way.)", "",
        *cpu_lines(by),
        f"- mailgate peak RSS (VmHWM) after all runs: {rss_kib / 1024:.1f} MiB.",
        f"- (c) Postfix answered 250 to all at a median {accepted:.0f} msg/s; delivered at "
        f"{rc:.0f} msg/s.",
        f"- mailgate delivered {relays['dovecot']} messages via Dovecot LMTP and "
        f"{relays['maildir']} via the maildir fallback (warm-up and profile runs included).", "",
    ]


def _pct(samples: int, total: int) -> str:
    return f"{100 * samples / total:.1f}"


def profile_intro(prof: dict) -> list[str]:
    run, total = prof["run"], prof["samples"]
    alone = ("mailgate had one CPU to itself (our other processes on the other), so a sample "
             "is CPU time, not waiting to be scheduled; the run is slower than the measured ones"
             if prof["alone"] else
             "mailgate shared the CPUs: samples include time it was runnable but preempted")
    return [f"py-spy record --gil ({prof['rate']} Hz; a sample counts when a mailgate thread "
            "holds the GIL, so waits in epoll/select, which release it, are not counted) during "
            f"one more (a) run: {run.messages} messages at {run.rate:.0f} msg/s; {alone}. "
            f"{total} samples; /proc says mailgate used {_cpu_ms(run):.2f} ms of CPU per message "
            "in that run, and the ms/msg columns share that out by samples. Own = the function "
            "itself with the C it calls (uvloop, syscalls, re); incl = with everything it called.",
            ""]


def profile_section(prof: dict | None) -> list[str]:
    lines = ["## Where the time goes", ""]
    if prof is None:
        return lines + ["Not profiled in this run (`--profile` adds it).", ""]
    total, per_msg = prof["samples"] or 1, _cpu_ms(prof["run"])
    ms = lambda n: f"{per_msg * n / total:.3f}"  # noqa: E731
    lines += profile_intro(prof)
    lines += ["By component (own time):", "", "| component | own % | ms/msg |", "|---|---|---|"]
    for name, n in prof["components"].most_common():
        lines.append(f"| {name} | {_pct(n, total)} | {ms(n)} |")
    lines += ["", f"Top {TOP} functions by own time:", "",
              "| # | function (file:first line) | own % | incl % | own ms/msg |",
              "|---|---|---|---|---|"]
    for i, (frame, n) in enumerate(prof["own"].most_common(TOP), 1):
        lines.append(f"| {i} | `{frame}` | {_pct(n, total)} "
                     f"| {_pct(prof['inclusive'][frame], total)} | {ms(n)} |")
    inner = [(f, n) for f, n in prof["inclusive"].most_common() if n < 0.9 * total][:TOP]
    lines += ["", f"Top {TOP} by inclusive time (below the event loop's root frames):", "",
              "| function | incl % | ms/msg |", "|---|---|---|"]
    lines += [f"| `{f}` | {_pct(n, total)} | {ms(n)} |" for f, n in inner]
    return lines + [""]


# Sections other scripts write (bench/auth.py, bench/sync_feed.py), kept with the notes when
# this one rewrites.
KEPT = ("## Auth filter", "## SES feed", NOTES)


def kept_notes(path: Path) -> list[str]:
    text = path.read_text() if path.exists() else ""
    at = min((i for i in (text.find("\n" + k) for k in KEPT) if i >= 0), default=-1)
    if at < 0:
        return [NOTES, "", "Readings and caveats written by hand; kept across runs.", ""]
    return [text[at + 1:].rstrip("\n"), ""]


def render(facts: dict, args, runs, rss_kib: int, relays: dict[str, int], prof: dict | None,
           path: Path) -> str:
    lines = header(facts, args) + results_table(runs) + targets(runs, rss_kib, relays)
    lines += profile_section(prof) + kept_notes(path)
    return "\n".join(lines)
