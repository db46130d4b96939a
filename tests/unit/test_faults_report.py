"""`bench/faults_report.py`: the table shows the counts and recovery times the fault tests recorded."""
from __future__ import annotations

import json

from bench import faults_report


def _row(nodeid, outcome="passed", properties=None, printed="", doc="What was injected."):
    return {"nodeid": nodeid, "outcome": outcome, "seconds": 12.0, "doc": doc, "printed": printed,
            "properties": properties or {}}


def test_measured_counts_and_recovery_are_shown_and_totalled():
    rows = [_row("tests/faults/test_a.py::test_kill[aof]", properties={"lost": 0, "duplicates": 0, "recovery_s": 8.44},
                 printed="killed at 400 of 1200"),
            _row("tests/faults/test_a.py::test_kill[no_persistence]", properties={"lost": 0, "duplicates": 2,
                                                                                 "recovery_s": 3.0}),
            _row("tests/faults/test_abuse.py::test_junk"),
            _row("tests/faults/test_b.py::test_skew", outcome="skipped"),
            _row("tests/faults/test_b.py::test_broken", outcome="failed", doc="")]
    text = faults_report.render(rows, 120.0, "make faults-report")
    assert "3 of 5 passed in 2.0 min" in text
    assert "| `test_kill[aof]` | passed | 0 | 0 | 8.4 s | killed at 400 of 1200 | 12 s |" in text
    assert "| `test_kill[no_persistence]` | passed | 0 | 2 | 3.0 s | — | 12 s |" in text
    assert "| `test_junk` | passed | 0 (asserted) | 0 (asserted) | — |" in text
    assert "| `test_skew` | skipped | — | — | — |" in text
    assert "| `test_broken` | failed | ? | ? | — |" in text
    assert "Totals: 0 lost and 2 duplicated over the 2 tests that measured both; recovery 3.0–8.4 s" in text
    # each docstring once, below the table, with the tests it describes
    assert text.count("What was injected.") == 1
    assert "- `test_kill`, `test_junk`, `test_skew`: What was injected." in text


def test_from_jsonl_keeps_the_fault_suite_and_fails_on_a_failed_test(tmp_path):
    source = tmp_path / "run.jsonl"
    rows = [_row("tests/unit/test_x.py::test_fast"), _row("tests/faults/test_a.py::test_kill"),
            _row("tests/e2e/test_up_supervisor.py::test_up")]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "faults.md"
    assert faults_report._from_jsonl(source, output) == 0
    text = output.read_text()
    assert "test_kill" in text and "test_up" in text and "test_fast" not in text
    assert "2 of 2 passed, 0.4 min of test time added up" in text
    source.write_text(json.dumps(_row("tests/faults/test_a.py::test_kill", outcome="failed")))
    assert faults_report._from_jsonl(source, output) == 1
    assert faults_report._from_jsonl(tmp_path / "missing.jsonl", output) == 2
