"""What `hanlin info` reports."""

from __future__ import annotations

from hanlin.config import ModelConfig


def test_info_shows_the_cross_layer_attention_saving() -> None:
    from hanlin.model_info import describe, info_rows

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, cla_share_factor=2)
    rows = dict(info_rows(describe(config, "cla")))
    assert "2 of 4 layers store K/V (CLA ×2)" in rows["KV cache"] and "saves 50%" in rows["KV cache"]
