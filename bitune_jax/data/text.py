"""How text becomes prompt and answer token blocks (the one place this is decided).

A training or scoring example is a prompt and an answer, tokenized separately:

* prompt: ``tokenizer(prompt)`` with the tokenizer's own special tokens (a BOS
  token for tokenizers that add one);
* answer: ``tokenizer(answer, add_special_tokens=False)`` followed by the EOS
  token when ``add_eos`` is True (training does this: the model learns to stop).

The paper's plain format (``format_plain``) builds the strings:
``"Question: {instruction}\\n\\nAnswer:"`` and ``" " + response``.
"""
from __future__ import annotations

from typing import List, Tuple

PLAIN_PROMPT = "Question: {instruction}\n\nAnswer:"


def format_plain(instruction: str, response: str) -> Tuple[str, str]:
    """The reference code's training format: (prompt, answer) strings."""
    return PLAIN_PROMPT.format(instruction=instruction), " " + response


def encode_pair(tokenizer, prompt: str, answer: str, add_eos: bool = True) -> Tuple[List[int], List[int]]:
    """Token ids of a (prompt, answer) pair, following the module rule."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; pass add_eos=False")
        answer_ids.append(int(tokenizer.eos_token_id))
    return prompt_ids, answer_ids
