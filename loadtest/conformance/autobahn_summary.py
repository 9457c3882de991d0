#!/usr/bin/env python3
"""Summarise an Autobahn|Testsuite fuzzingclient report (index.json).

    autobahn_summary.py [--expected expected-cases.json] [--agent NAME] [index.json]

Prints, per agent, the number of cases per behavior (OK, NON-STRICT, INFORMATIONAL,
UNIMPLEMENTED, FAILED) for each case group and in total, then lists every case that is not OK.

Exit status:
  0  every expected case in groups 1-10 ran and none FAILED
  1  a case in groups 1-10 FAILED (behavior or close behavior), or an expected case is missing
  2  the report (or the expected list) cannot be read (a report that does not exist while an
     expected list does counts as every case missing: 1)

NON-STRICT, INFORMATIONAL and UNIMPLEMENTED do not fail the run: NON-STRICT means a legal but
lax reaction (e.g. failing a connection on invalid UTF-8 only at the end of a message),
INFORMATIONAL cases have no verdict, UNIMPLEMENTED is for extensions we do not negotiate.
A close behavior (behaviorClose) of FAILED counts as FAILED: a wrong closing handshake is a
conformance failure even when the data exchange was right.

--expected is the list of case ids the run was meant to cover, written by autobahn.sh from
Autobahn's own case table. Without it, a case that never ran cannot be noticed; by default
expected-cases.json next to index.json is used when present.
"""

import argparse
import json
import os
import sys
from collections import Counter

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
GATED_GROUPS = set(range(1, 11))


def case_key(case_id):
    """'9.10.2' -> (9, 10, 2), for numeric ordering."""
    try:
        return tuple(int(p) for p in case_id.split("."))
    except ValueError:
        return (sys.maxsize, case_id)


def group(case_id):
    return case_key(case_id)[0]


def verdict(result):
    """A case's verdict: its behavior, or FAILED when the closing handshake failed."""
    behavior = result.get("behavior", "FAILED")
    if result.get("behaviorClose") == "FAILED" and behavior != "FAILED":
        return "FAILED"
    return behavior


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        print(f"autobahn_summary: no {what} at {path} (did wstest run to the end?)", file=sys.stderr)
    except (OSError, json.JSONDecodeError) as e:
        print(f"autobahn_summary: cannot read {what} {path}: {e}", file=sys.stderr)
    sys.exit(2)


def failure_reason(report_dir, result):
    """One line from the per-case report explaining a FAILED verdict, or ''."""
    name = result.get("reportfile")
    if not name:
        return ""
    try:
        with open(os.path.join(report_dir, name)) as f:
            case = json.load(f)
    except (OSError, json.JSONDecodeError):
        return ""
    if case.get("httpResponse") in (None, "", "?"):
        return "opening handshake never completed: " + str(case.get("wasNotCleanReason"))
    bad = case.get("resultClose") if case.get("behaviorClose") == "FAILED" else case.get("result")
    return " ".join(str(bad or "").split())[:160]


def summarise(agent, results, expected, report_dir):
    """Prints the tables for one agent; returns the number of gating problems."""
    missing = sorted((set(expected) - set(results)), key=case_key) if expected else []
    verdicts = {cid: verdict(r) for cid, r in results.items()}

    groups = sorted({group(c) for c in verdicts} | {group(c) for c in missing})
    width = max(len(b) for b in BEHAVIORS + ["MISSING"])
    print(f"\nAutobahn|Testsuite results for agent {agent!r}: {len(results)} cases")
    header = f"{'group':>6} " + " ".join(f"{b:>{width}}" for b in BEHAVIORS + ["MISSING"])
    print(header)
    print("-" * len(header))
    total = Counter()
    for g in groups:
        counts = Counter(v for c, v in verdicts.items() if group(c) == g)
        counts["MISSING"] = sum(1 for c in missing if group(c) == g)
        total.update(counts)
        print(f"{g:>6} " + " ".join(f"{counts[b]:>{width}}" for b in BEHAVIORS + ["MISSING"]))
    print("-" * len(header))
    print(f"{'total':>6} " + " ".join(f"{total[b]:>{width}}" for b in BEHAVIORS + ["MISSING"]))
    other = sorted(set(total) - set(BEHAVIORS) - {"MISSING"})
    if other:
        print("other behaviors: " + ", ".join(f"{b}={total[b]}" for b in other))

    not_ok = sorted((c for c, v in verdicts.items() if v != "OK"), key=case_key)
    if not_ok:
        print("\nnot OK:")
        for c in not_ok:
            r = results[c]
            print(f"  {c:<10} {verdicts[c]:<14} behavior={r.get('behavior')} "
                  f"close={r.get('behaviorClose')} remoteCloseCode={r.get('remoteCloseCode')} "
                  f"report={r.get('reportfile')}")
            if verdicts[c] == "FAILED":
                reason = failure_reason(report_dir, r)
                if reason:
                    print(f"  {'':<10} {reason}")
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        print(f"\nmissing ({len(missing)}): {shown}")

    failed = [c for c in not_ok if verdicts[c] == "FAILED" and group(c) in GATED_GROUPS]
    missing_gated = [c for c in missing if group(c) in GATED_GROUPS]
    return len(failed) + len(missing_gated)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", nargs="?", default="target/autobahn/index.json")
    ap.add_argument("--expected", help="expected-cases.json written by autobahn.sh")
    ap.add_argument("--agent", help="only this agent (default: every agent in the report)")
    args = ap.parse_args()

    expected_path = args.expected
    if expected_path is None:
        candidate = os.path.join(os.path.dirname(args.index) or ".", "expected-cases.json")
        expected_path = candidate if os.path.exists(candidate) else None
    expected = load_json(expected_path, "expected case list") if expected_path else None

    if expected is not None and not os.path.exists(args.index):
        # wstest died or timed out before writing its report: every expected case is missing.
        print(f"autobahn_summary: no report at {args.index}: wstest did not finish",
              file=sys.stderr)
        index = {}
    else:
        index = load_json(args.index, "report")
    agents = [args.agent] if args.agent else sorted(index)
    if expected and expected.get("agent") and expected["agent"] not in agents:
        agents.append(expected["agent"])
    if not agents:
        print("autobahn_summary: the report names no agent: no case ran", file=sys.stderr)
        return 1
    if expected is None:
        print("autobahn_summary: no expected case list: cases that never ran go unnoticed",
              file=sys.stderr)

    problems = 0
    for agent in agents:
        results = index.get(agent, {})
        wanted = expected["cases"] if expected and expected.get("agent") in (None, agent) else None
        if not results and not wanted:
            print(f"autobahn_summary: no results for agent {agent!r}", file=sys.stderr)
            problems += 1
            continue
        problems += summarise(agent, results, wanted, os.path.dirname(args.index) or ".")

    print("\nverdict: " + ("PASS" if problems == 0 else f"FAIL ({problems} failed or missing case(s) in 1-10)"))
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
