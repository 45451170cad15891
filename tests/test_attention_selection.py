"""``model.attention`` / ``--attention`` reach every attention call of training, eval, score, generate and bench."""
import json

import pytest
import yaml

from bitune_jax import cli
from bitune_jax.cli.common import ATTENTION_CHOICES
from bitune_jax.model import attention as attn_lib
from hf_utils import save_word_tokenizer, tiny_hf_model

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:"] + [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama", str(d), vocab_size=len(WORDS), hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    save_word_tokenizer(str(d), WORDS)
    return str(d)


@pytest.fixture
def resolved(monkeypatch):
    """Every implementation name the layers ask for while tracing."""
    seen = []
    original = attn_lib.resolve

    def spy(impl, **kw):
        seen.append(impl)
        return original(impl, **kw)

    monkeypatch.setattr(attn_lib, "resolve", spy)
    return seen


def _only(seen, impl):
    """True when the layers asked for ``impl`` and nothing but it (the shape-only init trace uses the reference)."""
    return impl in seen and set(seen) - {"reference"} == ({impl} - {"reference"})


def _rows(path, n=4):
    rows = [{"prompt": " ".join(f"w{j}" for j in range(i, i + 3)), "answer": f"w{i} w{i + 1}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Every value that runs on a CPU host: splash through Pallas's interpreter, auto (which resolves to blocked
# here); cudnn needs a GPU (its clear failure is tested below).
CPU_IMPLS = ("reference", "blocked", "xla", "splash", "auto")


@pytest.fixture(params=CPU_IMPLS)
def impl(request):
    with attn_lib.splash_interpret(request.param == "splash"):
        yield request.param


def test_flag_choices_are_the_library_implementations():
    assert ATTENTION_CHOICES == attn_lib.IMPLEMENTATIONS


def test_train_uses_model_attention(model_dir, tmp_path, resolved, impl):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": model_dir, "attention": impl},
        "data": {"train": _rows(tmp_path / "train.jsonl", 8), "eval": _rows(tmp_path / "eval.jsonl", 8),
                 "batch_size": 8, "max_prompt_len": 8, "max_answer_len": 8},
        "train": {"steps": 1, "output_dir": str(tmp_path / "run"), "eval_every": 1, "eval_batches": 1,
                  "async_checkpoint": False},
    }))
    assert cli.main(["train", str(config)]) == 0
    # The train step and the eval loss both traced their layers with it, and nothing else.
    assert resolved.count(impl) >= 2 and _only(resolved, impl), resolved


def test_score_generate_eval_and_bench_pass_the_flag(model_dir, tmp_path, resolved, impl):
    data = _rows(tmp_path / "rows.jsonl")
    assert cli.main(["score", "--model", model_dir, "--data", data, "--out", str(tmp_path / "s.jsonl"),
                     "--quiet", "--attention", impl]) == 0
    assert _only(resolved, impl), resolved
    resolved.clear()
    assert cli.main(["generate", "--model", model_dir, "--prompt", "w1 w2", "--max-new-tokens", "2",
                     "--attention", impl]) == 0
    assert _only(resolved, impl), resolved  # prefill and decode steps
    resolved.clear()
    items = tmp_path / "arc.jsonl"
    items.write_text(json.dumps({"id": "q1", "question": "w1 w2", "choices": {"text": ["w3", "w4"],
                                                                           "label": ["A", "B"]},
                                 "answerKey": "A"}) + "\n")
    from bitune_jax.evaluation.evaluate import run_eval

    run_eval(model_dir, tasks=["arc_easy"], source={"arc_easy": str(items)}, quiet=True, attention=impl)
    assert _only(resolved, impl), resolved
    resolved.clear()
    from bitune_jax.apps.bench import run_benches

    rows = run_benches(quick=True, only=("train",), lengths=((8, 4),), steps=1, attention=impl,
                       out=open(tmp_path / "bench.jsonl", "w"))
    assert _only(resolved, impl) and all(r.get("attention") == impl for r in rows if "variant" in r)


def test_an_implementation_that_cannot_serve_fails_with_one_line(model_dir, tmp_path, capsys):
    data = _rows(tmp_path / "rows.jsonl")
    out = tmp_path / "s.jsonl"
    assert cli.main(["score", "--model", model_dir, "--data", data, "--out", str(out), "--quiet",
                     "--attention", "cudnn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "cudnn" in err[0] and "GPU" in err[0]
    assert not out.exists()


def test_auto_on_tpu_takes_blocked_for_decoding_and_splash_otherwise():
    """Under ``auto`` a TPU runs splash, except for decoding steps (one query per row, which the kernel would pad
    to 128 rows); dense mask arrays take the reference; an explicit choice is kept."""
    import jax.numpy as jnp

    from bitune_jax.model import transformer
    from bitune_jax.model.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    mask = [attn_lib.Mask.over(jnp.arange(4)[None], jnp.ones((1, 4), bool), causal=True)]
    pick = transformer._attention_impl
    assert pick(cfg, "auto", mask, 1, backend="tpu") == "blocked"
    assert pick(cfg, "auto", mask, 64, backend="tpu") == "splash"  # e.g. an answer stream in training
    assert pick(cfg, "auto", mask, 1, backend="cpu") == "blocked"
    assert pick(cfg, "splash", mask, 1, backend="tpu") == "splash"
    assert pick(cfg, "auto", [jnp.ones((1, 4, 4), bool)], 512, backend="tpu") == "reference"
