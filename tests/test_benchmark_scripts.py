"""The scripts beside the runner: bk_core.py's report renders the stored results unchanged (the timings
need a GPU; the tables do not), and data_scale.py's phases measure a tiny generated corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_bk_core_report_renders_the_stored_results(tmp_path):
    pytest.importorskip("triton")
    from benchmarks import bk_core

    records = json.loads((RESULTS / "bk_core.json").read_text())
    meta = json.loads((RESULTS / "bk_core_meta.json").read_text())
    bk_core.write_markdown(records, meta, tmp_path / "bk_core.md")
    assert (tmp_path / "bk_core.md").read_text() == (RESULTS / "bk_core.md").read_text()


def test_data_scale_phases_on_a_tiny_corpus(tmp_path):
    from benchmarks import data_scale

    data, cache = tmp_path / "corpus", tmp_path / "cache"
    data_scale.generate(data, n_tokens=100_000, vocab=500)
    cold = data_scale.cold(data, cache)["cold"]
    assert cold["train_tokens"] == 100_000 and cold["token_dtype"] == "uint16" and cold["token_file_mb"] > 0
    result = data_scale.warm_and_load(data, cache, batches=2)
    assert result["warm"]["train_windows"] == (100_000 - 1) // data_scale.SEQ_LEN  # windows of seq_len + 1 tokens
    for workers in (0, 2):
        load = result["load"][f"num_workers={workers}"]
        assert load["tokens_per_s"] == pytest.approx(load["batches_per_s"] * data_scale.BATCH * data_scale.SEQ_LEN)
        assert load["batches_per_s"] > 0 and load["rss_mb"] > 0
