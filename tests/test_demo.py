"""`maskstream demo --quick` end to end: tokenizer, Beam job, training, evaluation and fill-mask."""
import json

import pytest

from maskstream.workflows import demo


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain_and_reports_against_the_unigram_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # any working folder: the demo finds the bundled corpus itself
    assert demo.main(["--quick", "--out", "demo"]) == 0
    out = capsys.readouterr().out
    assert "unigram baseline" in out and "tiny encoder" in out and "fill-mask" in out
    assert "curation: " in out and "quality rejects 0" in out     # SOTU passes Gopher's rules
    run = tmp_path / "demo" / "run"
    figures = json.loads((run / "demo.json").read_text())
    assert figures["model"]["predictions"] == figures["unigram"]["predictions"] > 0
    assert (run / "loss.png").is_file() and (run / "tokenizer.json").is_file()
    for name in ("train", "held_out"):
        index = json.loads((tmp_path / "demo" / "shards" / name / "index.json").read_text())
        assert index["counts"]["documents_written"] > 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]  # it learns
