"""Atomic writes: complete file or none, the usual permissions, no temporary files left behind."""
import json
import os
import stat

import pytest

from bitune_jax import fileio


def _leftovers(d):
    return [f for f in os.listdir(d) if f.startswith(".tmp-")]


def test_writes_replace_the_file_whole_with_plain_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    fileio.write_json_atomic(str(path), {"acc": 0.5})
    assert json.loads(path.read_text()) == {"acc": 0.5}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600
    fileio.write_jsonl_atomic(str(path), [{"a": 1}, {"b": "é"}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"a": 1}, {"b": "é"}]
    fileio.write_text_atomic(str(path), "x")
    assert path.read_text() == "x" and not _leftovers(path.parent)


def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.write_jsonl_atomic(str(path), rows())
    assert path.read_text() == "old\n" and not _leftovers(tmp_path)
    with pytest.raises(TypeError):
        fileio.write_json_atomic(str(tmp_path / "new.json"), {"x": object()})
    assert not (tmp_path / "new.json").exists() and not _leftovers(tmp_path)
