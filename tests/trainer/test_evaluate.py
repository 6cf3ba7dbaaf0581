"""`maskstream evaluate` and `maskstream fill-mask` on a real run folder, and the unigram baseline."""
import json

import pytest
import torch

from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.trainer import evaluate
from maskstream.trainer.train import main as train_main


@pytest.fixture(scope="module")
def run_dir(sotu_split, tmp_path_factory):
    train_dir, _ = sotu_split
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_main(["--data", str(train_dir), "--out", str(out), "--max-steps", "4", "--batch-size", "16",
                       "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_evaluate_prints_loss_accuracy_perplexity_and_the_unigram_baseline(run_dir, sotu_split, capsys):
    train_dir, held_out = sotu_split
    assert evaluate.main(["--run", str(run_dir), "--data", str(held_out), "--baseline-data", str(train_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and result["perplexity"] > 1 and result["predictions"] > 500
    base = result["unigram"]
    assert base["token_id"] == 1996  # "the" in BERT's vocabulary
    assert 0.02 < base["accuracy"] < 0.15 and base["predictions"] == result["predictions"]


def test_unigram_baseline_accuracy_is_the_share_of_the_top_token_among_masked_positions(sotu_split):
    train_dir, held_out = sotu_split
    held = evaluate.eval_loader(str(held_out), batch_size=16)
    base = evaluate.unigram_baseline(MLMLoader(str(train_dir), LoaderConfig(batch_size=16)), held)
    held.set_epoch(0)  # the baseline consumed epoch 0; the fixed evaluation mask is epoch 0's
    labels = torch.cat([b["labels"][b["labels"] != -100] for b in held])
    assert base["accuracy"] == pytest.approx(float((labels == base["token_id"]).float().mean()))


@pytest.mark.slow
def test_fill_mask_prints_top_k_words_for_each_mask(run_dir, capsys):
    assert evaluate.fill_mask_main(["--run", str(run_dir), "--top-k", "3", "the [MASK] of the [MASK]"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "the [MASK] of the [MASK]"
    assert out[1].startswith("  [MASK] 1: ") and out[2].startswith("  [MASK] 2: ")
    assert out[1].count("(") == 3  # three predictions with probabilities
    assert "[CLS]" not in out[1] and "[PAD]" not in out[1]  # special tokens are never predicted


@pytest.mark.slow
def test_fill_mask_without_a_mask_says_how_to_write_one(run_dir):
    with pytest.raises(ValueError, match="write \\[MASK\\]"):
        evaluate.fill_mask_main(["--run", str(run_dir), "no mask here"])


def test_evaluate_without_a_checkpoint_says_to_train_first(tmp_path, sotu_split):
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.main(["--run", str(tmp_path), "--data", str(sotu_split[1])])
