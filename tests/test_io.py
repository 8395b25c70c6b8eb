"""saediff.io: atomic writes, strict JSON, output locks and staged output directories."""
from __future__ import annotations

import json
import math

import pytest

from saediff import io
from saediff.errors import SaediffError


def _strict_loads(text: str):
    """json.loads that refuses NaN/Infinity (what strict parsers such as JavaScript's do)."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_failing_writer_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temp sibling

    io.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("new but half")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_replaces_a_directory_whole(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "stale.txt").write_text("x")
    with io.atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("y")
    assert sorted(p.name for p in d.iterdir()) == ["fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old copy is gone too


def test_temp_siblings_are_hidden_and_unique(tmp_path):
    a, b = io.temp_sibling(tmp_path / "f.json"), io.temp_sibling(tmp_path / "f.json")
    assert a != b and a.parent == tmp_path and a.name.startswith(".f.json.")


def test_strict_json_writes_null_for_nan_and_inf(tmp_path):
    obj = {"rate": math.nan, "xs": [1.5, math.inf, -math.inf], "t": (math.nan,), "ok": 2}
    text = io.json_dumps(obj)
    assert "NaN" not in text and "Infinity" not in text
    assert _strict_loads(text) == {"rate": None, "xs": [1.5, None, None], "t": [None], "ok": 2}
    io.write_json(tmp_path / "a.json", obj)
    assert _strict_loads((tmp_path / "a.json").read_text())["rate"] is None
    rows = [{"i": 0, "v": math.nan}, {"i": 1, "v": 0.25}]
    io.write_jsonl(tmp_path / "b.jsonl", rows)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert [_strict_loads(ln) for ln in lines] == [{"i": 0, "v": None}, {"i": 1, "v": 0.25}]


def test_safe_child_refuses_names_that_leave_the_root(tmp_path):
    assert io.safe_child(tmp_path, "run1", "--name") == (tmp_path / "run1").resolve()
    for bad in ("..", "../x", "/etc/passwd", "a/b", ""):
        with pytest.raises(SaediffError, match="would leave"):
            io.safe_child(tmp_path, bad, "--name")


def test_writable_checks_name_the_input(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SaediffError, match="exists and is not a directory"):
        io.check_writable_dir(f)
    with pytest.raises(SaediffError, match="is a directory; give a file path"):
        io.check_writable_file(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SaediffError, match="symlink to .*does not exist"):
        io.check_writable_dir(tmp_path / "dangling")
    assert io.check_writable_dir(tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe file is gone


def test_output_lock_is_reentrant_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    with io.output_lock(out):
        lock = io.lock_path(out)
        assert lock.read_text() == str(__import__("os").getpid())
        with io.output_lock(out):  # same process: re-entrant
            assert lock.exists()
        assert lock.exists()  # the inner release keeps the outer lock
    assert not lock.exists()
    assert io.lock_path(tmp_path / "f.h5", directory=False).name == "f.h5.lock"


def test_staged_outputs_move_in_together_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("old report")
    (out / "ranking.json").write_text("old ranking")
    (out / "notes.txt").write_text("the user's file")
    with pytest.raises(RuntimeError):
        with io.staged_outputs(out, ["report.html", "ranking.json"], "diff") as stage:
            (stage / "report.html").write_text("new report")
            raise RuntimeError("killed half way")
    assert (out / "report.html").read_text() == "old report"  # the old run stays whole
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "ranking.json", "report.html"]

    with io.staged_outputs(out, ["report.html", "ranking.json"], "diff") as stage:
        (stage / "report.html").write_text("new report")
    # an owned output this run did not write is stale and removed; the user's file stays
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.html"]
    assert (out / "report.html").read_text() == "new report"
    io.check_complete(out)


def test_check_complete_refuses_a_marked_directory(tmp_path):
    io.mark_incomplete(tmp_path, "steer")
    with pytest.raises(SaediffError, match=r"incomplete: a `steer` run was killed"):
        io.check_complete(tmp_path, "steer output")
    io.mark_complete(tmp_path)
    io.check_complete(tmp_path)
    with pytest.raises(RuntimeError):
        with io.incomplete_until_done(tmp_path, "train"):
            raise RuntimeError
    with pytest.raises(SaediffError, match="`train`"):  # the marker stays after a failure
        io.check_complete(tmp_path)
