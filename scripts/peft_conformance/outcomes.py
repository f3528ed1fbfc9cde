"""Read the junit XML of a PEFT-suite run and judge it (used by scripts/peft_conformance.sh).

    outcomes.py compare BASELINE EXPECTED_FAILURES RUN.xml   exit 1 on an unexpected outcome
    outcomes.py baseline RUN.xml BASELINE                    write BASELINE from a run on real PEFT

BASELINE holds one ``<outcome> <test id>`` line per test of the selection, as real PEFT ran it
(``passed``, ``skipped`` or ``failed``). EXPECTED_FAILURES lists the tests that pass on PEFT and fail on
lntune on purpose: ``reason: <why>`` lines, each followed by the ids it explains.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOME_OF_TAG = {"failure": "failed", "error": "failed", "skipped": "skipped"}


def read_run(path: str) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}`` from a junit XML file."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in OUTCOME_OF_TAG:
                outcome = OUTCOME_OF_TAG[child.tag]
                message = " ".join((child.get("message") or "").split())[:300]
                break
        results[test_id] = (outcome, message)
    return results


def read_baseline(path: str) -> dict[str, str]:
    baseline = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            outcome, _, test_id = line.partition(" ")
            if outcome not in ("passed", "skipped", "failed") or not test_id:
                sys.exit(f"{path}:{number}: expected '<passed|skipped|failed> <test id>', got {line!r}")
            baseline[test_id] = outcome
    return baseline


def read_expected_failures(path: str) -> dict[str, str]:
    """``{test id: reason}``; every id must follow a ``reason:`` line."""
    expected, reason = {}, None
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("reason:"):
            reason = line.removeprefix("reason:").strip()
        elif reason is None:
            sys.exit(f"{path}:{number}: a test id before any 'reason:' line")
        else:
            expected[line] = reason
    return expected


def compare(baseline_path: str, expected_path: str, run_path: str) -> int:
    baseline = read_baseline(baseline_path)
    expected = read_expected_failures(expected_path)
    run = read_run(run_path)
    required = [t for t, outcome in baseline.items() if outcome == "passed"]
    failing = [t for t in required if run.get(t, ("not run", ""))[0] != "passed"]
    unexpected = [t for t in failing if t not in expected]
    now_passing = [t for t in expected if run.get(t, ("not run", ""))[0] == "passed"]
    stale = [t for t in expected if baseline.get(t) != "passed"]
    not_run = [t for t in baseline if t not in run]
    new = [t for t in run if t not in baseline]

    print(f"{len(run)} tests run; {len(required)} of the {len(baseline)} in the baseline pass on PEFT itself.")
    print(f"Of those {len(required)}, on lntune: {len(required) - len(failing)} pass, {len(failing)} do not:")
    print(f"  {len(failing) - len(unexpected)} deliberate (documented), {len(unexpected)} unexpected.")
    problems = [
        ("fail on lntune, pass on PEFT, and are not listed in the expected failures", unexpected),
        ("are listed as expected failures but pass now: remove them from the list", now_passing),
        ("are listed as expected failures but do not pass on PEFT: remove them from the list", stale),
        ("are in the baseline but were not run (stale baseline? rerun with --against-peft)", not_run),
        ("were run but are not in the baseline (stale baseline? rerun with --against-peft)", new),
    ]
    for what, tests in problems:
        if tests:
            print(f"\n{len(tests)} tests {what}:")
            for test_id in tests:
                outcome, message = run.get(test_id, ("not run", ""))
                print(f"  {outcome:>7} {test_id}" + (f"\n          {message}" if message else ""))
    failed = any(tests for _, tests in problems)
    print("\nPEFT conformance: " + ("FAILED" if failed else "OK (only documented differences fail)"))
    return 1 if failed else 0


def write_baseline(run_path: str, baseline_path: str) -> int:
    run = read_run(run_path)
    lines = [f"{outcome} {test_id}" for test_id, (outcome, _) in sorted(run.items())]
    header = "# PEFT's LN-tuning selection run on real PEFT (scripts/peft_conformance.sh --against-peft)\n"
    Path(baseline_path).write_text(header + "\n".join(lines) + "\n")
    counts = {o: sum(1 for _, (out, _) in run.items() if out == o) for o in ("passed", "skipped", "failed")}
    print(f"wrote {baseline_path}: {counts}")
    return 0


if __name__ == "__main__":
    command, *paths = sys.argv[1:] or [""]
    if command == "compare" and len(paths) == 3:
        sys.exit(compare(*paths))
    if command == "baseline" and len(paths) == 2:
        sys.exit(write_baseline(*paths))
    sys.exit(__doc__)
