"""Gemma 1, Gemma 3 and Phi-2 against `transformers` (tiny random models, float32).

Each test builds a tiny random HF model (norm weights and biases perturbed so
they matter), saves it as safetensors, loads it with ``load_hf`` and compares
logits on a right-padded batch with non-zero position offsets. Gemma 3 runs
sequences longer than its sliding window over a mix of local and global layers.
The real Gemma-3-270M GGUF test at the end is marked ``real_model``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.model import attention as attn_lib
from bitune_jax.conversion.hf import load_hf
from bitune_jax.conversion import families
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import forward, init_params
from hf_utils import tiny_hf_model, torch_logits

TOL = 1e-4


def _batch(vocab, t=12, offsets=(0, 5), pad=(0, 4), seed=0):
    """Right-padded batch: row r has ``t - pad[r]`` tokens and positions starting at ``offsets[r]``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(len(offsets), t)).astype(np.int32)
    valid = np.ones_like(tokens, dtype=bool)
    for r, p in enumerate(pad):
        if p:
            valid[r, t - p:] = False
            tokens[r, t - p:] = 0
    positions = (np.arange(t)[None, :] + np.asarray(offsets)[:, None]).astype(np.int32)
    return tokens, valid, positions


def _max_diff(model, params, cfg, tokens, valid, positions):
    ref = torch_logits(model, tokens, attention_mask=valid.astype(np.int64), position_ids=positions.astype(np.int64))
    ours, _ = forward(params, cfg, jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid))
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    return float(np.abs(ours - ref)[valid].max())


def _check(kind, tmp_path, t=12, **overrides):
    d = str(tmp_path / kind)
    model = tiny_hf_model(kind, d, **overrides)
    params, cfg = load_hf(d)
    tokens, valid, positions = _batch(cfg.vocab_size, t=t)
    diff = _max_diff(model, params, cfg, tokens, valid, positions)
    assert diff <= TOL, f"{kind}: max |logits diff| {diff:.2e} > {TOL}"
    # Logits of this size make the comparison meaningful.
    assert np.abs(torch_logits(model, tokens[:1])).max() > 1e-2
    return model, params, cfg, d


# --------------------------------------------------------------------------- Gemma 1
def test_gemma_parity(tmp_path):
    _, params, cfg, _ = _check("gemma", tmp_path)
    assert cfg.family == "gemma" and cfg.activation == "gelu_tanh" and cfg.num_kv_heads == 1
    assert cfg.head_dim == 32 and cfg.tie_embeddings and "lm_head" not in params
    assert cfg.embed_scale == pytest.approx(64 ** 0.5)
    # Norm scales are stored as the applied multiplier 1 + w.
    assert abs(float(params["final_norm"]["scale"].mean()) - 1.0) < 0.1


def test_gemma_legacy_gelu_means_tanh():
    hf = dict(model_type="gemma", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=1, num_key_value_heads=1, head_dim=8, hidden_act="gelu")
    assert families.config_from_hf(hf).activation == "gelu_tanh"
    assert families.config_from_hf({**hf, "hidden_act": None, "hidden_activation": "gelu_pytorch_tanh"}
                                   ).activation == "gelu_tanh"


# --------------------------------------------------------------------------- Gemma 3
def test_gemma3_parity_local_and_global(tmp_path):
    model, params, cfg, d = _check("gemma3", tmp_path, t=14)
    assert cfg.family == "gemma3" and cfg.sliding_window == 4
    assert cfg.sliding_layers == (True, True, False, True)
    assert cfg.rope_theta == 1000.0 and cfg.rope_local_theta == 50.0 and cfg.rope_scaling == ("linear", 2.0)
    assert cfg.final_logit_softcap == 0.3 and cfg.query_scale == pytest.approx(24 ** -0.5)
    # The final softcap bites: raw logits exceed what the cap lets through.
    tokens, valid, positions = _batch(cfg.vocab_size, t=14)
    capped, _ = forward(params, cfg, jnp.asarray(tokens), positions=jnp.asarray(positions))
    uncapped, _ = forward(params, cfg.replace(final_logit_softcap=None), jnp.asarray(tokens),
                          positions=jnp.asarray(positions))
    assert float(jnp.abs(capped - uncapped).max()) > 1e-2


def test_gemma3_window_matters(tmp_path):
    """The sliding window changes the logits here (else the parity test would not test it)."""
    model, params, cfg, _ = _check("gemma3", tmp_path, t=14)
    tokens, valid, positions = _batch(cfg.vocab_size, t=14)
    a, _ = forward(params, cfg, jnp.asarray(tokens), positions=jnp.asarray(positions))
    b, _ = forward(params, cfg.replace(sliding_window=None, sliding_layers=None, rope_local_theta=None),
                   jnp.asarray(tokens), positions=jnp.asarray(positions))
    assert float(jnp.abs(a - b)[:, 8:].max()) > 1e-3


def test_gemma3_legacy_config_format(tmp_path):
    """transformers-4 style config.json (rope_local_base_freq, rope_scaling, sliding_window_pattern)."""
    import transformers

    d = str(tmp_path / "g3")
    tiny_hf_model("gemma3", d, num_hidden_layers=5, layer_types=None, sliding_window_pattern=3)
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    for k in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        hf.pop(k, None)
    hf.update(sliding_window_pattern=3, rope_theta=1000.0, rope_local_base_freq=50.0,
              rope_scaling={"rope_type": "linear", "factor": 2.0})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 1 + \
        ["sliding_attention", "sliding_attention"]
    params, cfg = load_hf(d)
    assert cfg.sliding_layers == (True, True, False, True, True)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1000.0, 50.0, ("linear", 2.0))
    tokens, valid, positions = _batch(cfg.vocab_size, t=14)
    assert _max_diff(model, params, cfg, tokens, valid, positions) <= TOL


def test_gemma3_multimodal_layout(tmp_path):
    """A ``gemma3`` (multimodal) checkpoint: text config under ``text_config``, weights under ``language_model.``."""
    from safetensors.numpy import load_file, save_file

    d = str(tmp_path / "g3")
    model = tiny_hf_model("gemma3", d)
    with open(os.path.join(d, "config.json")) as f:
        text = json.load(f)
    for prefix in ("language_model.model.", "model.language_model."):
        mm = str(tmp_path / prefix.replace(".", "_"))
        os.makedirs(mm)
        with open(os.path.join(mm, "config.json"), "w") as f:
            json.dump({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                       "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}, f)
        tensors = load_file(os.path.join(d, "model.safetensors"))
        save_file({prefix + k[len("model."):]: v for k, v in tensors.items()},
                  os.path.join(mm, "model.safetensors"))
        params, cfg = load_hf(mm)
        assert cfg.family == "gemma3" and cfg.sliding_layers == (True, True, False, True)
        tokens, valid, positions = _batch(cfg.vocab_size, t=14)
        assert _max_diff(model, params, cfg, tokens, valid, positions) <= TOL


def test_causal_local_mask_matches_hf():
    """HF's causal sliding window keeps keys with ``q - w < k <= q`` (w keys including self); so do we."""
    import torch
    from transformers.masking_utils import sliding_window_causal_mask_function

    w, t = 4, 11
    fn = sliding_window_causal_mask_function(w)
    hf = np.array([[bool(fn(0, 0, torch.tensor(q), torch.tensor(k))) for k in range(t)] for q in range(t)])
    pos = jnp.arange(t)[None]
    ones = jnp.ones((1, t), bool)
    ours = np.asarray(attn_lib.make_mask(pos, pos, ones, ones, causal=True, window=w))[0]
    np.testing.assert_array_equal(ours, hf)
    assert ours[8].sum() == w  # w keys, self included
    # With a prefix cache sitting before the queries (answer stream after a prompt).
    kp = jnp.arange(t)[None]
    qp = jnp.arange(6, t)[None]
    ours = np.asarray(attn_lib.make_mask(qp, kp, jnp.ones((1, t - 6), bool), ones, causal=True, window=w))[0]
    np.testing.assert_array_equal(ours, hf[6:])


def _local_only_model(window):
    cfg = ModelConfig(family="gemma3", vocab_size=31, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, activation="gelu_tanh", qk_norm=True,
                      sandwich_norm=True, embed_scale=32 ** 0.5, sliding_window=window, sliding_layers=(True,),
                      rope_theta=1000.0, rope_local_theta=50.0, query_scale=16 ** -0.5)
    params = init_params(jax.random.PRNGKey(0), cfg, std=0.3)
    return cfg, params


def test_bidirectional_local_layer_sees_window_on_both_sides():
    """Bidirectional pass of a local layer: position i sees keys j with |i - j| < window, nothing further."""
    w, t, i = 3, 12, 4
    cfg, params = _local_only_model(w)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (1, t)), jnp.int32)
    # Row 0: the original tokens; row 1 + j: token j replaced. One batched call per mask.
    rows = [tokens[0]] + [tokens[0].at[j].set(tokens[0, j] % (cfg.vocab_size - 1) + 1) for j in range(t)]
    batch = jnp.stack(rows)
    for causal in (False, True):
        logits, _ = forward(params, cfg, batch, causal=causal)
        d = np.abs(np.asarray(logits[1:, i]) - np.asarray(logits[0, i])).max(-1)
        seen = np.abs(i - np.arange(t)) < w if not causal else (np.arange(t) > i - w) & (np.arange(t) <= i)
        np.testing.assert_array_equal(d > 1e-5, seen, err_msg=f"causal={causal} diffs={d}")


# --------------------------------------------------------------------------- Phi-2
def test_phi_parity(tmp_path):
    _, params, cfg, _ = _check("phi", tmp_path)
    assert cfg.family == "phi" and cfg.norm_type == "layer" and cfg.parallel_block
    assert cfg.rotary_dim == 8 and cfg.mlp_type == "plain" and cfg.activation == "gelu_tanh"
    assert set(params["layers"]) == {"attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert "bias" in params["lm_head"] and "bias" in params["layers"]["o_proj"]


def test_phi_refuses_qk_layernorm():
    hf = dict(model_type="phi", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, qk_layernorm=True)
    with pytest.raises(families.UnsupportedModelError, match="qk_layernorm"):
        families.config_from_hf(hf)


# --------------------------------------------------------------------------- PEFT module names
@pytest.mark.parametrize("kind", ["gemma", "gemma3", "phi"])
def test_hf_modules_name_real_linears(kind, tmp_path):
    import torch

    model = tiny_hf_model(kind, str(tmp_path / kind))
    _, cfg = load_hf(str(tmp_path / kind))
    fam = families.family_of_config(cfg)
    assert families.FAMILY_MODEL_TYPE[cfg.family] == model.config.model_type
    assert set(fam.hf_modules) >= set(cfg.projections)
    for name in cfg.projections:
        path = fam.hf_layer_prefix.format(i=1) + fam.hf_modules[name]
        mod = model.get_submodule(path)
        assert isinstance(mod, torch.nn.Linear)
        assert (mod.in_features, mod.out_features) == cfg.projection_shape(name)


# --------------------------------------------------------------------------- GGUF (Gemma 1 / Gemma 3)
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _write_gemma_gguf(path, model, arch, extra=None):
    """A tiny HF Gemma model as an F32 GGUF laid out like llama.cpp's converter (norms stored as 1 + w)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    rp = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    for add in extra or ():
        add(w)
    # Gemma 1's post_attention_layernorm is the pre-MLP norm; Gemma 3's is the post-attention one.
    names = {**_GGUF_LAYER, "post_attention_layernorm": "ffn_norm" if arch == "gemma" else "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm"}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy().copy()
        if name == "lm_head.weight":
            continue  # tied
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{names[module]}.{kind}"
        if name.endswith("norm.weight"):
            a = a + 1.0
        w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_synthetic_gemma_gguf(tmp_path):
    from bitune_jax.conversion.gguf import load_gguf

    model = tiny_hf_model("gemma", str(tmp_path / "hf"))
    params, cfg = load_gguf(_write_gemma_gguf(tmp_path / "g.gguf", model, "gemma"))
    assert cfg.family == "gemma" and cfg.activation == "gelu_tanh"
    tokens, valid, positions = _batch(cfg.vocab_size)
    assert _max_diff(model, params, cfg, tokens, valid, positions) <= TOL


def test_synthetic_gemma3_gguf_llamacpp_defaults(tmp_path):
    """No Gemma-3 extras in the metadata: llama.cpp's fixed pattern (every 6th layer global), local base 10000."""
    from bitune_jax.conversion.gguf import load_gguf

    model = tiny_hf_model("gemma3", str(tmp_path / "hf"), num_hidden_layers=7, layer_types=None,
                          query_pre_attn_scalar=32, final_logit_softcapping=None,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    params, cfg = load_gguf(_write_gemma_gguf(tmp_path / "g3.gguf", model, "gemma3"))
    assert cfg.sliding_layers == (True,) * 5 + (False, True) and cfg.rope_local_theta == 10000.0
    assert cfg.final_logit_softcap is None
    tokens, valid, positions = _batch(cfg.vocab_size, t=14)
    assert _max_diff(model, params, cfg, tokens, valid, positions) <= TOL


def test_synthetic_gemma3_gguf_with_metadata(tmp_path):
    """Per-layer pattern, local RoPE base, query scale, linear scaling and final softcap read from metadata."""
    import gguf
    from bitune_jax.conversion.gguf import load_gguf

    model = tiny_hf_model("gemma3", str(tmp_path / "hf"))
    extra = [lambda w: w.add_sliding_window_pattern([True, True, False, True]),
             lambda w: w.add_float32("gemma3.rope.freq_base_swa", 50.0),
             lambda w: w.add_attention_scale(24 ** -0.5),
             lambda w: w.add_final_logit_softcapping(0.3),
             lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
             lambda w: w.add_rope_scaling_factor(2.0)]
    params, cfg = load_gguf(_write_gemma_gguf(tmp_path / "g3.gguf", model, "gemma3", extra))
    assert cfg.sliding_layers == (True, True, False, True) and cfg.rope_local_theta == 50.0
    assert cfg.query_scale == pytest.approx(24 ** -0.5) and cfg.final_logit_softcap == pytest.approx(0.3)
    assert cfg.rope_scaling == ("linear", 2.0)
    tokens, valid, positions = _batch(cfg.vocab_size, t=14)
    assert _max_diff(model, params, cfg, tokens, valid, positions) <= TOL


# --------------------------------------------------------------------------- real Gemma-3-270M GGUF
SENTENCES = [
    "The capital of France is",
    "Water boils at one hundred degrees Celsius at sea level, which is why cooking takes longer in the mountains.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


@pytest.fixture(scope="session")
def gemma3_real(gemma3):
    """The session's Gemma-3-270M, a padded batch of SENTENCES and transformers' logits for it.

    Session-scoped (it holds logits, not the transformers model), so it is built once even when
    the test runner interleaves other modules' tests with this one's.
    """
    pytest.importorskip("torch")
    from hf_utils import gguf_reference_model

    path, tok = gemma3.source, gemma3.tokenizer
    ids = [tok(s)["input_ids"] for s in SENTENCES]
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    valid = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
        valid[i, :len(x)] = True
    hf = gguf_reference_model(path, attn_implementation="eager")  # used once: not kept for the session
    ref = torch_logits(hf, tokens.astype(np.int64), attention_mask=valid.astype(np.int64))
    del hf
    return dict(path=path, tok=tok, tokens=tokens, valid=valid, ref=ref, params=gemma3.params, cfg=gemma3.cfg)


@pytest.mark.real_model
def test_real_gemma3_gguf_matches_transformers(gemma3_real):
    cfg, params = gemma3_real["cfg"], gemma3_real["params"]
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("gemma3", 18, 640, 4, 1, 256)
    assert cfg.vocab_size == 262144 and cfg.tie_embeddings and cfg.sliding_window == 512
    assert cfg.sliding_layers == ((True,) * 5 + (False,)) * 3
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 10_000.0)
    valid = gemma3_real["valid"]
    assert not valid.all()  # the batch really is padded
    logits, _ = forward(params, cfg, jnp.asarray(gemma3_real["tokens"]), valid=jnp.asarray(valid))
    diff = float(np.abs(np.asarray(logits) - gemma3_real["ref"])[valid].max())
    assert diff <= 1e-3, diff


def _greedy(params, cfg, ids, n_new):
    """Greedy decoding by re-running the whole sequence (fixed shape: one compilation)."""
    n = len(ids)
    buf = np.zeros((1, n + n_new), np.int32)
    buf[0, :n] = ids
    step = jax.jit(lambda p, t, v: forward(p, cfg, t, valid=v)[0])
    for k in range(n, n + n_new):
        logits = step(params, jnp.asarray(buf), jnp.asarray(np.arange(n + n_new)[None] < k))
        buf[0, k] = int(jnp.argmax(logits[0, k - 1]))
    return buf[0, n:]


@pytest.mark.real_model
def test_real_gemma3_greedy_text(gemma3_real):
    tok, params, cfg = gemma3_real["tok"], gemma3_real["params"], gemma3_real["cfg"]
    # (The base 270M model continues "The capital of France is" with " the capital of the country ...".)
    for prompt, expected in [("The capital of France is the city of", "Paris"),
                             ("Paris is the capital of", "France")]:
        text = tok.decode(_greedy(params, cfg, tok(prompt)["input_ids"], 6))
        assert expected in text, (prompt, text)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma3_score_cli(gemma3_real, gemma3, tmp_path, monkeypatch):
    """`bitune-jax score` on the real Gemma-3-270M GGUF equals the answer NLL from transformers' logits."""
    import json

    from bitune_jax import cli, conversion

    # The command gets the session's model instead of loading the file a second time (about
    # 30 s); what loading gives is checked against transformers by the tests above.
    loads = []

    def load_model(src, dtype="float32", with_tokenizer=True):
        loads.append((src, dtype, with_tokenizer))
        return gemma3

    monkeypatch.setattr(conversion, "load_model", load_model)

    ids = [int(t) for t, v in zip(gemma3_real["tokens"][1], gemma3_real["valid"][1]) if v]
    split = 6
    rows = [{"prompt_ids": ids[:split], "answer_ids": ids[split:]},
            {"prompt": "Question: What is the capital of France?\n\nAnswer:", "answer": " Paris"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main(["score", "--model", gemma3_real["path"], "--data", str(inp), "--out", str(out), "--quiet"]) == 0
    assert loads == [(gemma3.source, "float32", True)]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    ref = gemma3_real["ref"][1]
    logp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    expected = -sum(logp[split - 1 + j, t] for j, t in enumerate(ids[split:]))
    assert got[0]["num_tokens"] == len(ids) - split
    assert abs(got[0]["nll_sum"] - expected) <= 1e-2 * len(ids)
    assert got[1]["num_tokens"] >= 2 and np.isfinite(got[1]["nll_sum"])
