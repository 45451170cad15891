"""`bitune-jax bench --quick` runs and emits valid JSON lines (numbers are not asserted)."""
import json

import pytest

from bitune_jax import cli


@pytest.mark.slow
def test_bench_quick_emits_json(capsys):
    assert cli.main(["bench", "--quick", "--steps", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = {r["bench"] for r in rows}
    assert kinds == {"train_step", "train_step_ratio", "mc_eval", "decode"}
    train = [r for r in rows if r["bench"] == "train_step"]
    assert {r["variant"] for r in train} == {"lora", "bitune"}
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and "peak_bytes_compiled" in r for r in train)
    ratio = [r for r in rows if r["bench"] == "train_step_ratio"]
    assert all("token_ratio" in r and "bitune_over_lora" in r for r in ratio)
    assert all("shared_questions_per_s" in r for r in rows if r["bench"] == "mc_eval")
    assert all("decode_ratio_bitune_over_lora" in r for r in rows if r["bench"] == "decode")
