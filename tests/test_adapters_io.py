"""Adapter export/import in the PEFT layout (``bitune_jax.conversion.adapters``).

1. export -> import round-trips bitwise for LoRA, DoRA and IA3 and every
   variant's set structure; exports are atomic.
2. Adapters made by the ``peft`` library on a tiny random PyTorch Llama
   (``save_pretrained``) import into ours and give the same per-example answer
   NLL as the PyTorch peft model.
3. Our exported ``causal/`` (and ``bidirectional/``) folders load with
   ``peft.PeftModel.from_pretrained`` and give the same NLL as ours.
4. Clear errors for broken directories.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitune_jax.conversion import adapters as io
from bitune_jax import bitune
from bitune_jax.model import peft as peft_lib
from bitune_jax.conversion.hf import load_hf
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import init_params

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8)
PEFTS = {
    "lora": peft_lib.PeftConfig("lora", rank=4, alpha=8.0),
    "dora": peft_lib.PeftConfig("dora", rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
    "ia3": peft_lib.PeftConfig("ia3"),
}


def _random_trainable(cfg, method, seed=0, dtype=np.float32):
    """Every leaf random (non-zero LoRA B, IA3 scales != 1, theta distinct per layer)."""
    rng = np.random.default_rng(seed)
    base = init_params(jax.random.PRNGKey(seed), cfg) if method.peft.method == "dora" else None
    tr = bitune.init_trainable(jax.random.PRNGKey(seed), cfg, method, base)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.2 * rng.standard_normal(a.shape).astype(np.float32), dtype), tr)


def _leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# --------------------------------------------------------------------------- 1. round trip
@pytest.mark.parametrize("method_name", sorted(PEFTS))
@pytest.mark.parametrize("variant", bitune.VARIANTS)
def test_round_trip_is_bitwise(tmp_path, method_name, variant):
    method = bitune.MethodConfig(variant=variant, peft=PEFTS[method_name], theta_init=0.02)
    tr = _random_trainable(CFG, method, seed=3)
    out = io.export_adapters(str(tmp_path / "ad"), tr, CFG, method, "tiny-llama")
    files = sorted(os.listdir(out))
    want = ["bitune.json", "causal"] + (["bidirectional"] if "bidir" in method.adapter_sets else []) + (
        ["mixing.safetensors"] if method.mixed else [])
    assert files == sorted(want)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temp dirs left behind
    tr2, method2 = io.import_adapters(out, CFG)
    assert method2 == method
    _leaves_equal(tr, tr2)
    mixing = load_file(os.path.join(out, "mixing.safetensors")) if method.mixed else None
    if mixing is not None:
        assert mixing["theta_init"].shape == (1,) and mixing["theta_init"].dtype == np.float32
        assert mixing["theta_k"].shape == (CFG.num_layers,)


def test_round_trip_bfloat16_and_target_subset(tmp_path):
    method = bitune.MethodConfig(variant="bitune", peft=peft_lib.PeftConfig("lora", rank=2, alpha=3.5,
                                                                            targets=("k_proj", "up_proj")))
    tr = _random_trainable(CFG, method, seed=1)
    tr = {k: (jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), v) if k != "mix" else v)
          for k, v in tr.items()}
    out = io.export_adapters(str(tmp_path / "ad"), tr, CFG, method, "x")
    tr2, method2 = io.import_adapters(out, CFG)
    assert method2 == method
    _leaves_equal(tr, tr2)
    cfg_json = json.load(open(os.path.join(out, "causal", "adapter_config.json")))
    assert cfg_json["target_modules"] == ["k_proj", "up_proj"]
    assert cfg_json["peft_type"] == "LORA" and cfg_json["r"] == 2 and cfg_json["lora_alpha"] == 3.5


def test_peft_key_names_and_shapes(tmp_path):
    for name, pc in PEFTS.items():
        method = bitune.MethodConfig(variant="lora", peft=pc)
        tr = _random_trainable(CFG, method)
        out = io.export_adapters(str(tmp_path / name), tr, CFG, method, "base")
        t = load_file(os.path.join(out, "causal", "adapter_model.safetensors"))
        p = "base_model.model.model.layers.1."
        if name == "ia3":
            assert t[p + "self_attn.k_proj.ia3_l"].shape == (16, 1)
            assert t[p + "mlp.down_proj.ia3_l"].shape == (1, 48)
            np.testing.assert_array_equal(t[p + "mlp.down_proj.ia3_l"][0], tr["causal"]["down_proj"]["scale"][1])
        else:
            a = t[p + "self_attn.q_proj.lora_A.weight"]
            b = t[p + "self_attn.q_proj.lora_B.weight"]
            assert a.shape == (4, 32) and b.shape == (32, 4)
            np.testing.assert_array_equal(a, np.asarray(tr["causal"]["q_proj"]["lora_a"][1]).T)
            np.testing.assert_array_equal(b, np.asarray(tr["causal"]["q_proj"]["lora_b"][1]).T)
            if name == "dora":
                assert t[p + "mlp.down_proj.lora_magnitude_vector"].shape == (32,)
                assert not any("gate_proj" in k for k in t)
        meta = json.load(open(os.path.join(out, "bitune.json")))
        assert meta["variant"] == "lora" and meta["base_model_name_or_path"] == "base"


def test_export_is_atomic_and_replaces_only_exports(tmp_path, monkeypatch):
    method = bitune.MethodConfig(variant="bitune", peft=PEFTS["lora"])
    tr = _random_trainable(CFG, method, seed=1)
    target = str(tmp_path / "ad")
    io.export_adapters(target, tr, CFG, method, "b")
    tr_new = _random_trainable(CFG, method, seed=2)

    # A failure half-way leaves the earlier export untouched and no temp dirs.
    calls = {"n": 0}
    real_save = io.save_file

    def failing_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*a, **k)

    monkeypatch.setattr(io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.export_adapters(target, tr_new, CFG, method, "b")
    monkeypatch.setattr(io, "save_file", real_save)
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    _leaves_equal(io.import_adapters(target, CFG)[0], tr)

    # A fresh failure leaves nothing at all.
    monkeypatch.setattr(io, "save_file", failing_save)
    calls["n"] = 0
    with pytest.raises(OSError):
        io.export_adapters(str(tmp_path / "fresh"), tr_new, CFG, method, "b")
    monkeypatch.setattr(io, "save_file", real_save)
    assert sorted(os.listdir(tmp_path)) == ["ad"]

    # A successful re-export replaces the earlier one.
    io.export_adapters(target, tr_new, CFG, method, "b")
    _leaves_equal(io.import_adapters(target, CFG)[0], tr_new)
    assert sorted(os.listdir(tmp_path)) == ["ad"]

    # Directories that are not exports are never replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an adapter export"):
        io.export_adapters(str(other), tr, CFG, method, "b")
    assert os.listdir(other) == ["keep.txt"]

    # Wrong structure is refused before anything is written.
    with pytest.raises(ValueError, match="needs exactly"):
        io.export_adapters(str(tmp_path / "bad"), {"causal": tr["causal"]}, CFG, method, "b")
    bad = dict(tr, causal=dict(tr["causal"], q_proj={"lora_a": tr["causal"]["q_proj"]["lora_a"][:, :, :2],
                                                     "lora_b": tr["causal"]["q_proj"]["lora_b"]}))
    with pytest.raises(ValueError, match="q_proj/lora_a: shape"):
        io.export_adapters(str(tmp_path / "bad"), bad, CFG, method, "b")
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- 4. errors
def _export(tmp_path, variant="bitune", method_name="lora", name="ad"):
    method = bitune.MethodConfig(variant=variant, peft=PEFTS[method_name])
    return io.export_adapters(str(tmp_path / name), _random_trainable(CFG, method), CFG, method, "b")


def test_import_errors(tmp_path):
    with pytest.raises(io.AdapterFileError, match="adapter directory is missing"):
        io.import_adapters(str(tmp_path / "nope"), CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.AdapterFileError, match="neither bitune.json nor adapter_config.json"):
        io.import_adapters(str(tmp_path / "empty"), CFG)

    d = _export(tmp_path, name="a1")
    os.remove(os.path.join(d, "causal", "adapter_config.json"))
    with pytest.raises(io.AdapterFileError, match=r"causal/adapter_config.json: file is missing"):
        io.import_adapters(d, CFG)

    d = _export(tmp_path, name="a2")
    os.remove(os.path.join(d, "bidirectional", "adapter_model.safetensors"))
    with pytest.raises(io.AdapterFileError, match=r"bidirectional/adapter_model.safetensors: file is missing"):
        io.import_adapters(d, CFG)

    d = _export(tmp_path, name="a3")
    shutil.rmtree(os.path.join(d, "bidirectional"))
    with pytest.raises(io.AdapterFileError, match=r"bidirectional: folder is missing"):
        io.import_adapters(d, CFG)

    d = _export(tmp_path, name="a4")
    os.remove(os.path.join(d, "mixing.safetensors"))
    with pytest.raises(io.AdapterFileError, match=r"mixing.safetensors: file is missing"):
        io.import_adapters(d, CFG)

    # Unknown tensor.
    d = _export(tmp_path, name="a5")
    f = os.path.join(d, "causal", "adapter_model.safetensors")
    t = load_file(f)
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(t, f)
    with pytest.raises(io.AdapterFileError, match=r"adapter_model.safetensors: unknown tensors.*lm_head"):
        io.import_adapters(d, CFG)

    # Missing tensor.
    d = _export(tmp_path, name="a6")
    f = os.path.join(d, "causal", "adapter_model.safetensors")
    t = load_file(f)
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    del t[key]
    save_file(t, f)
    with pytest.raises(io.AdapterFileError, match=f"tensor '{key}' is missing"):
        io.import_adapters(d, CFG)

    # Shape mismatch: the same adapters into a model of another width.
    d = _export(tmp_path, name="a7")
    with pytest.raises(io.AdapterFileError, match=r"q_proj.lora_A.weight' has shape \(4, 32\), expected \(4, 40\)"):
        io.import_adapters(d, CFG.replace(hidden_size=40))
    with pytest.raises(io.AdapterFileError, match="exported for 3 layers"):
        io.import_adapters(d, CFG.replace(num_layers=4))

    # Unsupported peft_type, target module not in the model, unsupported options.
    def edit(d, set_dir, **changes):
        p = os.path.join(d, set_dir, "adapter_config.json")
        c = json.load(open(p))
        c.update(changes)
        json.dump(c, open(p, "w"))

    d = _export(tmp_path, name="a8")
    edit(d, "causal", peft_type="LOHA")
    with pytest.raises(io.AdapterFileError, match=r"causal/adapter_config.json: peft_type 'LOHA' is not supported"):
        io.import_adapters(d, CFG)
    d = _export(tmp_path, name="a9")
    edit(d, "bidirectional", target_modules=["q_proj", "c_attn"])
    with pytest.raises(io.AdapterFileError, match=r"bidirectional/adapter_config.json: target module 'c_attn'"):
        io.import_adapters(d, CFG)
    plain_mlp = CFG.replace(mlp_type="plain")  # no gate_proj
    with pytest.raises(io.AdapterFileError, match="target module 'gate_proj' is not a projection"):
        io.import_adapters(_export(tmp_path, name="a10"), plain_mlp)
    d = _export(tmp_path, name="a11")
    edit(d, "causal", layers_to_transform=[0, 1])
    with pytest.raises(io.AdapterFileError, match="layers_to_transform"):
        io.import_adapters(d, CFG)
    d = _export(tmp_path, name="a12")
    edit(d, "bidirectional", r=8)
    with pytest.raises(io.AdapterFileError, match="lora_A.weight' has shape"):
        io.import_adapters(d, CFG)

    # bitune.json problems and leftover sets.
    d = _export(tmp_path, name="a13")
    meta = json.load(open(os.path.join(d, "bitune.json")))
    json.dump(dict(meta, variant="trinune"), open(os.path.join(d, "bitune.json"), "w"))
    with pytest.raises(io.AdapterFileError, match=r"bitune.json: variant 'trinune'"):
        io.import_adapters(d, CFG)
    d = _export(tmp_path, name="a14")
    json.dump(dict(meta, variant="no_mixing"), open(os.path.join(d, "bitune.json"), "w"))
    with pytest.raises(io.AdapterFileError, match="does not mix"):
        io.import_adapters(d, CFG)


def test_load_for_scoring(tmp_path):
    d = _export(tmp_path, name="bit")
    tr, m = io.load_adapters_for_scoring(d, CFG)
    assert m.variant == "bitune" and set(tr) == {"causal", "bidir", "mix"}
    tr, m = io.load_adapters_for_scoring(d, CFG, variant="lora")
    assert m.variant == "lora" and set(tr) == {"causal"}
    # Without bitune.json both sets plus mixing read as bitune.
    os.remove(os.path.join(d, "bitune.json"))
    tr, m = io.load_adapters_for_scoring(d, CFG)
    assert m.variant == "bitune" and set(tr) == {"causal", "bidir", "mix"}

    d = _export(tmp_path, variant="only_causal", name="oc")
    assert io.load_adapters_for_scoring(d, CFG)[1].variant == "only_causal"

    d = _export(tmp_path, variant="lora", name="lo")
    tr, m = io.load_adapters_for_scoring(d, CFG)
    assert m.variant == "lora" and set(tr) == {"causal"}
    assert io.load_adapters_for_scoring(d, CFG, variant="naive_bidirectional")[1].variant == "naive_bidirectional"
    with pytest.raises(io.AdapterFileError, match=r"variant 'bitune' needs .* lack \['bidir', 'mix'\]"):
        io.load_adapters_for_scoring(d, CFG, variant="bitune")

    # A plain PEFT folder (adapter_config.json at the top) is a lora-variant adapter.
    plain = os.path.join(d, "causal")
    tr, m = io.load_adapters_for_scoring(plain, CFG)
    assert m.variant == "lora" and set(tr) == {"causal"}


# --------------------------------------------------------------------------- 2./3. the peft library
torch_available = True
try:  # noqa: SIM105
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover
    torch_available = False

EXAMPLES = ((5, 3), (1, 4), (8, 2))


def _examples(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, size=lp).astype(np.int32), rng.integers(1, vocab, size=la).astype(np.int32))
            for lp, la in EXAMPLES]


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


def _torch_answer_nll(model, examples):
    """Per-example mean NLL of the answer tokens under the causal LM over prompt + answer."""
    import torch

    out = []
    with torch.no_grad():
        for x, y in examples:
            ids = torch.tensor(np.concatenate([x, y])[None].astype(np.int64))
            logits = model(input_ids=ids).logits[0]
            out.append(float(torch.nn.functional.cross_entropy(logits[len(x) - 1:-1],
                                                               torch.tensor(y.astype(np.int64)))))
    return np.array(out)


def _fresh_torch(model_dir):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                          dtype=torch.float32)
    return m.eval()


_ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_lib_configs():
    import peft

    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=_ALL7, init_lora_weights=False),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                use_dora=True, init_lora_weights=False),
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False),
    }


@pytest.mark.skipif(not torch_available, reason="needs torch, transformers and peft")
def test_peft_library_interop(tmp_path):
    import peft
    import torch
    from hf_utils import tiny_hf_model

    model_dir = str(tmp_path / "base")
    tiny_hf_model("llama", model_dir)
    base, cfg = load_hf(model_dir)
    examples = _examples(cfg.vocab_size)

    # 2. peft-made adapters -> ours.
    torch_ref, imported = {}, {}
    for name, pcfg in _peft_lib_configs().items():
        torch.manual_seed(7)
        pm = peft.get_peft_model(_fresh_torch(model_dir), pcfg).eval()
        if name == "dora":  # make the magnitude differ from the column norms
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_magnitude_vector" in n:
                        p.mul_(1.0 + 0.3 * torch.rand_like(p))
        pm.save_pretrained(str(tmp_path / f"peft_{name}"))
        torch_ref[name] = _torch_answer_nll(pm, examples)
        imported[name] = io.import_adapters(str(tmp_path / f"peft_{name}"), cfg)
        assert imported[name][1].variant == "lora"
        assert imported[name][1].peft.method == name

    # 3. ours -> peft: an exported bitune adapter with distinct sets; each folder loads.
    ours = {}
    for name, pc in [("lora", peft_lib.PeftConfig("lora", rank=4, alpha=8.0)),
                     ("dora", PEFTS["dora"]), ("ia3", PEFTS["ia3"])]:
        method = bitune.MethodConfig(variant="bitune", peft=pc)
        base_for_dora = base if name == "dora" else None
        tr = bitune.init_trainable(jax.random.PRNGKey(5), cfg, method, base_for_dora)
        rng = np.random.default_rng(5)
        tr = jax.tree_util.tree_map(lambda a: a + jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), tr)
        d = io.export_adapters(str(tmp_path / f"ours_{name}"), tr, cfg, method, model_dir)
        ours[name] = (tr, method, d)

    # All JAX numbers in one compile (methods are static, closed over).
    imp_methods = {k: m for k, (_, m) in imported.items()}
    our_methods = {k: bitune.MethodConfig(variant="lora", peft=m.peft) for k, (_, m, _) in ours.items()}

    def jax_nll(imp, our, base, batch):
        def per_example(tr, method):
            s, n = bitune.answer_nll(tr, base, cfg, method, batch)
            return s / n
        return ({k: per_example(tr, imp_methods[k]) for k, tr in imp.items()},
                {k: [per_example({"causal": tr[s]}, our_methods[k]) for s in ("causal", "bidir")]
                 for k, tr in our.items()})

    jax_imp, jax_ours = jax.jit(jax_nll)({k: tr for k, (tr, _) in imported.items()},
                                         {k: v[0] for k, v in ours.items()}, base, _batch(examples))

    for name in torch_ref:
        diff = np.max(np.abs(np.asarray(jax_imp[name]) - torch_ref[name]))
        print(f"peft-made {name}: max |NLL diff| {diff:.2e}")
        assert diff <= 1e-4, (name, diff, jax_imp[name], torch_ref[name])

    for name, (tr, method, d) in ours.items():
        for i, set_dir in enumerate(("causal", "bidirectional")):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pm = peft.PeftModel.from_pretrained(_fresh_torch(model_dir), os.path.join(d, set_dir)).eval()
            bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                   or "unexpected" in str(w.message).lower()]
            assert not bad, bad
            ref = _torch_answer_nll(pm, examples)
            diff = np.max(np.abs(np.asarray(jax_ours[name][i]) - ref))
            print(f"our {name} {set_dir}/ in peft: max |NLL diff| {diff:.2e}")
            assert diff <= 1e-4, (name, set_dir, diff)
