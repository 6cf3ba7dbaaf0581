"""Rotary position embeddings: scores depend only on the offset, padding stays invisible, no position table."""
import torch

from maskstream.trainer.model import MLMEncoder, ModelConfig, apply_rotary, preset, rotary_tables


def test_rotary_scores_depend_only_on_the_relative_offset():
    cos, sin = rotary_tables(16, 40, 10000.0)
    q, k = torch.randn(2, 1, 1, 16).unbind(0)

    def score(i: int, j: int) -> float:
        return (apply_rotary(q, cos[i], sin[i]) * apply_rotary(k, cos[j], sin[j])).sum().item()

    assert abs(score(3, 5) - score(30, 32)) < 1e-4
    assert abs(score(3, 5) - score(3, 9)) > 1e-3


def test_rope_model_has_no_position_table_and_keeps_padding_invisible():
    torch.manual_seed(0)
    model = MLMEncoder(preset("tiny", vocab_size=97, max_len=32, rope=True)).eval()
    assert model.pos_emb is None and not any("rope" in k for k in model.state_dict())
    real = torch.randint(5, 97, (1, 10))
    junk = torch.cat([real, torch.randint(5, 97, (1, 6))], dim=1)
    out_short, _ = model(real, torch.ones(1, 10, dtype=torch.bool))
    out_junk, _ = model(junk, torch.arange(16)[None] < 10)
    torch.testing.assert_close(out_junk[:, :10], out_short, atol=1e-5, rtol=1e-5)


def test_configs_saved_before_rope_existed_still_load():
    d = preset("tiny", vocab_size=97, max_len=32).to_dict()
    d.pop("rope"), d.pop("rope_base")
    assert ModelConfig.from_dict(d).rope is False
