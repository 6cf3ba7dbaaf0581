"""The Python API: maskstream.preprocess and maskstream.train_tokenizer take the CLI's flags in snake_case,
validate them as the CLI does (raising instead of exiting), and return the run's summary."""
import hashlib
import json
import subprocess
import sys

import pytest
from helpers import ROOT, TOKENIZER, write_sotu_subset

import maskstream
from maskstream.api import UnknownOption
from maskstream.errors import UserError
from maskstream.pipeline import run as pipeline_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sotu_subset(tmp_path_factory.mktemp("api") / "sotu3.jsonl", 3)


def test_the_api_is_lazy_import_maskstream_and_its_functions_load_neither_torch_nor_beam():
    probe = ("import sys, maskstream; maskstream.preprocess, maskstream.train_tokenizer; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'apache_beam'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_option_is_refused_with_the_closest_spelling_before_anything_runs(corpus, tmp_path):
    with pytest.raises(UnknownOption, match=r"seqlen=64; did you mean seq_len=\?") as info:
        maskstream.preprocess(corpus, TOKENIZER, tmp_path / "out", seqlen=64)
    assert isinstance(info.value, TypeError) and isinstance(info.value, UserError)
    with pytest.raises(UnknownOption, match="did you mean vocab_size="):
        maskstream.train_tokenizer(corpus, tmp_path / "tok.json", vocab_sise=300)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tok.json").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"seq_len": "x"}, "invalid int value: 'x'"),                      # argparse's own check
    ({"mask_prob": 1.5}, r"mask_prob=1.5 must be in \(0, 1\)"),        # the config's check
    ({"whole_word": 1}, "pass True or False"),
    ({"whole_word": True, "selection": "span"}, "contradicts --selection span"),
    ({"packing": "docs"}, "invalid choice: 'docs'"),
    ({"beam_options": ["--runnr=DirectRunner"]}, r"unknown flag --runnr \(did you mean --runner\?\)"),
    ({"beam_options": "--runner=DirectRunner"}, "pass a list of flags"),
])
def test_a_bad_value_raises_the_clis_message_as_a_user_error_never_exits(corpus, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        maskstream.preprocess(corpus, TOKENIZER, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_returns_the_saved_tokenizers_facts(corpus, tmp_path):
    summary = maskstream.train_tokenizer([corpus], tmp_path / "tok.json", vocab_size=300, kind="bpe",
                                         sample_bytes=0)
    text = (tmp_path / "tok.json").read_bytes()
    assert summary.path == str(tmp_path / "tok.json") and summary.sha256 == hashlib.sha256(text).hexdigest()
    assert (summary.kind, summary.vocab_size, summary.cls_id, summary.pad_id, summary.sep_id, summary.mask_id) == \
        ("bpe", 300, 0, 1, 2, 4)
    with pytest.raises(UserError, match="required: --vocab-size"):
        maskstream.train_tokenizer(corpus, tmp_path / "other.json")
    with pytest.raises(UserError, match="--vocab-size 50 is too small"):
        maskstream.train_tokenizer(corpus, tmp_path / "other.json", vocab_size=50)


@pytest.mark.slow
def test_preprocess_writes_what_the_cli_writes_and_returns_its_summary(corpus, tmp_path):
    summary = maskstream.preprocess(corpus, TOKENIZER, tmp_path / "api", seq_len=64, packing="doc",
                                    whole_word=True, num_shards=2, seed=5, quiet=True,
                                    beam_options={"direct_num_workers": 1})
    pipeline_run.run(["--input", str(corpus), "--tokenizer", str(TOKENIZER), "--output", str(tmp_path / "cli"),
                      "--seq-len", "64", "--packing", "doc", "--whole-word", "--num-shards", "2", "--seed", "5",
                      "--quiet", "--direct_num_workers=1"])
    index = json.loads((tmp_path / "api" / "index.json").read_text())
    assert summary.index == index and summary.index_path == str(tmp_path / "api" / "index.json")
    assert summary.seq_len == 64 and summary.counts["documents_written"] == 3 and summary.counts["sequences"] > 0
    assert summary.shards == tuple(str(tmp_path / "api" / s["name"]) for s in index["shards"])
    cli = json.loads((tmp_path / "cli" / "index.json").read_text())
    assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in cli["shards"]]   # the same job
    assert index["masking"] == cli["masking"] and index["packing"] == "doc"
