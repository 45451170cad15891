"""The lm-evaluation-harness adapter, used the way harness users use it.

The harness runs offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) on tiny
local tasks (task YAMLs over JSONL files): a multiple-choice task
(``loglikelihood``), a perplexity task (``loglikelihood_rolling``, long enough
for several windows) and a generation task (``generate_until``), on a tiny
random Llama with a word-level tokenizer, with and without exported Bitune
adapters. Every log-likelihood the harness records must equal ``bitune-jax
score`` (``score_rows``) on the same prompt/answer pair at 1e-4, and every
generation ``generate`` on the same prompt. ``bitune-jax lm-eval`` runs the
harness's own command line in a subprocess.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.model import transformer as T
from bitune_jax.model.peft import PeftConfig
from hf_utils import save_word_tokenizer, tiny_hf_model
from test_evaluate import WordTokenizer
from test_generate import CFG, random_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:", "user:", "assistant:"] + [f"w{i}" for i in range(24)]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
MAX_LENGTH = 16  # the perplexity task's long document spans several rolling windows


def _harness():
    return pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: bash scripts/setup_env.sh "
                                                 "(or pip install 'bitune-jax[eval]')")


def _words(rng, n):
    return " ".join(f"w{i}" for i in rng.randint(0, 24, size=n))


def _write_task(folder, name, rows, body):
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        # datasets' cache goes next to the data, not into ~/.cache
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                f"  cache_dir: {os.path.join(folder, 'hf_cache')}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder (word tokenizer with a chat template), an exported adapter folder and three tasks."""
    from transformers import AutoTokenizer

    from bitune_jax.conversion import load_model
    from bitune_jax.conversion.adapters import export_adapters

    root = tmp_path_factory.mktemp("lm_eval")
    model_dir, adapter_dir, task_dir = (str(root / n) for n in ("model", "adapters", "tasks"))
    tiny_hf_model("llama", model_dir, vocab_size=len(WORDS), hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    save_word_tokenizer(model_dir, WORDS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)

    # Bitune adapters moved away from their identity init, so they change every number.
    cfg = load_model(model_dir, with_tokenizer=False).cfg
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4, alpha=8.0))
    export_adapters(adapter_dir, random_trainable(cfg, method, seed=3), cfg, method, model_dir)

    os.makedirs(task_dir)
    rng = np.random.RandomState(0)
    mc = [{"question": _words(rng, 3 + i % 3), "choices": [_words(rng, 1 + (i + j) % 3) for j in range(3)],
           "label": i % 3} for i in range(4)]
    _write_task(task_dir, "tiny_mc", mc, "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\n"
                "Answer:\"\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
                "  - metric: acc_norm\n")
    ppl = [{"text": _words(rng, 6)}, {"text": _words(rng, 2 * MAX_LENGTH + 5)}]
    _write_task(task_dir, "tiny_ppl", ppl, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
                "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    gen = [{"question": _words(rng, 2 + i), "answer": "w1"} for i in range(3)]
    _write_task(task_dir, "tiny_gen", gen, "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\n"
                "Answer:\"\ndoc_to_target: answer\ngeneration_kwargs:\n  until: [\"w5\"]\n  max_gen_toks: 5\n"
                "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return {"model": model_dir, "adapters": adapter_dir, "tasks": task_dir}


@pytest.fixture(scope="module")
def loaded(tiny):
    """``bitune-jax score``'s view of the tiny model: (LoadedModel, trainable, method) without and with adapters."""
    from bitune_jax.conversion.adapters import load_with_adapters

    return {None: load_with_adapters(tiny["model"]), "adapters": load_with_adapters(tiny["model"], tiny["adapters"])}


def _score(loaded, rows):
    """Log-likelihoods of ``bitune-jax score`` (no EOS appended: the harness's continuations have none)."""
    from bitune_jax.evaluation.score import score_rows

    model, trainable, method = loaded
    return np.array([-r["nll_sum"] for r in score_rows(model, rows, trainable=trainable, method=method,
                                                       add_eos=False)])


def _check_samples(samples, loaded):
    """Every harness number against ``bitune-jax score`` / ``generate`` on the same rows; returns the MC scores."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from bitune_jax.evaluation.generate import generate

    model, trainable, method = loaded
    tok = model.tokenizer
    # loglikelihood: one (context, continuation) pair per choice.
    pairs = [tuple(a) for s in samples["tiny_mc"] for a in s["arguments"]]
    got = np.array([float(r[0][0]) for s in samples["tiny_mc"] for r in s["resps"]])
    ref = _score(loaded, [{"prompt": c, "answer": a} for c, a in pairs])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # loglikelihood_rolling: BOS then the document, as disjoint windows of MAX_LENGTH tokens.
    for s in samples["tiny_ppl"]:
        ids = tok(s["arguments"][0][0], add_special_tokens=False)["input_ids"]
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=MAX_LENGTH, context_len=1)]
        assert len(windows) == (1 if len(ids) < MAX_LENGTH else 3)
        ref = _score(loaded, [{"prompt_ids": list(c), "answer_ids": list(a)} for c, a in windows]).sum()
        assert abs(float(s["resps"][0][0]) - ref) < 1e-4, (s["resps"][0][0], ref)
    # generate_until: the same text as `generate` with the task's stop string and length.
    prompts = [s["arguments"][0][0] for s in samples["tiny_gen"]]
    ref = generate(model.params, model.cfg, tok, prompts, trainable, method, max_new_tokens=5, stop=["w5"])
    assert [s["resps"][0][0] for s in samples["tiny_gen"]] == [g.text for g in ref]
    return got


def _samples_files(out_dir):
    """The ``--log_samples`` files as ``simple_evaluate`` returns them (the files hold numbers as text)."""
    samples = {}
    for path in glob.glob(os.path.join(out_dir, "**", "samples_*.jsonl"), recursive=True):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        with open(path, encoding="utf-8") as f:
            samples[task] = [json.loads(line) for line in f]
        for s in samples[task]:  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
            s["arguments"] = [tuple(a.values()) for a in s["arguments"].values()]
    return samples


# --------------------------------------------------------------------------- the adapter's requests
@pytest.fixture(scope="module")
def base():
    return T.init_params(jax.random.PRNGKey(0), CFG, std=0.3)


def test_requests_match_the_library(base):
    _harness()
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    from bitune_jax.conversion import LoadedModel
    from bitune_jax.evaluation.evaluate import score_choices_naive
    from bitune_jax.evaluation.generate import generate
    from bitune_jax.evaluation.lm_eval_adapter import BituneLM

    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4, alpha=8.0))
    tr = random_trainable(CFG, method, seed=2, base=base)
    tok = WordTokenizer()
    lm = BituneLM(loaded=LoadedModel(base, CFG, tok, "tiny"), trainable=tr, method=method, batch_size=4,
                  max_length=16)
    assert isinstance(lm, LM)

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    reqs = [("Is it red? ", "yes"), ("Is it red?", " no"), ("Pick:", " a"), ("", "hello")]
    got = lm.loglikelihood([inst("loglikelihood", r) for r in reqs])
    # Trailing context spaces move to the continuation; an empty context is the BOS token.
    ctx = [tok("Is it red?")["input_ids"]] * 2 + [tok("Pick:")["input_ids"], [1]]
    cont = [tok(c, add_special_tokens=False)["input_ids"] for c in (" yes", " no", " a", "hello")]
    ref = score_choices_naive(base, CFG, ctx, [[c] for c in cont], tr, method)
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    assert all(isinstance(g[1], bool) for g in got)

    # Rolling: one window is the string scored after the prefix token; longer strings add up disjoint windows.
    short = lm.loglikelihood_rolling([inst("loglikelihood_rolling", ("abcdefg",))])[0]
    toks = tok("abcdefg", add_special_tokens=False)["input_ids"]
    assert short == pytest.approx(score_choices_naive(base, CFG, [[1]], [[toks]], tr, method)[0][0], abs=1e-4)
    long = lm.loglikelihood_rolling([inst("loglikelihood_rolling", ("abcdefghij" * 4,))])[0]
    assert np.isfinite(long) and long < short

    gen = lm.generate_until([inst("generate_until", ("Say:", {"until": ["\x00"], "max_gen_toks": 6})),
                             inst("generate_until", ("Hi", {"until": "\x00", "max_gen_toks": 6}))])
    ref = generate(base, CFG, tok, ["Say:", "Hi"], tr, method, max_new_tokens=6, stop=["\x00"])
    assert gen == [g.text for g in ref]


def test_the_module_imports_without_the_harness(monkeypatch):
    import builtins
    import importlib

    import bitune_jax.evaluation.lm_eval_adapter as mod

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    mod = importlib.reload(mod)  # the module itself imports without the harness
    with pytest.raises(ImportError, match=r"pip install 'bitune-jax\[eval\]'"):
        mod.BituneLM
    monkeypatch.undo()
    importlib.reload(mod)


# --------------------------------------------------------------------------- model arguments
def test_model_arguments_as_the_harness_passes_them(base, caplog):
    _harness()
    from lm_eval.api.registry import get_model

    from bitune_jax.conversion import LoadedModel
    from bitune_jax.evaluation.lm_eval_adapter import DEFAULT_BATCH_SIZE, BituneLM, register

    register()
    registered = get_model("bitune_jax")  # BituneLM, or its twin from before a module reload
    assert (registered.__module__, registered.__name__) == (BituneLM.__module__, "BituneLM")
    assert get_model("hf").__name__ == "HFLM"  # the harness's own models stay available

    model = {"loaded": LoadedModel(base, CFG, WordTokenizer(), "tiny")}
    harness = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what its CLI passes by default
    assert BituneLM.create_from_arg_obj(model, harness).batch_size == 1
    assert BituneLM.create_from_arg_obj({**model, "batch_size": 3}, harness).batch_size == 3  # model_args win
    assert BituneLM.create_from_arg_obj(model, {"batch_size": None}).batch_size == DEFAULT_BATCH_SIZE
    with caplog.at_level("WARNING"):
        lm = BituneLM.create_from_arg_obj(model, {**harness, "batch_size": "auto:4"})
    assert lm.batch_size == DEFAULT_BATCH_SIZE and lm.batch_sizes == {"auto": DEFAULT_BATCH_SIZE}
    assert f"no automatic batch-size search; using batch size {DEFAULT_BATCH_SIZE}" in caplog.text
    assert BituneLM.create_from_arg_obj(model, {"batch_size": "auto", "max_batch_size": 2}).batch_size == 2
    assert BituneLM.create_from_arg_obj({**model, "attention": "blocked"}, harness).attention == "blocked"
    with pytest.raises(ValueError, match=r"batch_size='big'"):
        BituneLM.create_from_arg_obj(model, {"batch_size": "big"})
    with pytest.raises(ValueError, match=r"unknown \['adapter'\]; allowed: model, adapters"):
        BituneLM.create_from_arg_obj({**model, "adapter": "runs/x"}, harness)  # a typo is not ignored


def test_the_command_line_batch_size_default(tmp_path):
    _harness()
    from lm_eval._cli import HarnessCLI

    from bitune_jax.cli.lm_eval import _default_batch_size

    def batch_size(*argv):
        saved, sys.argv = sys.argv, ["lm-eval", *argv]
        try:
            ns = HarnessCLI().parse_args()
        finally:
            sys.argv = saved
        _default_batch_size(ns)
        return getattr(ns, "batch_size", None)

    assert batch_size("--model", "bitune_jax", "--tasks", "x") == "8"  # not the harness's 1
    assert batch_size("run", "--model", "bitune_jax", "-b", "2") == "2"
    assert batch_size("--model", "bitune_jax", "--batch_size", "auto") == "auto"
    assert batch_size("--model", "hf", "--tasks", "x") is None  # other models keep the harness's default
    config = tmp_path / "c.yaml"
    config.write_text("model: bitune_jax\nbatch_size: 4\n")
    assert batch_size("--config", str(config)) is None  # the file's batch size stands
    config.write_text("model: bitune_jax\n")
    assert batch_size("--config", str(config)) == "8"


# --------------------------------------------------------------------------- end to end through the harness
@pytest.mark.slow
@pytest.mark.parametrize("with_adapters", [False, True], ids=["base", "adapters"])
def test_simple_evaluate_matches_bitune_score(tiny, loaded, with_adapters):
    _harness()
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bitune_jax.evaluation.lm_eval_adapter import register

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: nothing is downloaded
    register()  # model="bitune_jax" by name, as from the harness's command line
    args = {"model": tiny["model"], "max_length": MAX_LENGTH, "batch_size": 4}
    if with_adapters:
        args["adapters"] = tiny["adapters"]
    out = lm_eval.simple_evaluate(model="bitune_jax", model_args=args, tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
                                  task_manager=TaskManager(include_path=tiny["tasks"]), log_samples=True)
    assert set(out["results"]) == {"tiny_mc", "tiny_ppl", "tiny_gen"}
    assert 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1
    assert out["results"]["tiny_ppl"]["word_perplexity,none"] > 1
    got = _check_samples(out["samples"], loaded["adapters" if with_adapters else None])
    if with_adapters:  # the adapters matter
        base_ll = _score(loaded[None], [{"prompt": c, "answer": a}
                                        for s in out["samples"]["tiny_mc"] for c, a in s["arguments"]])
        assert np.abs(got - base_ll).max() > 1e-2


@pytest.mark.slow
def test_chat_template(tiny, loaded):
    _harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bitune_jax.evaluation.lm_eval_adapter import BituneLM

    lm = BituneLM(model=tiny["model"], adapters=tiny["adapters"], batch_size=4)
    assert lm.chat_template(True) == CHAT_TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name == tiny["model"].replace("/", "__")
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=tiny["tasks"]),
                                  apply_chat_template=True, log_samples=True, limit=2)
    samples = out["samples"]["tiny_mc"]
    tok = lm.tokenizer
    for s in samples:
        context = s["arguments"][0][0]
        assert context == "<s>user: Question: " + s["doc"]["question"] + "\nAnswer: assistant: "
        assert lm._encode(context, " w1")[0].count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    # The rendered prompt already holds BOS: score it as token ids, no special tokens added.
    rows = [{"prompt_ids": tok(c, add_special_tokens=False)["input_ids"],
             "answer_ids": tok(a, add_special_tokens=False)["input_ids"]}
            for s in samples for c, a in s["arguments"]]
    got = [r[0][0] for s in samples for r in s["resps"]]
    np.testing.assert_allclose(got, _score(loaded["adapters"], rows), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- bitune-jax lm-eval
def test_cli_help(capsys):
    from bitune_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["lm-eval", "--help"])
    assert e.value.code == 0
    assert "usage: bitune-jax lm-eval" in capsys.readouterr().out
    _harness()
    with pytest.raises(SystemExit) as e:
        cli.main(["lm-eval", "run", "--help"])  # the harness's own help
    assert e.value.code == 0
    assert "--model_args" in capsys.readouterr().out


def test_cli_without_the_harness_is_one_error_line(monkeypatch, capsys):
    from bitune_jax import cli
    from bitune_jax.evaluation import lm_eval_adapter

    def missing():
        raise ImportError(f"BituneLM needs lm-evaluation-harness: {lm_eval_adapter.LM_EVAL_INSTALL}")

    monkeypatch.setattr(lm_eval_adapter, "_build_class", missing)
    assert cli.main(["lm-eval", "--model", "bitune_jax", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: subcommand 'lm-eval' is unavailable") and "pip install" in err[0]


@pytest.mark.slow
def test_cli_passthrough_end_to_end(tiny, loaded, tmp_path):
    """``bitune-jax lm-eval`` with lm-eval's own arguments, in a fresh offline process."""
    _harness()
    out_dir = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    env.pop("BITUNE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bitune_jax.cli", "lm-eval", "--model", "bitune_jax",
         "--model_args", f"model={tiny['model']},adapters={tiny['adapters']},max_length={MAX_LENGTH}",
         "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", tiny["tasks"], "--output_path", str(out_dir),
         "--log_samples"],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "tiny_mc" in proc.stdout and "batch_size: 8" in proc.stdout  # the adapter's default, not 1
    [results] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    with open(results, encoding="utf-8") as f:
        config = json.load(f)["config"]
    assert config["model"] == "bitune_jax" and str(config["batch_size"]) == "8"
    _check_samples(_samples_files(str(out_dir)), loaded["adapters"])
