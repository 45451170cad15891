"""GGUF importer: logits parity with PyTorch on synthetic and real GGUF files, and errors."""
from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.conversion import ModelFileError, UnsupportedModelError
from bitune_jax.conversion.gguf import gguf_chat_template, load_gguf
from bitune_jax.model.transformer import forward
from hf_utils import tiny_hf_model, torch_logits

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and it is famous for the Eiffel Tower.",
    "Water boils at one hundred degrees Celsius at sea level.",
]

# HF module name inside a layer -> GGUF tensor name (llama.cpp naming).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(theta, head_dim, factor, low, high, old):
    """llama.cpp's ``rope_freqs.weight`` for llama-3 scaling (``LlamaModel.generate_extra_tensors``)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path, model, arch="llama", permute=True, drop=(), extra_tensors=None):
    """Writes a torch HF model as an F32 GGUF file the way llama.cpp's converter lays it out."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None)
                         else float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_chat_template("{{ messages }}")
    tensors = {}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{_LAYER_NAMES[module]}.{kind}"
            if permute and module == "self_attn.q_proj":
                a = llamacpp_permute(a, c.num_attention_heads)
            elif permute and module == "self_attn.k_proj":
                a = llamacpp_permute(a, c.num_key_value_heads)
        tensors[g] = a
    tensors.update(extra_tensors or {})
    for g, a in tensors.items():
        if g not in drop:
            w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _batch(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(0, vocab, size=(len(lengths), t)).astype(np.int32)
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return np.where(valid, tokens, 0).astype(np.int32), valid


def _check_against_torch(params, cfg, model, tol):
    tokens, valid = _batch([11, 7, 4], cfg.vocab_size)
    ours, _ = forward(params, cfg, jnp.asarray(tokens), valid=jnp.asarray(valid))
    ref = torch_logits(model, tokens.astype(np.int64), attention_mask=valid.astype(np.int64))
    diff = np.abs(np.asarray(ours) - ref)[valid].max()
    assert diff <= tol, diff
    return diff


# --------------------------------------------------------------------------- synthetic files
@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),  # untied lm_head -> output.weight
    ("llama", {"attention_bias": True, "tie_word_embeddings": True}),  # permuted Q/K biases too
    ("qwen2", {}),  # Q/K not permuted, qkv biases, tied embeddings
])
def test_synthetic_gguf_matches_torch(tmp_path, kind, overrides):
    model = tiny_hf_model(kind, str(tmp_path / "hf"), **overrides)
    path = write_gguf(tmp_path / "m.gguf", model, arch=kind, permute=(kind == "llama"))
    params, cfg = load_gguf(path)
    assert cfg.family == kind and cfg.dtype == "float32"
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in params) == (not model.config.tie_word_embeddings)
    assert cfg.vocab_size == 97 and cfg.num_layers == 3 and cfg.num_kv_heads == 2 and cfg.head_dim == 16
    assert cfg.norm_eps == pytest.approx(model.config.rms_norm_eps)
    assert gguf_chat_template(path) == "{{ messages }}"
    _check_against_torch(params, cfg, model, 1e-4)


def test_unpermute_is_needed(tmp_path):
    """Guards the test itself: a llama file read as if unpermuted gives different logits."""
    model = tiny_hf_model("llama", str(tmp_path / "hf"))
    path = write_gguf(tmp_path / "m.gguf", model, arch="llama", permute=False)
    params, cfg = load_gguf(path)
    tokens, valid = _batch([11], cfg.vocab_size)
    ours, _ = forward(params, cfg, jnp.asarray(tokens), valid=jnp.asarray(valid))
    ref = torch_logits(model, tokens.astype(np.int64))
    assert np.abs(np.asarray(ours) - ref).max() > 1e-3


def test_synthetic_qwen2_matches_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF loader agrees that qwen2 files carry no Q/K permutation."""
    transformers = pytest.importorskip("transformers")
    model = tiny_hf_model("qwen2", str(tmp_path / "hf"))
    path = write_gguf(tmp_path / "m.gguf", model, arch="qwen2", permute=False)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    except Exception as e:  # pragma: no cover - depends on transformers' GGUF metadata needs
        pytest.skip(f"transformers cannot load the synthetic GGUF: {e}")
    params, cfg = load_gguf(path)
    _check_against_torch(params, cfg, hf, 1e-4)


def test_llama3_rope_freqs(tmp_path):
    """Llama-3 scaling reaches GGUF as a rope_freqs tensor; we recover the HF parameters."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    model = tiny_hf_model("llama", str(tmp_path / "hf"), rope_scaling=rs, rope_theta=10000.0)
    assert model.config.rope_parameters.get("rope_type") == "llama3"
    freqs = llama3_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 8192.0)
    # head_dim 16: wavelengths 6 .. 19869, so all three regions (1, smoothed, 8) occur.
    assert freqs.min() == 1.0 and freqs.max() == 8.0 and ((freqs > 1) & (freqs < 8)).any()
    path = write_gguf(tmp_path / "m.gguf", model, extra_tensors={"rope_freqs.weight": freqs})
    params, cfg = load_gguf(path)
    assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192.0)
    # Positions beyond the high-frequency wavelengths make the scaling visible in the logits.
    tokens, valid = _batch([11, 7, 4], cfg.vocab_size)
    positions = np.broadcast_to(np.arange(tokens.shape[1]) * 700, tokens.shape).astype(np.int32)
    ours, _ = forward(params, cfg, jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid))
    ref = torch_logits(model, tokens.astype(np.int64), attention_mask=valid.astype(np.int64),
                       position_ids=positions.astype(np.int64))
    assert np.abs(np.asarray(ours) - ref)[valid].max() <= 1e-4
    plain, _ = forward(params, cfg.replace(rope_scaling=None), jnp.asarray(tokens), positions=jnp.asarray(positions),
                       valid=jnp.asarray(valid))
    assert np.abs(np.asarray(plain) - ref)[valid].max() > 1e-3


def test_unrecognised_rope_freqs(tmp_path):
    model = tiny_hf_model("llama", str(tmp_path / "hf"))
    freqs = np.linspace(1.0, 3.0, 8).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", model, extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_gguf(path)


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="nope.gguf"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelFileError, match="bad.gguf"):
        load_gguf(str(path))


def test_unknown_architecture(tmp_path):
    model = tiny_hf_model("llama", str(tmp_path / "hf"))
    path = write_gguf(tmp_path / "m.gguf", model, arch="mamba9000")
    with pytest.raises(UnsupportedModelError, match="mamba9000") as e:
        load_gguf(path)
    assert "m.gguf" in str(e.value)


def test_missing_tensor(tmp_path):
    model = tiny_hf_model("llama", str(tmp_path / "hf"))
    path = write_gguf(tmp_path / "m.gguf", model, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_up\.weight") as e:
        load_gguf(path)
    assert "m.gguf" in str(e.value)


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        load_gguf(str(tmp_path / "x.gguf"), dtype="float16")


# --------------------------------------------------------------------------- tokenizer cache
def write_tokenizer_gguf(path, merges):
    """A tiny GGUF whose byte-level BPE tokenizer (llama.cpp's ``gpt2`` model) has the given merges."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    tokens = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġa", "bc"]
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_tokenizer_is_cached_by_content(tmp_path, monkeypatch):
    """The converted tokenizer is reused for the same bytes only: a changed file converts again."""
    from bitune_jax.conversion import gguf as gguf_lib
    from bitune_jax.conversion import load_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "bitune_jax" / "gguf_tokenizers"
    path = write_tokenizer_gguf(tmp_path / "m.gguf", ["a b", "Ġ a", "b c"])
    text = "ab abc"
    fresh = gguf_lib.gguf_tokenizer(path, cache=False)
    assert fresh(text)["input_ids"] == [5, 4, 5, 3] and not cache.exists()

    first = load_tokenizer(path)  # converts and fills the cache
    assert [p.name for p in cache.iterdir()] == [os.path.basename(gguf_lib.tokenizer_cache_folder(path))]
    assert first(text)["input_ids"] == [5, 4, 5, 3] and first.eos_token_id == fresh.eos_token_id == 0

    converted = []
    real_convert = gguf_lib._convert_tokenizer
    monkeypatch.setattr(gguf_lib, "_convert_tokenizer", lambda p: converted.append(p) or real_convert(p))
    again = load_tokenizer(path)
    assert converted == [] and again(text)["input_ids"] == [5, 4, 5, 3]  # read from the cache

    # Other merges, same size, same mtime: only the content tells the files apart.
    st = os.stat(path)
    write_tokenizer_gguf(path, ["b c", "Ġ a", "a b"])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    changed = load_tokenizer(path)
    assert converted == [path] and changed(text)["input_ids"] == [5, 6, 7]
    assert len(list(cache.iterdir())) == 2

    # A damaged entry is converted again and replaced; an unwritable cache only costs the conversion.
    folder = gguf_lib.tokenizer_cache_folder(path)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "w") as f:
            f.write("{")
    assert load_tokenizer(path)(text)["input_ids"] == [5, 6, 7] and len(converted) == 2
    assert load_tokenizer(path)(text)["input_ids"] == [5, 6, 7] and len(converted) == 2
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert load_tokenizer(path)(text)["input_ids"] == [5, 6, 7] and len(converted) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


# --------------------------------------------------------------------------- real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2_ref(smollm2, smollm2_hf):
    """A padded batch of SENTENCES and transformers' logits for it (the models are session fixtures)."""
    tok = smollm2.tokenizer
    ids = [tok(s)["input_ids"] for s in SENTENCES]
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    valid = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
        valid[i, :len(x)] = True
    ref = torch_logits(smollm2_hf, tokens.astype(np.int64), attention_mask=valid.astype(np.int64))
    return dict(path=smollm2.source, tokens=tokens, valid=valid, ref=ref, lengths=[len(x) for x in ids])


@pytest.mark.real_model
def test_real_smollm2_float32_matches_transformers(smollm2, smollm2_ref):
    params, cfg = smollm2.params, smollm2.cfg  # load_gguf(path), float32, through load_model
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings and "lm_head" not in params
    assert params["embed"].dtype == jnp.float32
    valid = smollm2_ref["valid"]
    assert min(smollm2_ref["lengths"]) < valid.shape[1]  # the batch really is padded
    logits, _ = forward(params, cfg, jnp.asarray(smollm2_ref["tokens"]), valid=jnp.asarray(valid))
    diff = np.abs(np.asarray(logits) - smollm2_ref["ref"])[valid].max()
    assert diff <= 1e-3, diff
    tpl = gguf_chat_template(smollm2_ref["path"])
    assert tpl is not None and "<|im_start|>" in tpl


@pytest.mark.real_model
def test_real_smollm2_bfloat16(smollm2_ref):
    params, cfg = load_gguf(smollm2_ref["path"], dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
    assert params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    valid = smollm2_ref["valid"]
    logits, _ = forward(params, cfg, jnp.asarray(smollm2_ref["tokens"]), valid=jnp.asarray(valid))
    got = np.asarray(logits, np.float32)[valid]
    ref = smollm2_ref["ref"][valid]
    assert np.isfinite(got).all()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 0.1, rel
    # Same next-token predictions on almost every position.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
