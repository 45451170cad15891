"""`bitune-jax score`: numbers, input order, and clear errors with no partial output."""
import json
import os

import pytest
import torch

from bitune_jax import cli
from hf_utils import tiny_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = tiny_hf_model("llama", str(d))
    return str(d), model


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _torch_nll(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(-sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer)))


def test_score_ids_rows_match_torch_and_keep_order(llama_dir, tmp_path):
    d, model = llama_dir
    rows = [{"prompt_ids": [1, 5, 9, 3], "answer_ids": [7, 8], "id": "a"},
            {"prompt_ids": [2], "answer_ids": [4, 4, 4, 6, 1], "id": "b"},
            {"prompt_ids": list(range(10, 50)), "answer_ids": [3], "id": "c"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    assert cli.main(["score", "--model", d, "--data", str(inp), "--out", str(out), "--quiet"]) == 0
    got = [json.loads(line) for line in open(out)]
    assert [g["id"] for g in got] == ["a", "b", "c"]
    for r, g in zip(rows, got):
        assert g["num_tokens"] == len(r["answer_ids"])
        assert abs(g["nll_sum"] - _torch_nll(model, r["prompt_ids"], r["answer_ids"])) <= 1e-4


def test_score_text_rows_use_training_tokenization(tmp_path):
    from bitune_jax.evaluation import score
    from bitune_jax.data.text import encode_pair

    class Tok:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            ids = [3 + (ord(c) % 50) for c in text]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    p, a = encode_pair(Tok(), "Hi", " yo")
    assert p[0] == 1 and a[-1] == 2 and len(a) == 4
    ex = score.encode_rows([{"prompt": "Hi", "answer": " yo"}], Tok(), 97)
    assert ex == [(p, a)]
    ex = score.encode_rows([{"prompt": "Hi", "answer": " yo"}], Tok(), 97, add_eos=False)
    assert ex[0][1] == a[:-1]


@pytest.mark.parametrize("line,needle", [
    ('{"prompt_ids": [1, 2], "answer_ids": []}', "answer_ids"),
    ('{"prompt_ids": [1, 2], "answer_ids": [1000]}', "outside the vocabulary"),
    ('{"prompt": "x"}', "needs either"),
    ('{"prompt_ids": [1, 2], "answer_ids": [3]', "invalid JSON"),
    ('[1, 2, 3]', "not an object"),
])
def test_malformed_rows_fail_clearly_without_output(llama_dir, tmp_path, capsys, line, needle):
    d, _ = llama_dir
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, ['{"prompt_ids": [1, 2], "answer_ids": [3]}', line])
    assert cli.main(["score", "--model", d, "--data", str(inp), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "in.jsonl" in err and "2" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _copy_model(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_model_sources(llama_dir, tmp_path, capsys):
    d, _ = llama_dir
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [{"prompt_ids": [1, 2], "answer_ids": [3]}])

    def run(model):
        code = cli.main(["score", "--model", model, "--data", str(inp), "--out", str(out), "--quiet"])
        return code, capsys.readouterr().err

    # unknown architecture
    m = _copy_model(d, tmp_path / "unknown")
    cfg = json.load(open(os.path.join(m, "config.json")))
    cfg["model_type"] = "mamba9000"
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"))
    code, err = run(m)
    assert code == 2 and "mamba9000" in err and "supported" in err

    # missing weight file
    m = _copy_model(d, tmp_path / "noweights")
    os.remove(os.path.join(m, "model.safetensors"))
    code, err = run(m)
    assert code == 2 and "model.safetensors" in err

    # mismatched shape: config says a bigger hidden size than the tensors have
    m = _copy_model(d, tmp_path / "badshape")
    cfg = json.load(open(os.path.join(m, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"))
    code, err = run(m)
    assert code == 2 and "mlp.gate_proj.weight" in err and "shape" in err

    # a source that does not exist
    code, err = run(str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    assert not out.exists()
    assert "Traceback" not in err


def test_sharded_safetensors_index(llama_dir, tmp_path):
    """A sharded checkpoint (model.safetensors.index.json) loads to the same parameters."""
    import jax
    from safetensors.numpy import load_file, save_file
    from bitune_jax.conversion.hf import load_hf

    d, _ = llama_dir
    m = _copy_model(d, tmp_path / "sharded")
    tensors = load_file(os.path.join(m, "model.safetensors"))
    os.remove(os.path.join(m, "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(m, name))
    json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}},
              open(os.path.join(m, "model.safetensors.index.json"), "w"))
    a, _ = load_hf(d)
    b, _ = load_hf(m)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))
    os.remove(os.path.join(m, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_hf(m)


@pytest.mark.parametrize("variant", [None, "no_mixing"])
def test_score_with_exported_bitune_adapters(llama_dir, tmp_path, variant):
    """`score --adapters` computes exactly the training loss terms of the chosen variant."""
    import jax
    import jax.numpy as jnp

    from bitune_jax import bitune
    from bitune_jax.conversion.adapters import export_adapters
    from bitune_jax.conversion.hf import load_hf
    from bitune_jax.model.peft import PeftConfig

    d, _ = llama_dir
    base, cfg = load_hf(d)
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4, alpha=8))
    tr = bitune.init_trainable(jax.random.PRNGKey(0), cfg, method, base)
    tr = jax.tree_util.tree_map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(1), x.shape), tr)
    export_adapters(str(tmp_path / "ad"), tr, cfg, method, d)
    rows = [{"prompt_ids": [1, 5, 9, 3, 4, 4], "answer_ids": [7, 8]}, {"prompt_ids": [2, 3], "answer_ids": [4, 6, 1]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    args = ["score", "--model", d, "--data", str(inp), "--out", str(out), "--adapters", str(tmp_path / "ad"), "--quiet"]
    if variant:
        args += ["--variant", variant]
    assert cli.main(args) == 0
    got = [json.loads(line) for line in open(out)]
    m = bitune.MethodConfig(variant=variant or "bitune", peft=method.peft)
    used = {k: v for k, v in tr.items() if k in m.adapter_sets or (k == "mix" and m.mixed)}
    for r, g in zip(rows, got):
        batch = {"prompt_ids": jnp.array([r["prompt_ids"]]), "prompt_len": jnp.array([len(r["prompt_ids"])]),
                 "answer_ids": jnp.array([r["answer_ids"]]), "answer_len": jnp.array([len(r["answer_ids"])])}
        nll, n = bitune.answer_nll(used, base, cfg, m, batch)
        assert g["num_tokens"] == int(n[0]) and abs(g["nll_sum"] - float(nll[0])) <= 1e-5
    base_out = tmp_path / "base.jsonl"
    assert cli.main(["score", "--model", d, "--data", str(inp), "--out", str(base_out), "--quiet"]) == 0
    assert [json.loads(x)["nll_sum"] for x in open(base_out)] != [g["nll_sum"] for g in got]
