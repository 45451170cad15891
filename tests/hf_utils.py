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
