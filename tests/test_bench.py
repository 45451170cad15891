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
    assert kinds == {"train_step", "train_step_ratio", "mc_eval", "decode", "padding"}
    train = [r for r in rows if r["bench"] == "train_step"]
    assert {r["variant"] for r in train} == {"lora", "bitune"}
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and "peak_bytes_compiled" in r for r in train)
    assert all(r["matmul_flops_per_s"] > 0 and 0 < r["fraction_of_matmul_rate"] for r in train)
    ratio = [r for r in rows if r["bench"] == "train_step_ratio"]
    assert all("token_ratio" in r and "bitune_over_lora" in r for r in ratio)
    assert all("shared_questions_per_s" in r for r in rows if r["bench"] == "mc_eval")
    assert all("decode_ratio_bitune_over_lora" in r for r in rows if r["bench"] == "decode")


def test_padding_bench_quick_packing_pads_less_on_the_same_tokens():
    """No model: the long-tail mix packed and unpacked holds the same tokens, with less padding packed."""
    from bitune_jax.apps.bench import padding_bench

    rows = padding_bench(quick=True)
    assert {(r["data"], r["sort_window"], r["packing"]) for r in rows} == {
        ("long_tail_lognormal", w, p) for w in (16, 1) for p in (False, True)}
    for w in (16, 1):
        plain, packed = ([r for r in rows if r["sort_window"] == w and r["packing"] == p][0] for p in (False, True))
        assert plain["real_tokens"] == packed["real_tokens"] > 0 and plain["batches"] == packed["batches"] == 40
        assert 0 < packed["padding_fraction"] < plain["padding_fraction"] < 1
        assert packed["rows_per_batch"] < plain["rows_per_batch"] == 10
        json.dumps(plain), json.dumps(packed)
