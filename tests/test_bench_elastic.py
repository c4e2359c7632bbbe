"""benchmarks/elastic.py on the tiny model: it runs every phase and pairs the pools."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import elastic


def test_a_round_at_each_level_with_elastic_threads_on_and_off(tiny_gguf, capsys):
    argv = ["--model", str(tiny_gguf), "--rounds", "1", "--single", "1", "--joins", "1"]
    argv += ["--max-tokens", "8", "--n-ctx", "512", "--levels", "2,3", "--llama-server", ""]
    assert elastic.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["elastic_vs_fixed"]) == {"single", "c2", "c3"}
    for pool in ("pool-elastic", "pool-fixed"):
        assert set(report[pool]) == {"single", "c2", "c3", "join_ttft_ms"}
        assert all(phase["median"] > 0 for phase in report[pool].values())
    assert "llama-server" not in report


@pytest.mark.parametrize("text", ["8,x", "", "0,8", "-1"])
def test_levels_must_be_counts(text):
    with pytest.raises(argparse.ArgumentTypeError, match="count"):
        elastic._levels(text)
