"""The encoder: shapes, padding never changes real positions, loss only on labelled positions, FLOPs."""
import pytest
import torch

from maskstream.trainer.model import PRESETS, MLMEncoder, ModelConfig, flops_per_token, preset


def tiny(**kw) -> MLMEncoder:
    torch.manual_seed(0)
    return MLMEncoder(preset("tiny", vocab_size=97, max_len=32, **kw)).eval()


def test_logits_have_batch_length_vocab_shape():
    model = tiny()
    ids = torch.randint(5, 97, (3, 16))
    logits, loss = model(ids, torch.ones(3, 16, dtype=torch.bool))
    assert logits.shape == (3, 16, 97) and loss is None


@pytest.mark.slow
def test_padding_does_not_change_outputs_at_real_positions():
    model = tiny()
    real = torch.randint(5, 97, (1, 10))
    padded = torch.cat([real, torch.full((1, 6), 0)], dim=1)  # 6 pads, and junk-free
    junk = torch.cat([real, torch.randint(5, 97, (1, 6))], dim=1)  # different tokens behind the mask
    mask = torch.arange(16)[None] < 10
    out_short, _ = model(real, torch.ones(1, 10, dtype=torch.bool))
    out_pad, _ = model(padded, mask)
    out_junk, _ = model(junk, mask)
    torch.testing.assert_close(out_pad[:, :10], out_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_junk[:, :10], out_short, atol=1e-5, rtol=1e-5)


def test_loss_uses_only_labelled_positions_and_matches_full_logits():
    model = tiny()
    ids = torch.randint(5, 97, (2, 12))
    labels = torch.full((2, 12), -100)
    labels[0, 3], labels[1, 7], labels[1, 9] = 11, 12, 13
    mask = torch.ones(2, 12, dtype=torch.bool)
    picked, loss = model(ids, mask, labels)
    full, _ = model(ids, mask)
    assert picked.shape == (3, 97)
    torch.testing.assert_close(picked, full[labels != -100])
    expected = torch.nn.functional.cross_entropy(full[labels != -100], labels[labels != -100])
    torch.testing.assert_close(loss, expected)


def test_output_embeddings_are_tied_to_input_embeddings():
    model = tiny()
    ids = torch.tensor([[7, 8]])
    labels = torch.tensor([[9, -100]])
    _, loss = model(ids, None, labels)
    loss.backward()
    # the decoder is F.linear with tok_emb.weight: row 9 gets a gradient although token 9 is not an input
    assert model.tok_emb.weight.grad[9].abs().sum() > 0


@pytest.mark.slow
def test_base_preset_is_bert_base_size():
    model = MLMEncoder(preset("base", vocab_size=30522, max_len=512))
    assert 105e6 < model.num_params() < 115e6  # BERT-base: 110M
    assert set(PRESETS) >= {"tiny", "mini", "small", "base"}


def test_config_errors_name_the_bad_value_and_the_fix():
    with pytest.raises(ValueError, match="d_model=100 is not a multiple of n_head=3"):
        ModelConfig(vocab_size=10, d_model=100, n_head=3)
    with pytest.raises(ValueError, match="choose one of"):
        preset("huge", vocab_size=10, max_len=8)


def test_longer_sequence_than_max_len_is_refused():
    with pytest.raises(ValueError, match="exceeds max_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.slow
def test_flops_per_token_is_about_six_times_the_parameters():
    cfg = preset("base", vocab_size=30522, max_len=128)
    n = MLMEncoder(cfg).num_params(non_embedding=True)
    assert 6 * n < flops_per_token(cfg, 128) < 6 * n * 1.5
