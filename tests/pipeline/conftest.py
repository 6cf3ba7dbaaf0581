"""Fixtures of the pipeline tests: small real corpora, a trained tokenizer, and one shared SOTU run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import changed, write_sotu_subset
from helpers import sotu_texts as read_sotu_texts

from maskstream.pipeline import run as pipeline_run

SOTU_SUBSET_DOCS = 12     # small enough for several Beam runs in a few seconds


def run_job(inputs, tokenizer, output, *flags) -> dict:
    """Run the job like the CLI does; returns the index it wrote."""
    argv = [*(a for i in inputs for a in ("--input", str(i))), "--tokenizer", str(tokenizer),
            "--output", str(output), "--quiet", *map(str, flags)]
    return pipeline_run.run(argv)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def job():
    """run_job(inputs, tokenizer, output, *flags) -> index."""
    return run_job


@pytest.fixture(scope="session")
def hashes():
    """file_hashes(folder) -> {relative path: sha256}."""
    return file_hashes


@pytest.fixture(scope="session")
def bert_json(bert_tokenizer_file) -> Path:
    return bert_tokenizer_file


@pytest.fixture(scope="session")
def sotu_subset(sotu_file, tmp_path_factory) -> Path:
    """The first SOTU_SUBSET_DOCS addresses as plain JSONL."""
    return write_sotu_subset(tmp_path_factory.mktemp("sotu") / "sotu-subset.jsonl", SOTU_SUBSET_DOCS)


@pytest.fixture(scope="session")
def sotu_texts() -> list[str]:
    return read_sotu_texts()


@pytest.fixture(scope="session")
def sotu_run(sotu_file, bert_json, tmp_path_factory):
    """The full SOTU corpus through the local runner's multi-process mode (2 workers), shared by tests.

    Returns (output folder, index, file hashes right after the run)."""
    out = tmp_path_factory.mktemp("sotu-run") / "out"
    index = run_job([sotu_file], bert_json, out, "--local-mode", "multi_processing", "--direct_num_workers", 2,
                    "--num-shards", 4)
    return out, index, file_hashes(out)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """Twelve SOTU addresses in one file; in another, an exact copy (case and spacing changed), a near copy
    (2% of the words changed) and a verbatim copy of one of them."""
    folder = tmp_path_factory.mktemp("planted")
    texts = read_sotu_texts()[:12]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    copies = ["  " + texts[3].upper(), changed(texts[5], 0.02, seed=1), texts[3]]
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in copies))
    return [folder / "a.jsonl", folder / "b.jsonl"]
