"""`bitune-jax bench --quick` runs and emits valid JSON lines (numbers are not asserted)."""
import json

import pytest

from bitune_jax import cli


def test_step_flops_by_hand():
    """The formula's terms for a tiny config, computed by hand."""
    from bitune_jax.apps.bench import step_flops
    from bitune_jax.model.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=2)
    f = step_flops(cfg, "bitune", batch=3, prompt=5, answer=2, rank=1)
    tokens = 3 * (2 * 4 + 2)  # two prompt streams over P-1 = 4 tokens, plus 2 answer tokens, 3 examples
    n_lin = 2 * (4 * 4 + 4 * 2 + 4 * 2 + 4 * 4 + 3 * 4 * 6)  # q, k, v, o, gate, up, down per layer
    assert f["tokens"] == tokens and f["base_projections"] == 4 * n_lin * tokens
    assert f["attention"] == 12 * 2 * 3 * 2 * 2 * (2 * 4 * 4 + 2 * (4 + 2))
    assert f["lora"] == 6 * 2 * 1 * (8 + 6 + 6 + 8 + 3 * 10) * tokens
    assert f["unembedding"] == 4 * 3 * 2 * 4 * 10
    assert step_flops(cfg, "lora", batch=3, prompt=5, answer=2, rank=1)["tokens"] == 3 * (4 + 2)


@pytest.mark.slow
def test_bench_quick_emits_json(capsys):
    assert cli.main(["bench", "--quick", "--steps", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = {r["bench"] for r in rows}
    assert kinds == {"train_step", "train_step_ratio", "mc_eval", "decode"}
    train = [r for r in rows if r["bench"] == "train_step"]
    assert {r["variant"] for r in train} == {"lora", "bitune"}
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and "peak_bytes_compiled" in r for r in train)
    assert all(r["matmul_flops_per_s"] > 0 and 0 < r["fraction_of_matmul_rate"] for r in train)
    ratio = [r for r in rows if r["bench"] == "train_step_ratio"]
    assert all("token_ratio" in r and "bitune_over_lora" in r for r in ratio)
    assert all("shared_questions_per_s" in r for r in rows if r["bench"] == "mc_eval")
    assert all("decode_ratio_bitune_over_lora" in r for r in rows if r["bench"] == "decode")
