"""PEFT adapter folders in every form PEFT writes load here and compute what PEFT computes.

Each case builds an adapter with the ``peft`` library itself (``get_peft_model``
with random non-zero weights, then ``save_pretrained``; a few configs are then
edited by hand into forms PEFT reads but ``get_peft_model`` normalises away),
on a tiny random model of each family. ``load_adapters_for_scoring`` reads the
folder; our logits must equal those of the torch ``PeftModel`` loaded from the
same folder (eval, float32) within 1e-4. Forms: short names, full module paths,
regex, ``all-linear``, null targets, ``layers_to_transform``, ``exclude_modules``,
``rank_pattern``/``alpha_pattern`` (mixed ranks), rsLoRA, DoRA on some layers
only, IA3 and ``fan_in_fan_out``. Then: a DoRA layer left unadapted equals
the base layer; a two-folder Bitune directory with different forms per folder
gives the loss of an independent PyTorch Bitune reference run on the PEFT
models; and what PEFT would adapt but this library cannot is a one-line error.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from bitune_jax import bitune  # noqa: E402
from bitune_jax.conversion import adapters as io  # noqa: E402
from bitune_jax.conversion import families  # noqa: E402
from bitune_jax.conversion.hf import load_hf  # noqa: E402
from bitune_jax.model import peft as peft_lib  # noqa: E402
from bitune_jax.model import transformer as T  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

TOL = 1e-4
KINDS = ("llama", "qwen2", "gemma", "gemma3", "phi")
# XLA:CPU compile time dominates; float32 numerics do not depend on these flags.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- models and folders, built once
class Family:
    """A tiny random HF model of one family: its folder, torch model, our params and config."""

    def __init__(self, kind, root):
        self.kind, self.root = kind, root
        self.model_dir = os.path.join(root, "model")
        self.torch = tiny_hf_model(kind, self.model_dir)
        for p in self.torch.parameters():
            p.requires_grad_(False)
        self.base, self.cfg = load_hf(self.model_dir)
        self.mods = families.family_of_config(self.cfg).hf_modules
        self.tokens = np.random.default_rng(0).integers(0, self.cfg.vocab_size, size=(2, 9)).astype(np.int32)
        self._built = {}

    def short(self, proj):
        return self.mods[proj].split(".")[-1]

    def full(self, proj, layer):
        return f"model.layers.{layer}.{self.mods[proj]}"

    def save_peft(self, name, config, edit=None, seed=0):
        """A PEFT folder for ``config`` with random non-zero weights (``edit`` changes the saved config dict)."""
        folder = os.path.join(self.root, name)
        if folder in self._built:
            return folder
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(self.torch), config)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
                elif "lora_B" in n:
                    p.copy_(0.05 * torch.randn_like(p))
                elif "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.3 * torch.rand_like(p))
                elif "ia3_l" in n:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
        pm.save_pretrained(folder)
        if edit is not None:
            path = os.path.join(folder, "adapter_config.json")
            with open(path) as f:
                cfg = json.load(f)
            edit(cfg)
            with open(path, "w") as f:
                json.dump(cfg, f)
        self._built[folder] = True
        return folder

    def peft_model(self, folder, adapter_name="default"):
        """The torch PeftModel PEFT loads from ``folder`` onto a fresh copy of the base model."""
        return peft.PeftModel.from_pretrained(copy.deepcopy(self.torch), folder, adapter_name=adapter_name).eval()

    def peft_logits(self, folder):
        with torch.no_grad():
            return self.peft_model(folder)(input_ids=torch.tensor(self.tokens.astype(np.int64))).logits.numpy()


_FAMILIES = {}


def _family(kind, tmp_path_factory):
    if kind not in _FAMILIES:
        _FAMILIES[kind] = Family(kind, str(tmp_path_factory.mktemp(f"peft_{kind}")))
    return _FAMILIES[kind]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _family("llama", tmp_path_factory)


def _cases(fam: Family):
    """name -> (peft config, edit of the saved config or None) for ``fam``."""
    s, full = fam.short, fam.full
    cases = {
        "short_names": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=[s(p) for p in fam.cfg.projections]),
                        None),
        # Full module paths (as the Bitune authors' exports write them), per-module rank and alpha.
        "paths_rank_pattern": (peft.LoraConfig(
            r=4, lora_alpha=8,
            target_modules=[full("o_proj", 1), full("q_proj", 0), full("q_proj", 2), full("down_proj", 2),
                            full("up_proj", 0)],
            rank_pattern={s("o_proj"): 2, f"layers.2.{fam.mods['down_proj']}": 6},
            alpha_pattern={s("q_proj"): 3}), None),
        # DoRA on layers 0 and 2 only (layer 1 must stay the base), mixed ranks.
        "dora_layers": (peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                        target_modules=[s("q_proj"), s("v_proj"), s("down_proj")],
                                        layers_to_transform=[0, 2], layers_pattern="layers",
                                        rank_pattern={s("v_proj"): 2}), None),
        "ia3_regex": (peft.IA3Config(
            target_modules=r"model\.layers\.[12]\.(%s)" % "|".join(
                re.escape(fam.mods[p]) for p in ("k_proj", "v_proj", "down_proj")),
            feedforward_modules=[s("down_proj")]), None),
    }
    if fam.kind != "llama":
        return cases

    def set_fan_in_fan_out(c):
        c["fan_in_fan_out"] = True  # peft resets it for nn.Linear; the tensors keep nn.Linear's layout

    def null_targets(c):
        c["target_modules"] = c["feedforward_modules"] = None  # peft's defaults for llama: k, v, down

    cases.update({
        "regex": (peft.LoraConfig(r=4, lora_alpha=8,
                                  target_modules=r".*\.(0|2)\.self_attn\.(q|v)_proj|.*mlp\.up_proj"), None),
        "all_linear": (peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
                       lambda c: c.update(target_modules="all-linear")),
        "rslora_rank_pattern": (peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                target_modules=["q_proj", "v_proj", "gate_proj"],
                                                rank_pattern={"v_proj": 2}), None),
        "rslora_layers": (peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"],
                                          layers_to_transform=[1]), None),
        "exclude": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                    exclude_modules=["model.layers.0.mlp.gate_proj"]), None),
        "fan_in_fan_out": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                           set_fan_in_fan_out),
        "ia3_null_targets": (peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]), null_targets),
    })
    return cases


def _jax_logits(fam: Family, loaded):
    """Our logits for every ``{case: (trainable, method)}``, in one compile."""
    pcs = {k: m.peft for k, (_, m) in loaded.items()}

    def fn(sets, base, tokens):
        return {k: T.forward(base, fam.cfg, tokens, adapters=sets[k], peft_cfg=pcs[k])[0] for k in sets}

    args = ({k: tr["causal"] for k, (tr, _) in loaded.items()}, fam.base, jnp.asarray(fam.tokens))
    return jax.device_get(jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args))


# --------------------------------------------------------------------------- 1. every form, every family
@pytest.mark.parametrize("kind", KINDS)
def test_peft_forms_match_peft(kind, tmp_path_factory):
    fam = _family(kind, tmp_path_factory)
    folders = {name: fam.save_peft(name, config, edit) for name, (config, edit) in _cases(fam).items()}
    loaded = {name: io.load_adapters_for_scoring(d, fam.cfg, base_params=fam.base) for name, d in folders.items()}
    for name, (tr, method) in loaded.items():
        assert method.variant == "lora" and set(tr) == {"causal"}, name
    ours = _jax_logits(fam, loaded)
    for name, d in folders.items():
        ref = fam.peft_logits(d)
        diff = float(np.max(np.abs(ours[name] - ref)))
        print(f"{kind} {name}: max |logit diff| {diff:.2e}")
        assert diff <= TOL, (kind, name, diff)
        # The adapter does something: PEFT's logits differ from the base model's.
        with torch.no_grad():
            base_ref = fam.torch(input_ids=torch.tensor(fam.tokens.astype(np.int64))).logits.numpy()
        print(f"   vs base {np.max(np.abs(ref - base_ref)):.2e}")
        assert np.max(np.abs(ref - base_ref)) > 1e2 * TOL, (kind, name)

    # Mixed ranks: zero-padded to the largest, scalings folded into B (runtime scaling 1).
    pc = loaded["paths_rank_pattern"][1].peft
    assert (pc.method, pc.rank, pc.scaling, pc.targets) == ("lora", 6, 1.0, ("q_proj", "o_proj", "up_proj",
                                                                             "down_proj"))
    q = loaded["paths_rank_pattern"][0]["causal"]["q_proj"]
    assert not np.any(np.asarray(q["lora_a"][1])) and not np.any(np.asarray(q["lora_b"][1]))  # layer 1: no q
    assert not np.any(np.asarray(q["lora_a"][0][:, 4:])) and not np.any(np.asarray(q["lora_b"][0][4:]))
    ia3 = loaded["ia3_regex"][0]["causal"]
    np.testing.assert_array_equal(np.asarray(ia3["k_proj"]["scale"][0]), 1.0)  # layer 0 not adapted
    if kind == "llama":
        pc = loaded["rslora_layers"][1].peft  # uniform rank: rsLoRA's alpha / sqrt(r) as alpha' / r
        assert pc.rank == 4 and math.isclose(pc.scaling, 8 / math.sqrt(4))
        assert loaded["ia3_null_targets"][1].peft.targets is None  # k, v, down: our IA3 default too


# --------------------------------------------------------------------------- 2. DoRA's unadapted layers
def test_dora_unadapted_layer_equals_base(llama):
    fam = llama
    config, _ = _cases(fam)["dora_layers"]
    d = fam.save_peft("dora_layers", config)
    # Their magnitudes are the base weights' column norms: the loader needs the base model.
    with pytest.raises(io.AdapterFileError, match=r"dora_layers/adapter_config.json: DoRA leaves q_proj "
                                                  r"unadapted in layers \[1\].*base_params"):
        io.import_adapters(d, fam.cfg)
    model, tr, method = io.load_with_adapters(fam.model_dir, d)
    assert method.peft.method == "dora"
    rng = np.random.default_rng(1)
    for name in ("q_proj", "v_proj", "down_proj"):
        layer1 = jax.tree_util.tree_map(lambda a: a[1], model.params["layers"][name])
        ad1 = jax.tree_util.tree_map(lambda a: a[1], tr["causal"][name])
        x = jnp.asarray(rng.standard_normal((5, fam.cfg.projection_shape(name)[0])), jnp.float32)
        (y,) = peft_lib.dense([x], layer1, name, [{name: ad1}], method.peft)
        (y0,) = peft_lib.dense([x], layer1, name, [None], None)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-6, atol=1e-7, err_msg=name)
        # Layer 0 is adapted: it differs from the base.
        layer0 = jax.tree_util.tree_map(lambda a: a[0], model.params["layers"][name])
        ad0 = jax.tree_util.tree_map(lambda a: a[0], tr["causal"][name])
        (y,) = peft_lib.dense([x], layer0, name, [{name: ad0}], method.peft)
        (y0,) = peft_lib.dense([x], layer0, name, [None], None)
        assert np.max(np.abs(np.asarray(y) - np.asarray(y0))) > 1e-3, name


# --------------------------------------------------------------------------- 3. the two-folder Bitune layout
def test_bitune_directory_with_mixed_forms(llama, tmp_path):
    from test_bitune_reference import THETA_INIT, _batch, _examples, reference_loss

    fam = llama
    causal = fam.save_peft("bitune_causal", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[fam.full(p, l) for p in ("q_proj", "o_proj", "up_proj") for l in (0, 2)]
        + [fam.full("v_proj", 1)], rank_pattern={"o_proj": 2, "model.layers.1.self_attn.v_proj": 3}), seed=1)
    bidir = fam.save_peft("bitune_bidir", peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=r"model\.layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.down_proj)"), seed=2)
    d = tmp_path / "bitune"
    d.mkdir()
    shutil.copytree(causal, d / "causal")
    shutil.copytree(bidir, d / "bidirectional")
    rng = np.random.default_rng(3)
    mix = {"theta_k": (0.02 * rng.standard_normal(fam.cfg.num_layers)).astype(np.float32),
           "theta_v": (0.02 * rng.standard_normal(fam.cfg.num_layers)).astype(np.float32)}
    save_file({**mix, "theta_init": np.asarray([THETA_INIT], np.float32)}, str(d / "mixing.safetensors"))
    (d / "bitune.json").write_text(json.dumps({"format": io.FORMAT, "format_version": 1, "variant": "bitune",
                                               "theta_init": THETA_INIT}))

    tr, method = io.load_adapters_for_scoring(str(d), fam.cfg)
    assert method.variant == "bitune" and set(tr) == {"causal", "bidir", "mix"}
    # One PeftConfig: the union of both folders' targets, the largest rank, scalings folded into B.
    assert (method.peft.targets, method.peft.rank, method.peft.scaling) == (
        ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"), 4, 1.0)
    examples = _examples(fam.cfg.vocab_size, seed=5)
    args = (jax.tree_util.tree_map(jnp.asarray, tr), fam.base, _batch(examples))
    ours = float(jax.jit(lambda tr, base, batch: bitune.loss_fn(tr, base, fam.cfg, method, batch)[0])
                 .lower(*args).compile(_FAST_COMPILE)(*args))

    pm = fam.peft_model(str(d / "causal"), adapter_name="causal")
    pm.load_adapter(str(d / "bidirectional"), adapter_name="bidir")
    pm.eval()
    with torch.no_grad():
        ref = float(reference_loss(pm.base_model.model, lambda name: pm.base_model.set_adapter(name),
                                   {k: torch.tensor(v) for k, v in mix.items()}, method, examples))
    print(f"bitune directory, mixed forms: loss {ours:.6f} vs reference {ref:.6f}")
    assert abs(ours - ref) <= TOL, (ours, ref)


# --------------------------------------------------------------------------- 4. what this library cannot adapt
def test_modules_this_library_cannot_adapt_are_errors(llama, tmp_path):
    fam = llama

    def expect(folder, pattern):
        with pytest.raises(io.AdapterFileError, match=pattern) as e:
            io.import_adapters(folder, fam.cfg, base_params=fam.base)
        assert "\n" not in str(e.value) and os.path.basename(folder) in str(e.value), str(e.value)

    def edited(name, src=None, **changes):
        """A copy of ``src`` (default: the short_names folder) with ``changes`` to its config."""
        d = str(tmp_path / name)
        shutil.copytree(src or fam.save_peft("short_names", _cases(fam)["short_names"][0]), d)
        p = os.path.join(d, "adapter_config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(p, "w") as f:
            json.dump(cfg, f)
        return d

    expect(fam.save_peft("err_save", peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])),
           r"err_save/adapter_config.json: modules_to_save=\['lm_head'\]")
    head = fam.save_peft("err_head", peft.LoraConfig(target_modules=["q_proj", "lm_head"]))
    expect(head, r"err_head/adapter_config.json: PEFT adapts module 'lm_head'")
    expect(fam.save_peft("err_embed", peft.LoraConfig(target_modules=["embed_tokens", "q_proj"])),
           r"err_embed/adapter_config.json: PEFT adapts module 'model.embed_tokens'")
    # The tensors of a module the config does not (or cannot) adapt are never ignored.
    expect(edited("err_head_tensors", head, target_modules=["q_proj"]),
           r"adapter_model.safetensors: unknown tensors.*module 'lm_head' is not a projection")
    expect(edited("err_layers", layers_to_transform=[0]),
           r"err_layers/adapter_model.safetensors: unknown tensors.*module 'model.layers.1.mlp.down_proj' is not "
           r"adapted by adapter_config.json")
    expect(edited("err_regex", target_modules=r"model\.layers\.\d+\.self_attn\.nope"), "adapt no projection")
    expect(edited("err_name", target_modules=["q_proj", "c_attn"]), "target module 'c_attn' is not a projection")
    expect(edited("err_regex_layers", target_modules=".*q_proj", layers_to_transform=[0]), "peft refuses")
    expect(edited("err_pissa", init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'")
    expect(fam.save_peft("err_ia3_ff", peft.IA3Config(target_modules=["k_proj", "up_proj", "down_proj"],
                                                      feedforward_modules=["up_proj", "down_proj"])),
           r"feedforward_modules make IA3 scale the input of 'model.layers.0.mlp.up_proj'")

    # The two folders of a Bitune directory must use one PEFT method.
    d = tmp_path / "two_methods"
    d.mkdir()
    shutil.copytree(fam.save_peft("short_names", _cases(fam)["short_names"][0]), d / "causal")
    shutil.copytree(fam.save_peft("ia3_regex", _cases(fam)["ia3_regex"][0]), d / "bidirectional")
    save_file({"theta_k": np.zeros(3, np.float32), "theta_v": np.zeros(3, np.float32)},
              str(d / "mixing.safetensors"))
    with pytest.raises(io.AdapterFileError, match=r"bidirectional/adapter_config.json: method ia3, but .*causal/"
                                                  r"adapter_config.json is lora"):
        io.import_adapters(str(d), fam.cfg)
