"""An lm-evaluation-harness model backed by bitune-jax (optional: ``pip install lm-eval``).

``BituneLM`` implements the harness's three requests on top of this
package: ``loglikelihood`` groups requests by context and scores every
continuation of a context against one shared Bitune prefill
(:func:`bitune_jax.evaluation.evaluate.score_choices`); ``loglikelihood_rolling`` scores
the harness's disjoint rolling windows the same way; ``generate_until`` calls
:func:`bitune_jax.evaluation.generate.generate` with the request's stop strings.

Tokenization follows :mod:`bitune_jax.data.text`: the context with the
tokenizer's special tokens, the continuation without. As in the harness,
trailing whitespace of a context moves to the front of its continuation, an
empty context becomes the prefix token (BOS, or EOS when the tokenizer has no
BOS), and over-long inputs lose context tokens from the left.

The harness is imported only when ``BituneLM`` is first used, so this module
imports without it; using ``BituneLM`` then raises an ``ImportError`` that
says how to install it. Importing ``BituneLM`` also registers it in the
harness as model ``"bitune_jax"``.

Usage (needs ``pip install lm-eval``, which the test environment does not
install, so this is shown as code rather than run as a doctest; the adapter
itself is tested in ``tests/test_evaluate.py`` when lm-eval is present)::

    import lm_eval
    from bitune_jax.evaluation.lm_eval_adapter import BituneLM

    lm = BituneLM(model="smollm2", adapters="runs/x/adapters")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional

LM_EVAL_INSTALL = "pip install lm-eval"


def _split_trailing_space(context: str, continuation: str):
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


class _BituneLMImpl:
    """Methods of ``BituneLM`` (mixed into ``lm_eval.api.model.LM`` on first use)."""

    def __init__(self, model: Optional[str] = None, adapters: Optional[str] = None, variant: Optional[str] = None,
                 dtype: str = "float32", batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, attention: str = "auto", *, loaded=None, trainable=None, method=None,
                 **_ignored):
        """Either ``model`` (path or packaged name, plus ``adapters``/``variant``) or ``loaded``
        (a :class:`bitune_jax.conversion.LoadedModel`) with ``trainable``/``method``."""
        super().__init__()
        if loaded is None:
            if model is None:
                raise ValueError("BituneLM needs model=<path or name> or loaded=<LoadedModel>")
            from bitune_jax.conversion.adapters import load_with_adapters

            loaded, trainable, method = load_with_adapters(model, adapters, variant, dtype)
        self.model, self.trainable, self.method = loaded, trainable, method
        self.tokenizer = loaded.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or min(loaded.cfg.max_position_embeddings, 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.attention = attention

    # ------------------------------------------------------------------ helpers
    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.bos_token_id if getattr(tok, "bos_token_id", None) is not None else tok.eos_token_id)

    def _encode(self, context: str, continuation: str):
        context, continuation = _split_trailing_space(context, continuation)
        ctx = list(self.tokenizer(context)["input_ids"]) if context else [self.prefix_token_id]
        cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return ctx, cont

    def _score(self, pairs) -> List[tuple]:
        """``(ll, is_greedy)`` per ``(context_ids, continuation_ids)``; shared prefixes per distinct context."""
        from bitune_jax.evaluation.evaluate import score_choices

        groups: Dict[tuple, List[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if cont:
                keep = max(self.max_length - len(cont), 1)
                groups.setdefault(tuple(ctx[-keep:]), []).append(i)
        out = [(0.0, True)] * len(pairs)
        keys = list(groups)
        scores = score_choices(self.model.params, self.model.cfg, [list(k) for k in keys],
                               [[pairs[i][1] for i in groups[k]] for k in keys], self.trainable, self.method,
                               batch_size=self.batch_size, attention=self.attention)
        for k, (ll, greedy) in zip(keys, scores):
            for j, i in enumerate(groups[k]):
                out[i] = (float(ll[j]), bool(greedy[j]))
        return out

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests) -> List[tuple]:
        return self._score([self._encode(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for n, r in enumerate(requests):
            tokens = list(self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"])
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                pairs.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(pairs)):
            totals[n] += ll
        return totals

    def generate_until(self, requests) -> List[str]:
        from bitune_jax.evaluation.generate import generate

        groups: Dict[str, List[int]] = {}
        kwargs_of = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = kw.pop("do_sample", False)
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            spec = dict(stop=tuple(until), max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)),
                        temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                        top_p=float(kw.pop("top_p", 1.0) or 1.0))
            key = repr(sorted(spec.items()))
            kwargs_of[key] = spec
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for key, idx in groups.items():
            gens = generate(self.model.params, self.model.cfg, self.tokenizer, [requests[i].args[0] for i in idx],
                            self.trainable, self.method, batch_size=self.batch_size, attention=self.attention,
                            **kwargs_of[key])
            for i, g in zip(idx, gens):
                out[i] = g.text
        return out


@functools.lru_cache(maxsize=None)
def _build_class():
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError(f"BituneLM needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from e
    cls = type("BituneLM", (_BituneLMImpl, LM), {"__module__": __name__, "__doc__": __doc__})
    try:
        register_model("bitune_jax")(cls)
    except (AssertionError, ValueError):  # already registered (module reloaded)
        pass
    return cls


def __getattr__(name):
    if name == "BituneLM":
        return _build_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
