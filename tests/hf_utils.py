"""Helpers shared by tests: tiny random transformers models saved to disk."""
from __future__ import annotations

import os

import numpy as np


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
    else:
        raise ValueError(kind)
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def torch_logits(model, input_ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(input_ids)),
                    attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)),
                    position_ids=None if position_ids is None else torch.tensor(np.asarray(position_ids)))
    return out.logits.float().numpy()
