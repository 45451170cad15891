"""Data pipeline: readers, bad rows, overlong rule, batch format, order, resumption, sharding."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bitune_jax.data import pipeline as data

from bitune_jax.data import text
from bitune_jax.config import DataFormat, DataSection

N_ROWS = 48
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:", "q", "w", "a", "user", "assistant", ":",
         "ctx"] + [str(i) for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer that adds BOS, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    return fast


def _rows(n=N_ROWS):
    """Rows whose prompt lengths vary (1..12 filler words) and whose last word is the row id."""
    return [{"prompt": " ".join(["q"] + ["w"] * (1 + (7 * i) % 12) + [str(i)]),
             "answer": " ".join(["a"] * (1 + i % 3) + [str(i)]), "id": i} for i in range(n)]


def _cfg(**kw):
    base = dict(batch_size=8, bucket=8, sort_window=2, shuffle_seed=0, num_epochs=None)
    base.update(kw)
    return DataSection(**base)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row_id(prompt_ids, tok):
    """The row id written as the last prompt word (before "Answer:" in the plain template)."""
    return int([t for t in tok.convert_ids_to_tokens([int(i) for i in prompt_ids]) if t.isdigit()][-1])


def _ids(batches):
    return [b["example_id"].tolist() for b in batches]


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def test_all_sources_load_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(10)
    jsonl = _write_jsonl(tmp_path / "rows.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    arrow = sorted(folder.glob("*.arrow"))
    assert len(arrow) == 1
    dict_folder = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(dict_folder))
    array_json = tmp_path / "rows.json"
    array_json.write_text(json.dumps(rows))

    sources = [jsonl, str(tmp_path / "rows.parquet"), str(arrow[0]), str(folder), str(array_json),
               data.DataSource(path=str(dict_folder), split="test")]
    for source in sources:
        got = data.read_rows(source)
        assert [dict(r.fields) for r in got] == rows, source
        assert [r.number for r in got] == list(range(1, 11))
    with pytest.raises(data.DataError, match="split 'validation' not found; available: train, test"):
        data.read_rows(data.DataSource(path=str(dict_folder), split="validation"))


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match="unknown file type"):
        data.read_rows(_write_jsonl(tmp_path / "rows.csv", _rows(2)))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match=r"'someone/some_set' is not a local file or folder.*offline.*local"):
        data.read_rows("someone/some_set")


# ---------------------------------------------------------------------------
# Encoding: formats, templates, bad rows, overlong rule
# ---------------------------------------------------------------------------


BAD_LINES = {
    "empty_answer": json.dumps({"prompt": "q 1", "answer": "   "}).encode(),
    "missing_field": json.dumps({"prompt": "q 1"}).encode(),
    "undecodable_json": b'{"prompt": "q 1", "answer": ',
    "undecodable_utf8": b'{"prompt": "q \xff\xfe", "answer": "a 1"}',
    "undecodable_type": json.dumps({"prompt": "q 1", "answer": 7}).encode(),
    "undecodable_not_object": b"[1, 2]",
    "empty_prompt": json.dumps({"prompt": "", "answer": "a 1"}).encode(),
}


def _bad_file(tmp_path):
    good = [json.dumps(r).encode() for r in _rows(3)]
    lines = [good[0], BAD_LINES["empty_answer"], b"", good[1]] + [
        BAD_LINES[k] for k in ("missing_field", "undecodable_json", "undecodable_utf8", "undecodable_type",
                               "undecodable_not_object", "empty_prompt")] + [good[2]]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_rows_are_counted_and_skipped(tmp_path, tok):
    path = _bad_file(tmp_path)
    examples, stats = data.load_examples(tok, path, _cfg())
    assert len(examples) == 3 and stats.examples == 3
    assert stats.kept_rows == [1, 4, 11]  # line numbers; line 3 is blank
    assert (stats.empty_answer, stats.missing_field, stats.undecodable, stats.empty_prompt) == (1, 1, 4, 1)
    assert stats.rows == 10 and stats.bad_rows == 7
    assert f"{path}, line 2: empty_answer" in stats.problems[0]
    assert [_row_id(p, tok) for p, _ in examples] == [0, 1, 2]


@pytest.mark.parametrize("kind, line_no, category", [
    ("empty_answer", 2, "empty_answer"), ("missing_field", 2, "missing_field"),
    ("undecodable_json", 2, "undecodable"), ("undecodable_utf8", 2, "undecodable"),
    ("undecodable_type", 2, "undecodable"), ("empty_prompt", 2, "empty_prompt"),
])
def test_bad_rows_error_names_file_and_line(tmp_path, tok, kind, line_no, category):
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(json.dumps(_rows(1)[0]).encode() + b"\n" + BAD_LINES[kind] + b"\n")
    with pytest.raises(data.DataError) as e:
        data.load_examples(tok, str(path), _cfg(bad_rows="error"))
    assert f"{path}, line {line_no}: {category}" in str(e.value)


def test_plain_template_uses_the_text_rule(tok):
    row = {"prompt": "q 5", "answer": "a 5"}
    [(p, a)] = data.encode_examples(tok, [row], _cfg())
    prompt, answer = text.format_plain("q 5", "a 5")
    want_p, want_a = text.encode_pair(tok, prompt, answer, add_eos=True)
    assert p.dtype == np.int32 and p.tolist() == want_p and a.tolist() == want_a
    assert p[0] == tok.bos_token_id and a[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(p.tolist()) == ["<s>", "Question:", "q", "5", "Answer:"]


def test_instruction_and_messages_formats(tok):
    cfg = _cfg(format=DataFormat(kind="instruction", output_field="out"), template="none")
    rows = [{"instruction": "q 1", "input": "ctx 2", "out": "a 3"}, {"instruction": "q 4", "out": "a 5"}]
    (p1, a1), (p2, _) = data.encode_examples(tok, rows, cfg)
    assert tok.convert_ids_to_tokens(p1.tolist()) == ["<s>", "q", "1", "ctx", "2"]
    assert tok.convert_ids_to_tokens(a1.tolist()) == ["a", "3", "</s>"]
    assert tok.convert_ids_to_tokens(p2.tolist()) == ["<s>", "q", "4"]

    msgs = {"messages": [{"role": "user", "content": "q 1"}, {"role": "assistant", "content": "a 2"}]}
    [(p, a)] = data.encode_examples(tok, [msgs], _cfg(format=DataFormat(kind="messages"), template="chat"))
    # The chat template writes BOS itself; the prompt must not start with two.
    assert tok.convert_ids_to_tokens(p.tolist()) == ["<s>", "user", ":", "q", "1", "assistant", ":"]
    assert tok.convert_ids_to_tokens(a.tolist()) == ["a", "2", "</s>"]
    [(p, _)] = data.encode_examples(tok, [msgs], _cfg(format=DataFormat(kind="messages"), template="plain"))
    assert tok.convert_ids_to_tokens(p.tolist()) == ["<s>", "Question:", "q", "1", "Answer:"]

    stats = data.DataStats()
    no_answer = {"messages": [{"role": "user", "content": "q 1"}]}
    broken = {"messages": [{"role": "user"}]}
    assert data.encode_examples(tok, [no_answer, broken], _cfg(format=DataFormat(kind="messages")),
                                stats=stats) == []
    assert (stats.missing_field, stats.undecodable) == (1, 1)


def test_overlong_truncate_keeps_prompt_end_and_answer_start(tok):
    row = {"prompt": " ".join(str(i) for i in range(10)), "answer": " ".join(str(i) for i in range(100, 110))}
    cfg = _cfg(template="none", max_prompt_len=4, max_answer_len=3)
    stats = data.DataStats()
    [(p, a)] = data.encode_examples(tok, [row], cfg, stats=stats)
    assert tok.convert_ids_to_tokens(p.tolist()) == ["<s>", "7", "8", "9"]  # BOS kept, then the end
    assert tok.convert_ids_to_tokens(a.tolist()) == ["100", "101", "102"]  # the start; EOS cut off
    assert stats.overlong_truncated == 1 and stats.examples == 1

    short = {"prompt": "q 1", "answer": "a 1"}
    stats = data.DataStats()
    out = data.encode_examples(tok, [row, short], dataclasses.replace(cfg, overlong="drop"), stats=stats)
    assert len(out) == 1 and stats.overlong_dropped == 1 and stats.kept_rows == [2]
    # Overlong rows are never bad rows, even under bad_rows=error.
    strict = dataclasses.replace(cfg, overlong="drop", bad_rows="error")
    assert len(data.encode_examples(tok, [row, short], strict)) == 1


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(tok):
    return data.encode_examples(tok, _rows(), _cfg())


def _batches(examples, cfg, n, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    ds = data.batch_dataset(examples, cfg, include_ids=True, **kw)
    it = data.make_iterator(ds)
    return [next(it) for _ in range(n)]


def test_collate_format():
    ex = [([1, 5, 6], [7, 2]), (np.array([1, 9], np.int32), [8, 8, 8, 8, 2])]
    b = data.collate(ex, bucket=4)
    assert set(b) == {"prompt_ids", "prompt_len", "answer_ids", "answer_len"}
    assert all(v.dtype == np.int32 for v in b.values())
    assert b["prompt_ids"].tolist() == [[1, 5, 6, 0], [1, 9, 0, 0]]
    assert b["answer_ids"].tolist() == [[7, 2, 0, 0, 0, 0, 0, 0], [8, 8, 8, 8, 2, 0, 0, 0]]
    assert b["prompt_len"].tolist() == [3, 2] and b["answer_len"].tolist() == [2, 5]
    assert data.collate(ex, bucket=4, pad_to=(16, 8))["prompt_ids"].shape == (2, 16)
    with pytest.raises(ValueError):
        data.collate(ex, pad_to=(2, 8))
    with pytest.raises(ValueError):
        data.collate([([], [1])])


def test_batches_match_examples_and_are_bucketed(examples):
    cfg = _cfg(bucket=8)
    for b in _batches(examples, cfg, 12):
        B, P = b["prompt_ids"].shape
        A = b["answer_ids"].shape[1]
        assert B == 8 and P % 8 == 0 and A % 8 == 0
        assert b["prompt_len"].min() >= 1 and b["answer_len"].min() >= 1
        for row, i in enumerate(b["example_id"]):
            p, a = examples[i]
            assert b["prompt_ids"][row, :len(p)].tolist() == p.tolist()
            assert not b["prompt_ids"][row, len(p):].any() and b["prompt_len"][row] == len(p)
            assert b["answer_ids"][row, :len(a)].tolist() == a.tolist()
            assert not b["answer_ids"][row, len(a):].any() and b["answer_len"][row] == len(a)


def test_bucketing_never_pads_past_the_configured_maximum(examples):
    longest = (max(len(p) for p, _ in examples), max(len(a) for _, a in examples))
    cfg = _cfg(bucket=64, max_prompt_len=longest[0], max_answer_len=longest[1] + 1)
    shapes = {(b["prompt_ids"].shape[1], b["answer_ids"].shape[1]) for b in _batches(examples, cfg, 12)}
    assert shapes == {(longest[0], longest[1] + 1)}  # the cap, not 64


def test_length_grouping_reduces_padding(examples):
    def padded(window):
        bs = _batches(examples, _cfg(sort_window=window, bucket=1), 6)
        return sum(b["prompt_ids"].size for b in bs)

    assert padded(6) < padded(1)


def test_same_seed_same_batches_other_seed_differs(examples):
    first = _batches(examples, _cfg(shuffle_seed=3), 10)
    again = _batches(examples, _cfg(shuffle_seed=3), 10)
    other = _batches(examples, _cfg(shuffle_seed=4), 10)
    for x, y in zip(first, again):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert _ids(first) != _ids(other)


def test_epochs_cover_every_example_once_and_reshuffle(examples):
    cfg = _cfg(num_epochs=2)
    ds = data.batch_dataset(examples, cfg, process_index=0, process_count=1, include_ids=True)
    per_epoch = N_ROWS // cfg.batch_size
    assert len(ds) == 2 * per_epoch
    batches = list(data.make_iterator(ds))
    assert len(batches) == 2 * per_epoch
    epoch1 = sum(_ids(batches[:per_epoch]), [])
    epoch2 = sum(_ids(batches[per_epoch:]), [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(N_ROWS))
    assert epoch1 != epoch2


def test_remainder_dropped_each_epoch(examples):
    cfg = _cfg(batch_size=10, num_epochs=1)  # 48 = 4 * 10 + 8
    ids = sum(_ids(list(data.make_iterator(data.batch_dataset(examples, cfg, process_index=0, process_count=1,
                                                              include_ids=True)))), [])
    assert len(ids) == 40 and len(set(ids)) == 40
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.batch_dataset(examples[:5], cfg, process_index=0, process_count=1)


def test_resume_continues_exactly(examples):
    cfg = _cfg()
    per_epoch = N_ROWS // cfg.batch_size
    ds = data.batch_dataset(examples, cfg, process_index=0, process_count=1, include_ids=True)
    reference = [next(it) for it in [data.make_iterator(ds)] for _ in range(2 * per_epoch)]

    it = data.make_iterator(ds)
    seen = [next(it) for _ in range(4)]
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    next(it)  # the old iterator runs ahead; the saved state must not move
    resumed = data.make_iterator(data.batch_dataset(examples, cfg, process_index=0, process_count=1,
                                                    include_ids=True))
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(2 * per_epoch - 4)]
    stream = seen + rest
    for x, y in zip(stream, reference):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    first_epoch = sum(_ids(stream[:per_epoch]), [])
    assert sorted(first_epoch) == list(range(N_ROWS))  # none twice, none skipped


def test_two_processes_split_each_global_batch(examples):
    cfg = _cfg(num_epochs=1)
    whole = list(data.make_iterator(data.batch_dataset(examples, cfg, process_index=0, process_count=1,
                                                       include_ids=True)))
    shards = [list(data.make_iterator(data.batch_dataset(examples, cfg, process_index=p, process_count=2,
                                                         include_ids=True))) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    union = []
    for g, b0, b1 in zip(whole, *shards):
        assert b0["prompt_ids"].shape == b1["prompt_ids"].shape == (4, g["prompt_ids"].shape[1])
        assert b0["answer_ids"].shape == b1["answer_ids"].shape == (4, g["answer_ids"].shape[1])
        ids0, ids1 = set(b0["example_id"].tolist()), set(b1["example_id"].tolist())
        assert not ids0 & ids1 and ids0 | ids1 == set(g["example_id"].tolist())
        union += list(ids0 | ids1)
    assert sorted(union) == list(range(N_ROWS))
    with pytest.raises(data.DataError, match="not divisible"):
        data.batch_dataset(examples, _cfg(batch_size=6), process_index=0, process_count=4)


def test_eval_dataset_is_unshuffled_and_fixed(tmp_path, tok):
    path = _write_jsonl(tmp_path / "eval.jsonl", _rows(20))
    cfg = _cfg(eval=data.DataSource(path=path), batch_size=4, sort_window=1)
    ds, stats = data.eval_dataset(tok, cfg, process_index=0, process_count=1)
    assert len(ds) == 5 and stats.examples == 20
    first = [_row_id(p[:n], tok) for p, n in zip(ds[0]["prompt_ids"], ds[0]["prompt_len"])]
    assert first == [0, 1, 2, 3]
    assert all(np.array_equal(ds[2][k], ds[2][k]) for k in ds[2])


def test_train_iterator_end_to_end(tmp_path, tok):
    path = _write_jsonl(tmp_path / "train.jsonl", _rows())
    cfg = _cfg(train=data.DataSource(path=path))
    it, stats = data.train_iterator(tok, cfg, process_index=0, process_count=1)
    batch = next(it)
    assert stats.examples == N_ROWS and set(batch) == {"prompt_ids", "prompt_len", "answer_ids", "answer_len"}
    assert batch["prompt_ids"].shape[0] == cfg.batch_size
