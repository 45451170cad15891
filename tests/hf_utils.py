"""Helpers shared by tests: tiny random transformers models saved to disk."""
from __future__ import annotations


import numpy as np

# XLA flags for cheaper CPU compilation (see conftest.py); subprocess runs add them to their own XLA_FLAGS.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def tiny_hf_model(kind: str, out_dir: str, seed: int = 0, **overrides):
    """Creates and saves a tiny random HF model (safetensors). Returns the torch model (eval, float32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**common, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(**{**common, "num_key_value_heads": 1, "head_dim": 32,
                                          "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                                          "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                                          **overrides})
        model = transformers.GemmaForCausalLM(cfg)
    elif kind == "gemma3":
        # Local (sliding-window) and global layers with their own RoPE bases, linear
        # scaling on the global layers, query_pre_attn_scalar != head_dim and a final
        # softcap small enough to bite on a tiny random model.
        kw = {**common, "num_hidden_layers": 4, "num_key_value_heads": 1, "head_dim": 32,
              "sliding_window": 4, "query_pre_attn_scalar": 24, "final_logit_softcapping": 0.3,
              "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
              **overrides}
        cfg = transformers.Gemma3TextConfig(**kw)
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "phi":
        cfg = transformers.PhiConfig(**{**common, "num_key_value_heads": 4, "hidden_act": "gelu_new",
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                            "partial_rotary_factor": 0.5},
                                        **overrides})
        model = transformers.PhiForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def gguf_reference_model(path: str, **kwargs):
    """transformers' float32 PyTorch model of a GGUF file (the parity reference), in eval mode."""
    import os

    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, **kwargs).eval()


def torch_logits(model, input_ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(input_ids)),
                    attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)),
                    position_ids=None if position_ids is None else torch.tensor(np.asarray(position_ids)))
    return out.logits.float().numpy()


def save_word_tokenizer(out_dir: str, words) -> None:
    """Saves a whitespace word-level tokenizer (``words[i]`` has id i) into a model folder.

    ``words`` must contain ``[PAD]``, ``[UNK]``, ``<s>`` (added before every
    prompt) and ``</s>`` (EOS), so ``load_model`` finds a tokenizer that text
    data pipelines can use with a tiny random model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(out_dir)


def write_reversal_rows(root, counts, n_words: int, lengths, seed: int = 0) -> None:
    """Writes ``root/<name>.jsonl`` for each ``name, n`` of ``counts``: n rows of the word-reversal task.

    Each prompt is ``lengths[0] .. lengths[1] - 1`` words drawn from ``w0 ..
    w{n_words - 1}``; its answer is the same words reversed (a task a tiny
    model learns). One generator of ``seed`` serves the files in order.
    """
    import json
    import os

    rng = np.random.default_rng(seed)
    for name, n in counts:
        rows = []
        for _ in range(n):
            words = [f"w{j}" for j in rng.integers(0, n_words, rng.integers(*lengths))]
            rows.append({"prompt": " ".join(words), "answer": " ".join(reversed(words))})
        with open(os.path.join(str(root), f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def random_batch(b: int, p: int, a: int, seed: int = 0, min_prompt: int = 1, vocab: int = 64):
    """A padded Bitune batch of random ids: ``[b, p]`` prompts of ``min_prompt .. p`` tokens, ``[b, a]`` answers."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return {"prompt_ids": jnp.asarray(rng.integers(1, vocab, (b, p)), jnp.int32),
            "prompt_len": jnp.asarray(rng.integers(min_prompt, p + 1, b), jnp.int32),
            "answer_ids": jnp.asarray(rng.integers(1, vocab, (b, a)), jnp.int32),
            "answer_len": jnp.asarray(rng.integers(1, a + 1, b), jnp.int32)}


def checkpoint_tree(out_dir: str, step: int):
    """The TrainState of checkpoint ``step`` of a run folder, restored as a tree of numpy arrays."""
    import os

    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(out_dir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), meta)
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=args))


def flat_arrays(tree):
    """``{key path: numpy array}`` of a tree (``jax.tree_util.keystr`` paths)."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def metrics_rows(out_dir: str, drop=("tokens_per_s", "elapsed_s")):
    """The records of a run's ``metrics.jsonl`` without the ``drop`` fields (timings differ between runs)."""
    import json
    import os

    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def reversal_run_folder(root, counts, n_words: int, lengths, seed: int = 0):
    """A tiny random Llama with a word tokenizer (``w0 .. w{n_words - 1}``) in ``root/model`` and the
    word-reversal files of :func:`write_reversal_rows` in ``root``; returns the model folder."""
    import os

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:"] + [f"w{i}" for i in range(n_words)]
    model_dir = os.path.join(str(root), "model")
    tiny_hf_model("llama", model_dir, vocab_size=len(words) + 2)
    save_word_tokenizer(model_dir, words)
    write_reversal_rows(root, counts, n_words=n_words, lengths=lengths, seed=seed)
    return model_dir
