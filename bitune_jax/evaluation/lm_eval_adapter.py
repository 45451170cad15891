"""An lm-evaluation-harness model backed by bitune-jax (optional: ``pip install 'bitune-jax[eval]'``).

``BituneLM`` implements the harness's three requests on top of this
package: ``loglikelihood`` groups requests by context and scores every
continuation of a context against one shared Bitune prefill
(:func:`bitune_jax.evaluation.evaluate.score_choices`); ``loglikelihood_rolling`` scores
the harness's disjoint rolling windows the same way; ``generate_until`` calls
:func:`bitune_jax.evaluation.generate.generate` with the request's stop strings.
With ``--apply_chat_template`` the harness renders prompts with the
tokenizer's chat template (:meth:`BituneLM.apply_chat_template`).

Tokenization follows :mod:`bitune_jax.data.text`: the context with the
tokenizer's special tokens, the continuation without (so log-likelihoods are
those of ``bitune-jax score`` on the same prompt/answer rows). As in the
harness, trailing whitespace of a context moves to the front of its
continuation, a context that already starts with the BOS text (a rendered
chat template) gets no second BOS, an empty context becomes the prefix token
(BOS, or EOS when the tokenizer has no BOS), and over-long inputs lose context
tokens from the left.

Model arguments (``--model_args k=v,...``): ``model`` (HF folder, ``.gguf`` or
a packaged name such as ``smollm2``), ``adapters`` (an exported adapter
folder), ``variant``, ``dtype``, ``batch_size``, ``max_length``,
``max_gen_toks`` and ``attention``; an unknown key is an error rather than
silently ignored. ``batch_size`` is the harness's ``--batch_size`` too:
``auto``/``auto:N`` (the harness's automatic search, which this model does not
have) means :data:`DEFAULT_BATCH_SIZE`, capped by ``--max_batch_size``; a
``batch_size`` in ``--model_args`` wins over ``--batch_size``. ``--device`` is
ignored: JAX places the model on its default device.

The harness is imported only when ``BituneLM`` is first used, so this module
imports without it; using ``BituneLM`` then raises an ``ImportError`` that
says how to install it. Importing ``BituneLM`` (or calling :func:`register`)
registers it in the harness as model ``"bitune_jax"``. The harness's own
``lm_eval`` command has no plugin mechanism (0.4.x), so from the shell use
``bitune-jax lm-eval`` (same arguments; :mod:`bitune_jax.cli.lm_eval`).

Usage (tested end to end, offline, in ``tests/test_lm_eval.py``; not a
doctest because the harness's packaged tasks download their data)::

    import lm_eval
    from bitune_jax.evaluation.lm_eval_adapter import BituneLM

    lm = BituneLM(model="smollm2", adapters="runs/x/adapters")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Optional, Union

LM_EVAL_INSTALL = "pip install 'bitune-jax[eval]' (lm-eval 0.4.13 is the tested version)"
# The batch size when neither --batch_size nor model_args sets one, and what "auto" means.
DEFAULT_BATCH_SIZE = 8
# Keys the harness itself adds to the model arguments: --device, --max_batch_size, --trust_remote_code.
_HARNESS_KEYS = ("device", "max_batch_size", "trust_remote_code")

log = logging.getLogger(__name__)


def resolve_batch_size(value: Union[int, str, None], max_batch_size: Optional[int] = None) -> int:
    """The batch size for the harness's ``batch_size`` value: an integer, ``auto``/``auto:N`` or None.

    ``auto`` and ``auto:N`` ask the harness's automatic search, which this model
    does not have: they mean :data:`DEFAULT_BATCH_SIZE` (at most
    ``max_batch_size``), and the choice is logged. None is the default too.

    >>> resolve_batch_size("16"), resolve_batch_size(None), resolve_batch_size("auto:4", max_batch_size=2)
    (16, 8, 2)
    """
    if value is None:
        return DEFAULT_BATCH_SIZE
    text = str(value).strip()
    if text == "auto" or text.startswith("auto:"):
        size = min(DEFAULT_BATCH_SIZE, int(max_batch_size)) if max_batch_size else DEFAULT_BATCH_SIZE
        log.warning("batch_size=%s: bitune-jax has no automatic batch-size search; using batch size %d "
                    "(pass --batch_size N to choose)", text, size)
        return size
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"batch_size={value!r}: expected an integer >= 1, 'auto' or 'auto:N'")
    return size


def _split_trailing_space(context: str, continuation: str):
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


class _BituneLMImpl:
    """Methods of ``BituneLM`` (mixed into ``lm_eval.api.model.LM`` on first use)."""

    def __init__(self, model: Optional[str] = None, adapters: Optional[str] = None, variant: Optional[str] = None,
                 dtype: str = "float32", batch_size: Union[int, str, None] = None, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, attention: str = "auto", *, loaded=None, trainable=None, method=None,
                 **harness):
        """Either ``model`` (path or packaged name, plus ``adapters``/``variant``) or ``loaded``
        (a :class:`bitune_jax.conversion.LoadedModel`) with ``trainable``/``method``.

        ``harness`` takes what the harness adds (``device``, ``max_batch_size``,
        ``trust_remote_code``); any other key is an error naming it.
        """
        super().__init__()
        unknown = sorted(set(harness) - set(_HARNESS_KEYS))
        if unknown:
            allowed = "model, adapters, variant, dtype, batch_size, max_length, max_gen_toks, attention"
            raise ValueError(f"bitune_jax model_args: unknown {unknown}; allowed: {allowed}")
        # Checked before the (slow) model load.
        self.batch_size = resolve_batch_size(batch_size, harness.get("max_batch_size"))
        # The harness prints what "auto" became from this: ``batch_size: auto (8)``.
        self.batch_sizes = {"auto": self.batch_size} if str(batch_size).startswith("auto") else {}
        if loaded is None:
            if model is None:
                raise ValueError("BituneLM needs model=<path or name> or loaded=<LoadedModel>")
            from bitune_jax.conversion.adapters import load_with_adapters

            loaded, trainable, method = load_with_adapters(model, adapters, variant, dtype)
        self.model, self.trainable, self.method = loaded, trainable, method
        self.tokenizer = loaded.tokenizer
        self.max_length = int(max_length or min(loaded.cfg.max_position_embeddings, 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.attention = attention

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """The harness's constructor: ``--model_args`` over its own settings (``--batch_size`` etc.).

        The harness's version passes both as keywords, so a ``batch_size`` in
        ``--model_args`` would collide with ``--batch_size`` (always set by its CLI).
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """``create_from_arg_obj`` for ``"key=value,key=value"`` model arguments."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ helpers
    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.bos_token_id if getattr(tok, "bos_token_id", None) is not None else tok.eos_token_id)

    def _context_ids(self, context: str) -> List[int]:
        """``context`` with the tokenizer's special tokens, unless it already starts with the BOS text."""
        bos = getattr(self.tokenizer, "bos_token", None)
        if isinstance(bos, str) and bos and context.startswith(bos):
            return list(self.tokenizer(context, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(context)["input_ids"])

    def _encode(self, context: str, continuation: str):
        context, continuation = _split_trailing_space(context, continuation)
        ctx = self._context_ids(context) if context else [self.prefix_token_id]
        cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return ctx, cont

    def _score(self, pairs) -> List[tuple]:
        """``(ll, is_greedy)`` per ``(context_ids, continuation_ids)``; shared prefixes per distinct context."""
        from bitune_jax.evaluation.evaluate import score_choices

        groups: Dict[tuple, List[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if cont:
                # The model reads context + continuation[:-1]: at most max_length tokens, as in the harness's
                # hf model (its rolling windows are cut for exactly that).
                keep = max(self.max_length + 1 - len(cont), 1)
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

    # ------------------------------------------------------------------ chat templates
    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in the harness's request-cache keys."""
        name = getattr(self.tokenizer, "name_or_path", None) or self.model.source
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        """The tokenizer's chat template (None when ``chat_template`` is False); an error when it has none."""
        if not chat_template:
            return None
        if isinstance(chat_template, str):
            raise ValueError(f"--apply_chat_template {chat_template}: named chat templates are not supported; "
                             "pass --apply_chat_template alone to use the tokenizer's template")
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"--apply_chat_template: the tokenizer of {self.model.source} has no chat template")
        return template

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``chat_history`` (``[{"role": ..., "content": ...}]``) rendered with the tokenizer's chat template.

        Without ``add_generation_prompt`` the last (assistant) message is left open,
        as the harness wants for a prefilled answer.
        """
        import jinja2

        def render(messages):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            # Some templates (Gemma's) reject a system turn; the harness's hf model drops it too.
            log.warning("the chat template failed; retrying without the system message")
            return render([m for m in chat_history if m["role"] != "system"])

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
            # Prompts lose context tokens from the left so that prompt + answer fit in max_length.
            keep = max(self.max_length - kwargs_of[key]["max_new_tokens"], 1)
            prompts = [self._context_ids(requests[i].args[0])[-keep:] for i in idx]
            gens = generate(self.model.params, self.model.cfg, self.tokenizer, prompts, self.trainable, self.method,
                            batch_size=self.batch_size, attention=self.attention, **kwargs_of[key])
            for i, g in zip(idx, gens):
                out[i] = g.text
        return out


@functools.lru_cache(maxsize=None)
def _build_class():
    try:
        import lm_eval.models  # noqa: F401  (the harness's own models; it loads them only into an empty registry)
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


def register() -> None:
    """Makes ``bitune_jax`` a model name of the harness in this process (``--model bitune_jax``).

    Raises ``ImportError`` naming the install command when the harness is missing.
    """
    _build_class()


def __getattr__(name):
    if name == "BituneLM":
        return _build_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
