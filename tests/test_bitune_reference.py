"""Bitune against an independent PyTorch reference built on ``transformers``.

The reference runs the five steps of docs/method.md literally, one
example at a time, on a tiny random HF model (float32, eager attention):

(a) a cached causal prefill over ``x[0..L-1)`` with adapter set C
    (``use_cache=True``, keep ``past_key_values``);
(b) a second prefill over the same span with set B and a 4D float mask of
    zeros (nothing masked: bidirectional);
(c) per layer ``alpha = |theta| / (theta_init + |theta|)`` and
    ``K = (1 - alpha_k) K_c + alpha_k K_b`` (same for V), written into a fresh
    ``DynamicCache``;
(d) the answer pass over ``[x[L-1], y[0..M-1)]`` with set C attending to the
    mixed cache; cross-entropy on ``y``.

The loss is the mean over examples of each example's mean answer NLL. Every
variant of ``bitune.VARIANTS`` only changes which prefills run with which
mask and set, and whether the cache is mixed. LoRA is applied by wrapping
each ``nn.Linear`` forward of q, k, v, o, gate, up, down with
``W x + b + s * B(A(x))`` using torch tensors made from the same numbers as
our JAX adapter pytrees; DoRA and IA3 use the ``peft`` library itself (two
adapters, switched between passes). Loss and gradients with respect to both
adapter sets and theta must agree with ``bitune.loss_fn``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bitune_jax import bitune  # noqa: E402
from bitune_jax.model import peft as peft_lib  # noqa: E402
from bitune_jax.conversion.hf import load_hf  # noqa: E402
from bitune_jax.conversion import families  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

LOSS_TOL = 1e-4
GRAD_RTOL = 1e-4
RANK, ALPHA = 4, 8.0
THETA_INIT = 0.01
# (prompt length, answer length): includes a length-1 prompt (empty prefill span)
# and a length-1 answer.
EXAMPLES = ((6, 3), (1, 4), (3, 1))


# --------------------------------------------------------------------------- fixtures
_MODELS = {}


def _model(kind: str, tmp_path_factory):
    """(model dir, torch model, our base params, our config) for a tiny random HF model, built once."""
    if kind not in _MODELS:
        tmp = str(tmp_path_factory.mktemp(kind))
        tiny_hf_model(kind, tmp, seed=1 if kind == "qwen2" else 0)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                                         dtype=torch.float32)
        torch_model.eval()
        for p in torch_model.parameters():
            p.requires_grad_(False)
        base, cfg = load_hf(tmp)
        _MODELS[kind] = (tmp, torch_model, base, cfg)
    return _MODELS[kind]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    return _model(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model("llama", tmp_path_factory)


def _examples(vocab, spec=EXAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, size=lp).astype(np.int32), rng.integers(1, vocab, size=la).astype(np.int32))
            for lp, la in spec]


def _batch(examples):
    p = max(len(x) for x, _ in examples)
    a = max(len(y) for _, y in examples)
    prompt = np.zeros((len(examples), p), np.int32)
    answer = np.zeros((len(examples), a), np.int32)
    for i, (x, y) in enumerate(examples):
        prompt[i, :len(x)] = x
        answer[i, :len(y)] = y
    return {"prompt_ids": jnp.asarray(prompt), "prompt_len": jnp.asarray([len(x) for x, _ in examples], jnp.int32),
            "answer_ids": jnp.asarray(answer), "answer_len": jnp.asarray([len(y) for _, y in examples], jnp.int32)}


def _adapter_set(cfg, peft_cfg, seed):
    """Random non-trivial adapter set (numpy) in our layout: non-zero LoRA B, IA3 scales != 1."""
    rng = np.random.default_rng(seed)
    L = cfg.num_layers
    out = {}
    for name in peft_cfg.target_names(cfg):
        fi, fo = cfg.projection_shape(name)
        if peft_cfg.method == "ia3":
            size = fi if name in peft_lib.IA3_FEEDFORWARD else fo
            out[name] = {"scale": (1.0 + 0.3 * rng.standard_normal((L, size))).astype(np.float32)}
            continue
        entry = {"lora_a": (rng.standard_normal((L, fi, peft_cfg.rank)) / np.sqrt(fi)).astype(np.float32),
                 "lora_b": (0.1 * rng.standard_normal((L, peft_cfg.rank, fo))).astype(np.float32)}
        if peft_cfg.method == "dora":
            entry["magnitude"] = (0.5 + rng.random((L, fo))).astype(np.float32)
        out[name] = entry
    return out


def _trainable(cfg, method, seed=0):
    """Numpy trainable dict holding every set the variant has (B differs from C)."""
    tr = {name: _adapter_set(cfg, method.peft, seed + 10 * i) for i, name in enumerate(method.adapter_sets)}
    if method.mixed:
        rng = np.random.default_rng(seed + 99)
        # Distinct per layer and per K/V, some negative (|theta| is what counts).
        tr["mix"] = {"theta_k": (0.02 * rng.standard_normal(cfg.num_layers)).astype(np.float32),
                     "theta_v": (0.02 * rng.standard_normal(cfg.num_layers)).astype(np.float32)}
    return tr


# --------------------------------------------------------------------------- JAX side
# XLA:CPU compile time dominates this file, so each test compiles one function
# computing everything it needs, without backend optimisations (float32
# numerics are unaffected).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run_jit(fn, *args):
    return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _value_and_grad(cfg, method, trainable, base, batch):
    return jax.value_and_grad(lambda tr: bitune.loss_fn(tr, base, cfg, method, batch)[0])(trainable)


def _loss(cfg, method, trainable, base, batch):
    return bitune.loss_fn(trainable, base, cfg, method, batch)[0]


# --------------------------------------------------------------------------- torch reference
class ManualLoRA:
    """Wraps each targeted ``nn.Linear`` forward as ``W x + b + s * (x A) B`` with the active set."""

    def __init__(self, torch_model, cfg, scaling):
        self.active = None
        self.scaling = scaling
        fam = families.family_of_config(cfg)
        for l in range(cfg.num_layers):
            for name, path in fam.hf_modules.items():
                if name not in cfg.projections:
                    continue
                mod = torch_model.get_submodule(fam.hf_layer_prefix.format(i=l) + path)
                assert isinstance(mod, torch.nn.Linear)
                mod.forward = functools.partial(self._forward, mod, l, name)

    def _forward(self, mod, l, name, x):
        y = torch.nn.functional.linear(x, mod.weight, mod.bias)
        ad = self.active
        if ad is not None and name in ad:
            y = y + self.scaling * ((x @ ad[name]["lora_a"][l]) @ ad[name]["lora_b"][l])
        return y

    def activate(self, sets, name):
        self.active = sets[name]


def _torch_tree(tree):
    return jax.tree_util.tree_map(lambda a: torch.tensor(np.asarray(a), requires_grad=True), tree)


def _alpha(theta):
    return theta.abs() / (THETA_INIT + theta.abs())


def reference_loss(torch_model, activate, mix, method, examples):
    """Mean over examples of the mean answer NLL, following the five steps literally.

    ``activate(name)`` selects adapter set ``name`` ("causal" or "bidir") for
    the next forward; ``mix`` holds torch ``theta_k``/``theta_v``.
    """
    inner = torch_model.model
    n_layers = torch_model.config.num_hidden_layers
    losses = []
    for x, y in examples:
        L = len(x)
        cache = None
        if L > 1:
            pre = torch.tensor(x[None, :L - 1].astype(np.int64))
            caches = []
            for causal, set_name in method.prompt_streams:
                activate(set_name)
                mask = None if causal else torch.zeros(1, 1, L - 1, L - 1)  # 4D float mask: nothing masked
                out = inner(input_ids=pre, attention_mask=mask, use_cache=True)
                caches.append(out.past_key_values)
            cache = transformers.DynamicCache(config=torch_model.config)
            for l in range(n_layers):
                k, v = caches[0].layers[l].keys, caches[0].layers[l].values
                if method.mixed:
                    kb, vb = caches[1].layers[l].keys, caches[1].layers[l].values
                    ak, av = _alpha(mix["theta_k"][l]), _alpha(mix["theta_v"][l])
                    k = (1 - ak) * k + ak * kb
                    v = (1 - av) * v + av * vb
                cache.update(k, v, l)
            assert cache.get_seq_length() == L - 1
        activate("causal")
        feed = torch.tensor(np.concatenate([x[L - 1:], y[:-1]])[None].astype(np.int64))
        out = torch_model(input_ids=feed, past_key_values=cache, use_cache=cache is not None)
        losses.append(torch.nn.functional.cross_entropy(out.logits[0], torch.tensor(y.astype(np.int64))))
    return torch.stack(losses).mean()


def _assert_grads_close(g_jax, g_torch, what):
    flat_j = jax.tree_util.tree_flatten_with_path(g_jax)[0]
    flat_t = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(g_torch)[0])
    assert len(flat_j) == len(flat_t), what
    worst = 0.0
    for path, gj in flat_j:
        gt = flat_t[jax.tree_util.keystr(path)]
        gj = np.asarray(gj)
        scale = np.max(np.abs(gt))
        diff = np.max(np.abs(gj - gt))
        worst = max(worst, diff / (scale + 1e-12))
        assert diff <= GRAD_RTOL * scale + 1e-6, (
            f"{what}: grad {jax.tree_util.keystr(path)} max|diff|={diff:.3e} vs max|g|={scale:.3e}")
    return worst


def _grads_of(tree):
    return jax.tree_util.tree_map(lambda t: np.zeros(t.shape, np.float32) if t.grad is None else t.grad.numpy(), tree)


def _nonzero(tree):
    return all(float(np.max(np.abs(np.asarray(a)))) > 0 for a in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- LoRA: every variant, both families
def _lora_method(variant):
    return bitune.MethodConfig(variant=variant, peft=peft_lib.PeftConfig("lora", rank=RANK, alpha=ALPHA),
                               theta_init=THETA_INIT)


_JAX_RESULTS = {}


def _jax_all_variants(cfg, base, examples):
    """JAX (loss, grads) of every variant, one compile per model."""
    if cfg not in _JAX_RESULTS:
        methods = [_lora_method(v) for v in bitune.VARIANTS]
        trs = [jax.tree_util.tree_map(jnp.asarray, _trainable(cfg, m)) for m in methods]
        out = _run_jit(lambda trs, base, batch: [_value_and_grad(cfg, m, tr, base, batch)
                                                 for m, tr in zip(methods, trs)], trs, base, _batch(examples))
        _JAX_RESULTS[cfg] = dict(zip(bitune.VARIANTS, out))
    return _JAX_RESULTS[cfg]


@pytest.mark.parametrize("variant", bitune.VARIANTS)
def test_lora_matches_torch_reference(model, variant):
    _, torch_model, base, cfg = model
    method = _lora_method(variant)
    tr_np = _trainable(cfg, method)
    examples = _examples(cfg.vocab_size)
    loss_j, g_j = _jax_all_variants(cfg, base, examples)[variant]

    lora = ManualLoRA(torch_model, cfg, method.peft.scaling)
    sets = _torch_tree({k: v for k, v in tr_np.items() if k != "mix"})
    mix = _torch_tree(tr_np["mix"]) if method.mixed else None
    loss_t = reference_loss(torch_model, lambda name: lora.activate(sets, name), mix, method, examples)
    loss_t.backward()
    g_t = _grads_of({**sets, **({"mix": mix} if mix is not None else {})})

    assert abs(float(loss_j) - loss_t.item()) <= LOSS_TOL, (float(loss_j), loss_t.item())
    worst = _assert_grads_close(g_j, g_t, f"{cfg.family}/{variant}")
    print(f"{cfg.family}/{variant}: |dloss| {abs(float(loss_j) - loss_t.item()):.2e}, "
          f"max relative grad diff {worst:.2e}")

    # Gradients exist only for the trainable dict (no base leaves), and each trained
    # part gets a non-zero gradient.
    assert jax.tree_util.tree_structure(g_j) == jax.tree_util.tree_structure(tr_np)
    assert set(g_j) == set(method.adapter_sets) | ({"mix"} if method.mixed else set())
    assert "base" not in g_j and "embed" not in g_j and "layers" not in g_j
    for name in method.adapter_sets:
        assert _nonzero(g_j[name]), (variant, name)
    if method.mixed:
        assert _nonzero(g_j["mix"]), variant


# --------------------------------------------------------------------------- batch invariance, alpha = 0
def test_batch_loss_is_mean_of_single_example_losses(llama):
    _, _, base, cfg = llama
    method = bitune.MethodConfig(variant="bitune", peft=peft_lib.PeftConfig("lora", rank=RANK, alpha=ALPHA),
                                 theta_init=THETA_INIT)
    tr = jax.tree_util.tree_map(jnp.asarray, _trainable(cfg, method, seed=3))
    examples = _examples(cfg.vocab_size, spec=((7, 2), (2, 5), (1, 3), (4, 4)), seed=5)
    # Batch, each example alone (unpadded), and the batch plus a zero-length answer
    # row (batch padding), all in one compile.
    batches = [_batch(examples)] + [_batch([ex]) for ex in examples] + [
        _batch(examples + [(examples[0][0], np.zeros((0,), np.int32))])]
    losses = [float(l) for l in _run_jit(lambda tr, base, bs: [_loss(cfg, method, tr, base, b) for b in bs],
                                         tr, base, batches)]
    batch_loss, singles, padded = losses[0], losses[1:-1], losses[-1]
    assert abs(batch_loss - np.mean(singles)) <= 1e-5, (batch_loss, singles)
    assert abs(padded - batch_loss) <= 1e-5, (padded, batch_loss)


def test_shared_sets_and_alpha_zero_equal_lora(llama):
    _, _, base, cfg = llama
    pc = peft_lib.PeftConfig("lora", rank=RANK, alpha=ALPHA)
    bit = bitune.MethodConfig(variant="bitune", peft=pc, theta_init=THETA_INIT)
    lora = bitune.MethodConfig(variant="lora", peft=pc, theta_init=THETA_INIT)
    c = jax.tree_util.tree_map(jnp.asarray, _adapter_set(cfg, pc, seed=7))
    zeros = jnp.zeros((cfg.num_layers,), jnp.float32)
    tr_bit = {"causal": c, "bidir": c, "mix": {"theta_k": zeros, "theta_v": zeros}}
    batch = _batch(_examples(cfg.vocab_size, seed=2))
    l_bit, l_lora = (float(l) for l in _run_jit(
        lambda a, b, base, batch: (_loss(cfg, bit, a, base, batch), _loss(cfg, lora, b, base, batch)),
        tr_bit, {"causal": c}, base, batch))
    assert abs(l_bit - l_lora) <= 1e-6, (l_bit, l_lora)


# --------------------------------------------------------------------------- DoRA / IA3 via the peft library
def _peft_config(pc: peft_lib.PeftConfig, cfg):
    import peft

    fam = families.family_of_config(cfg)
    targets = [fam.hf_modules[n].split(".")[-1] for n in pc.target_names(cfg)]
    if pc.method == "ia3":
        ff = [fam.hf_modules[n].split(".")[-1] for n in pc.target_names(cfg) if n in peft_lib.IA3_FEEDFORWARD]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)
    return peft.LoraConfig(r=pc.rank, lora_alpha=pc.alpha, target_modules=targets, lora_dropout=0.0,
                           use_dora=pc.method == "dora", init_lora_weights=False)


def _peft_model(tmp, cfg, pc, tr_np):
    """A fresh torch model with one peft adapter per set, weights copied from our pytrees.

    Returns ``(peft_model, params)`` where ``params[set][proj][leaf]`` is the
    list (over layers) of the torch parameters holding that leaf.
    """
    import peft

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                                     dtype=torch.float32)
    torch_model.eval()
    sets = [k for k in tr_np if k != "mix"]
    pm = peft.get_peft_model(torch_model, _peft_config(pc, cfg), adapter_name=sets[0])
    for name in sets[1:]:
        pm.add_adapter(name, _peft_config(pc, cfg))
    pm.eval()
    fam = families.family_of_config(cfg)
    params = {}
    with torch.no_grad():
        for name in sets:
            params[name] = {}
            for proj, entry in tr_np[name].items():
                params[name][proj] = {}
                for l in range(cfg.num_layers):
                    mod = pm.base_model.model.get_submodule(fam.hf_layer_prefix.format(i=l) + fam.hf_modules[proj])
                    if pc.method == "ia3":
                        p = mod.ia3_l[name]
                        p.copy_(torch.tensor(entry["scale"][l]).reshape(p.shape))
                        params[name][proj].setdefault("scale", []).append(p)
                        continue
                    pa, pb = mod.lora_A[name].weight, mod.lora_B[name].weight
                    pa.copy_(torch.tensor(entry["lora_a"][l].T))
                    pb.copy_(torch.tensor(entry["lora_b"][l].T))
                    params[name][proj].setdefault("lora_a", []).append(pa)
                    params[name][proj].setdefault("lora_b", []).append(pb)
                    if pc.method == "dora":
                        pm_ = mod.lora_magnitude_vector[name].weight
                        pm_.copy_(torch.tensor(entry["magnitude"][l]))
                        params[name][proj].setdefault("magnitude", []).append(pm_)
    return pm, params


def _peft_activate(pm, params, name):
    pm.base_model.set_adapter(name)
    # set_adapter freezes the inactive adapters; keep every adapter trainable so
    # gradients from earlier passes reach them.
    for p in jax.tree_util.tree_leaves(params, is_leaf=lambda t: isinstance(t, torch.Tensor)):
        p.requires_grad_(True)


def _peft_grads(params):
    def stack(leaf, ps):
        gs = [np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy() for p in ps]
        if leaf in ("lora_a", "lora_b"):
            return np.stack([g.T for g in gs])
        return np.stack([g.reshape(-1) for g in gs])

    return {s: {proj: {leaf: stack(leaf, ps) for leaf, ps in d.items()} for proj, d in e.items()}
            for s, e in params.items()}


@pytest.mark.parametrize("method_name", ["dora", "ia3"])
def test_dora_ia3_match_peft_library(method_name, llama):
    pytest.importorskip("peft")
    tmp, _, base, cfg = llama
    pc = (peft_lib.PeftConfig("dora", rank=RANK, alpha=ALPHA) if method_name == "dora"
          else peft_lib.PeftConfig("ia3"))
    examples = _examples(cfg.vocab_size, seed=4)

    # 1. The `lora` variant (one set) equals peft's plain causal LM loss on prompt + answer.
    lora_m = bitune.MethodConfig(variant="lora", peft=pc, theta_init=THETA_INIT)
    tr1 = _trainable(cfg, lora_m, seed=11)
    pm1, _ = _peft_model(tmp, cfg, pc, tr1)
    method = bitune.MethodConfig(variant="bitune", peft=pc, theta_init=THETA_INIT)
    tr = _trainable(cfg, method, seed=21)
    loss_j1, (loss_j, g_j) = _run_jit(
        lambda tr1, tr, base, batch: (_loss(cfg, lora_m, tr1, base, batch),
                                      _value_and_grad(cfg, method, tr, base, batch)),
        *jax.tree_util.tree_map(jnp.asarray, (tr1, tr)), base, _batch(examples))
    loss_j1 = float(loss_j1)
    per = []
    with torch.no_grad():
        for x, y in examples:
            ids = torch.tensor(np.concatenate([x, y])[None].astype(np.int64))
            logits = pm1(input_ids=ids).logits[0]
            per.append(torch.nn.functional.cross_entropy(logits[len(x) - 1:-1], torch.tensor(y.astype(np.int64))))
    loss_t1 = float(torch.stack(per).mean())
    print(f"{method_name} lora variant vs peft: |dloss| {abs(loss_j1 - loss_t1):.2e}")
    assert abs(loss_j1 - loss_t1) <= LOSS_TOL, (loss_j1, loss_t1)

    # 2. Full Bitune (two peft adapters switched between passes): loss and gradients.
    pm, params = _peft_model(tmp, cfg, pc, tr)
    mix = _torch_tree(tr["mix"])
    loss_t = reference_loss(pm.base_model.model, lambda name: _peft_activate(pm, params, name), mix,
                            method, examples)
    loss_t.backward()
    g_t = {**_peft_grads(params), "mix": _grads_of(mix)}
    assert abs(float(loss_j) - loss_t.item()) <= LOSS_TOL, (float(loss_j), loss_t.item())
    worst = _assert_grads_close(g_j, g_t, f"{method_name}/bitune")
    print(f"{method_name} bitune vs peft reference: |dloss| {abs(float(loss_j) - loss_t.item()):.2e}, "
          f"max relative grad diff {worst:.2e}")
    for name in ("causal", "bidir", "mix"):
        assert _nonzero(g_j[name]), name
