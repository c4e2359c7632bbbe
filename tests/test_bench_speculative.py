"""benchmarks/speculative.py on the tiny model: it runs, pairs settings, and sums up."""

from __future__ import annotations

import json

from benchmarks import speculative


def test_a_round_of_every_workload_with_and_without_drafts(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "spec.json"
    argv = ["--model", str(tiny_gguf), "--rounds", "1", "--max-tokens", "8", "--single", "1"]
    argv += ["--n-ctx", "2048", "--concurrency", "1,2", "--settings", "ngram-fixed"]
    assert speculative.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {
        f"{w} c={c}" for w in ("copy", "code", "story") for c in (1, 2)
    }
    row = report["summary"]["copy c=2"]
    assert row["off_tok_s"] > 0 and row["ngram-fixed_ratio"] > 0
    assert "warning" not in capsys.readouterr().err  # drafts changed no text
