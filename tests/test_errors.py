"""Mistakes a user can make end in one line naming the problem and the fix, exit 2, no traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskstream import cli
from maskstream.errors import UserError, run_command
from maskstream.pipeline import run as pipeline_run

GOLDEN = Path(__file__).parent / "golden" / "sotu-6.jsonl"


@pytest.fixture(autouse=True)
def no_import_hook(monkeypatch):
    # preprocess's main() hides the cloud clients from the rest of the process; not wanted inside pytest
    monkeypatch.setattr(pipeline_run, "unneeded_packages", lambda argv: ())
    monkeypatch.delenv("MASKSTREAM_DEBUG", raising=False)


def refused(capsys, *argv) -> str:
    """Run the CLI in-process; assert exit 2 and one stderr line without a traceback; return that line."""
    assert cli.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def preprocess(tokenizer, output, *flags, inputs=(GOLDEN,)):
    return ["preprocess", *(a for i in inputs for a in ("--input", str(i))), "--tokenizer", str(tokenizer),
            "--output", str(output), "--quiet", "--local-mode", "in_memory", "--num-shards", "2", *map(str, flags)]


@pytest.fixture(scope="module")
def datasets(bert_tokenizer_file, tmp_path_factory):
    """Small datasets of the golden SOTU sample: seq_len 64 and 128, and 64 with another tokenizer file."""
    root = tmp_path_factory.mktemp("errors")
    for seq_len in (64, 128):
        pipeline_run.run(preprocess(bert_tokenizer_file, root / f"ds{seq_len}", "--seq-len", seq_len)[1:])
    other = root / "other-tokenizer.json"     # the same vocabulary written out again: another file, another hash
    other.write_text(json.dumps(json.loads(bert_tokenizer_file.read_text()), indent=1))
    pipeline_run.run(preprocess(other, root / "ds64-other", "--seq-len", 64)[1:])
    return root / "ds64", root / "ds128", root / "ds64-other"


# ---- preprocess: flags, tokenizer, inputs ------------------------------------------------------------------

def test_an_unknown_flag_is_named_with_the_closest_spelling(capsys, bert_tokenizer_file, tmp_path):
    line = refused(capsys, *preprocess(bert_tokenizer_file, tmp_path / "o", "--seqlen", 64, "--mask-probability", 0.3))
    assert line == "maskstream preprocess: unknown flag --seqlen (did you mean --seq-len?)"
    assert not (tmp_path / "o").exists()


def test_beam_flags_pass_the_unknown_flag_check():
    pipeline_run.check_beam_flags(["--runner", "DirectRunner", "--project", "p", "--direct_num_workers", "2",
                                   "--temp_location", "/tmp/t", "--dry_run=True", "--experiments", "x"])
    with pytest.raises(UserError, match=r"unknown flag --direct_num_worker \(did you mean --direct_num_workers\?\)"):
        pipeline_run.check_beam_flags(["--direct_num_worker", "2"])


def test_a_missing_tokenizer_file(capsys, tmp_path):
    line = refused(capsys, *preprocess(tmp_path / "nope.json", tmp_path / "o"))
    assert "nope.json does not exist" in line and "maskstream tokenizer train" in line


def test_a_json_file_that_is_not_a_tokenizer(capsys, tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    line = refused(capsys, *preprocess(tmp_path / "x.json", tmp_path / "o"))
    assert "x.json is not a tokenizers `tokenizer.json`" in line


def test_a_tokenizer_without_a_pad_token_names_only_pad_candidates(capsys, tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[MASK]": 1, "a": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "nopad.json"))
    line = refused(capsys, *preprocess(tmp_path / "nopad.json", tmp_path / "o"))
    assert "no pad token" in line and "[PAD]" in line and "<pad>" in line
    assert "[MASK]" not in line and "<mask>" not in line


def test_an_input_that_does_not_exist(capsys, bert_tokenizer_file, tmp_path):
    line = refused(capsys, *preprocess(bert_tokenizer_file, tmp_path / "o", inputs=[tmp_path / "nope" / "*.jsonl"]))
    assert "matches no file" in line and "quote" not in line


def test_a_glob_without_a_folder_matches_in_the_working_directory(capsys, monkeypatch, tmp_path):
    from maskstream.pipeline.readers import expand_inputs
    (tmp_path / "pg_1.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["pg_*.jsonl"]) == [(str(tmp_path / "pg_1.jsonl"), 14, "pg_1.jsonl")]
    with pytest.raises(UserError, match=f"pg_.*txt matches no file \\(in {tmp_path}\\)"):
        expand_inputs(["pg_*.txt"])


@pytest.mark.parametrize("flag, value, words", [("--seq-len", 2, "seq_len=2"), ("--mask-prob", 1.5, "mask_prob=1.5")])
def test_out_of_range_values(capsys, bert_tokenizer_file, tmp_path, flag, value, words):
    line = refused(capsys, *preprocess(bert_tokenizer_file, tmp_path / "o", flag, value))
    assert words in line and flag in line


# ---- preprocess: the output folder -------------------------------------------------------------------------

def test_output_folder_of_another_dataset_or_foreign_files_is_refused_and_never_deleted(capsys, bert_tokenizer_file,
                                                                                        tmp_path):
    out = tmp_path / "out"
    assert cli.main(preprocess(bert_tokenizer_file, out, "--seq-len", 64)) == 0
    assert cli.main(preprocess(bert_tokenizer_file, out, "--seq-len", 64)) == 0      # a rerun needs no flag
    assert "holds another dataset" in refused(capsys, *preprocess(bert_tokenizer_file, out, "--seq-len", 32))
    assert json.loads((out / "index.json").read_text())["seq_len"] == 64          # untouched
    for stray in ("notes.txt", "shard-000099.tar"):
        (out / stray).write_text("mine")
        line = refused(capsys, *preprocess(bert_tokenizer_file, out, "--seq-len", 64))
        assert f"not this dataset's own ({stray})" in line and "--overwrite" in line
        (out / stray).unlink()
    (out / "notes.txt").write_text("mine")
    assert cli.main(preprocess(bert_tokenizer_file, out, "--seq-len", 32, "--overwrite")) == 0
    assert json.loads((out / "index.json").read_text())["seq_len"] == 32
    assert (out / "notes.txt").read_text() == "mine"                               # kept


# ---- train, evaluate, inspect ------------------------------------------------------------------------------

def train(data, out, *flags):
    return ["train", "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "8", "--device", "cpu",
            "--no-progress", *flags]


@pytest.mark.parametrize("command", ["train", "evaluate", "inspect"])
def test_a_missing_or_non_dataset_folder(capsys, tmp_path, command):
    (tmp_path / "notes").mkdir()
    for data, words in ((tmp_path / "nope", "does not exist"), (tmp_path / "notes", "is not a maskstream dataset")):
        argv = {"train": train(data, tmp_path / "run"), "evaluate": ["evaluate", "--run", tmp_path / "run",
                                                                     "--data", data],
                "inspect": ["inspect", data]}[command]
        if command == "evaluate":   # evaluate first needs a run; without one it says so
            assert "checkpoint" in refused(capsys, *argv)
            continue
        assert words in refused(capsys, *argv)


def test_train_batch_larger_than_the_dataset(capsys, datasets, tmp_path):
    line = refused(capsys, *train(datasets[0], tmp_path / "run", "--batch-size", 100000))
    assert "fewer than one batch" in line and "--batch-size" in line


def test_held_out_data_longer_than_the_model(capsys, datasets, tmp_path):
    ds64, ds128, _ = datasets
    line = refused(capsys, *train(ds64, tmp_path / "run", "--eval-data", ds128))
    assert "128 tokens" in line and "--model-size tiny" in line and "--seq-len 64" in line


def test_held_out_data_of_another_tokenizer_is_refused_naming_both(capsys, datasets, tmp_path):
    ds64, _, other = datasets
    line = refused(capsys, *train(ds64, tmp_path / "run", "--eval-data", other))
    assert "--eval-data" in line and "same --tokenizer" in line and f"--data {ds64}" in line


def test_run_folder_resume_and_evaluate(capsys, datasets, tmp_path):
    ds64, ds128, other = datasets
    run = tmp_path / "run"
    assert "holds no checkpoint" in refused(capsys, *train(ds64, run, "--resume"))
    assert cli.main(list(map(str, train(ds64, run, "--resume", "auto")))) == 0
    assert "--resume auto" in capsys.readouterr().err and list(run.glob("ckpt-*.pt"))
    assert "already holds checkpoints" in refused(capsys, *train(ds64, run))
    line = refused(capsys, "evaluate", "--run", run, "--data", ds128)
    assert "128 tokens" in line and "at most 64" in line
    line = refused(capsys, *train(other, run, "--resume"))
    assert "was made with tokenizer sha256" in line and "the checkpoint" in line
    for flags in (["--data", other], ["--data", ds64, "--baseline-data", other]):
        line = refused(capsys, "evaluate", "--run", run, *flags)
        assert "was made with tokenizer sha256" in line and f"the run {run}" in line


# ---- --debug, and what is not a user error ------------------------------------------------------------------

def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    assert cli.main(list(map(str, train(tmp_path / "nope", tmp_path / "run", "--debug")))) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MASKSTREAM_DEBUG", "1")
    assert cli.main(list(map(str, train(tmp_path / "nope", tmp_path / "run")))) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_internal_error_keeps_its_traceback():
    def bug(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_command("maskstream x", bug, [])
