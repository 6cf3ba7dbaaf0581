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
def test_evaluate_prints_a_table_or_json_with_the_unigram_baseline_as_text(run_dir, sotu_split, capsys):
    train_dir, held_out = sotu_split
    flags = ["--run", str(run_dir), "--data", str(held_out), "--baseline-data", str(train_dir)]
    assert evaluate.main([*flags, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and result["perplexity"] > 1 and result["predictions"] > 500
    base = result["unigram"]
    assert base["token_id"] == 1996 and base["token"] == "the"  # the most frequent token, as text
    assert 0.02 < base["accuracy"] < 0.15 and base["predictions"] == result["predictions"]
    assert evaluate.main(flags) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"held-out masked-token prediction on {held_out} ({result['predictions']:,} masked")
    assert table[1].split() == ["accuracy", "MLM", "loss", "perplexity"]
    assert table[2].split()[:3] == ["unigram", "baseline", "('the')"]
    assert table[2].split()[3] == f"{base['accuracy']:.1%}"
    assert table[3].startswith("  tiny encoder, 4 steps") and table[3].split()[-3] == f"{result['accuracy']:.1%}"


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


def test_fill_mask_on_byte_level_bpe_answers_in_text_under_its_own_mask_token():
    from pathlib import Path

    from maskstream.pipeline.tokenizer import convert_gpt2
    from maskstream.trainer.model import MLMEncoder, preset
    data = Path(__file__).resolve().parents[2] / "data" / "tokenizers"
    tok = convert_gpt2(str(data / "gpt2-vocab.json"), str(data / "gpt2-merges.txt"))
    vocab = {"mask_id": tok.token_to_id("<mask>"), "special_ids": [tok.token_to_id(t) for t in
                                                                 ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]}
    torch.manual_seed(0)
    model = MLMEncoder(preset("tiny", vocab_size=tok.get_vocab_size(), max_len=32)).eval()
    for text in ("the united [MASK] of america", "the united <mask> of america"):   # either spelling
        (predictions,) = evaluate.fill_mask(model, tok, vocab, text, top_k=20)
        words = [w for w, _ in predictions]
        assert len(words) == 20 and not any(set(w) & set("ĠĊ") for w in words), words
        raw = _raw(tok, model, vocab, text)   # the same ranking, as raw byte-level pieces ('Ġstates')
        assert words == [tok.decode([tok.token_to_id(t)]).strip() for t in raw] and words != raw
    out = evaluate.format_predictions("the united <mask> of america", [predictions], "<mask>")
    assert out.splitlines()[1].startswith("  <mask> 1: ")


def _raw(tok, model, vocab, text):
    """The top-20 raw token strings fill_mask ranks (for comparing with its decoded words)."""
    ids = tok.encode(text.replace("[MASK]", "<mask>")).ids
    x = torch.tensor([ids])
    logits, _ = model(x, torch.ones_like(x, dtype=torch.bool))
    probs = logits[0, ids.index(vocab["mask_id"])].softmax(-1)
    probs[vocab["special_ids"]] = 0
    return [tok.id_to_token(int(i)) for i in probs.topk(20).indices]
