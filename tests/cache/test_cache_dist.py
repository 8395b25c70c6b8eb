"""`torchrun --nproc-per-node 2 -m saediff cache ...` (gloo, CPU): one shard per rank, read back
as one cache that holds exactly the rows a 1-process run writes for every document."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from saediff.cache import open_cache, verify_cache

from test_cache import write_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache(args: list[str], cwd: Path, ranks: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "saediff"] if ranks is None else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
        f"--master-port={_free_port()}", "-m", "saediff"]
    return subprocess.run(launch + ["cache", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _per_document(path: Path) -> dict[int, dict[str, np.ndarray]]:
    with open_cache(path) as c:
        doc = c.doc_ids(0, c.rows)
        cols = {"tokens": c.tokens(0, c.rows), "roles": c.roles(0, c.rows),
                "positions": c.positions(0, c.rows),
                **{f"acts/{s}": c.activations(s, 0, c.rows).numpy() for s in c.sources}}
    return {int(d): {k: v[doc == d] for k, v in cols.items()} for d in np.unique(doc)}


def test_two_ranks_hold_the_same_rows_per_document_as_one(tmp_path, tiny_qwen, tiny_qwen_ft, capsys):
    data = write_data(tmp_path / "docs.jsonl", n=30)
    common = ["--base", str(tiny_qwen), "--finetuned", str(tiny_qwen_ft), "--layer", "1",
              "--dataset", str(data), "--prompt-field", "prompt", "--response-field", "response",
              "--max-tokens", "100000", "--ctx-len", "32", "--dtype", "float32",
              # batch 1: a document's forward pass does not depend on which other documents
              # share its padded batch, so the activations must be equal to the bit (with larger
              # batches they agree to ~1e-8, float summation order)
              "--batch-size", "1"]
    one = _cache(common + ["--out", str(tmp_path / "one.h5")], tmp_path, None)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cache(common + ["--out", str(tmp_path / "two.h5")], tmp_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _per_document(tmp_path / "one.h5"), _per_document(tmp_path / "two.h5")
    assert sorted(a) == sorted(b) == list(range(30))
    for d in a:
        for k in a[d]:
            np.testing.assert_array_equal(a[d][k], b[d][k], err_msg=f"doc {d} {k}")
    # both ranks wrote a shard; the merged file reads as one complete cache
    shards = sorted(p.name for p in (tmp_path / "two.h5.shards").glob("*.h5"))
    assert shards == ["rank000-of-002.h5", "rank001-of-002.h5"]
    with open_cache(tmp_path / "two.h5") as c:
        info = c.info()
        offs, seq = c.sequence_offsets(0, c.n_sequences), c.sequence_ids(0, c.rows)
        assert np.array_equal(np.repeat(np.arange(c.n_sequences), np.diff(offs)), seq)
    assert info["world_size"] == 2 and info["complete"]
    assert verify_cache(tmp_path / "two.h5") == []
    from saediff.cli import main  # in-process: one interpreter start less than a subprocess

    capsys.readouterr()
    assert main(["cache", "info", str(tmp_path / "two.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 2
    with open_cache(tmp_path / "one.h5") as c:
        assert c.info()["world_size"] == 1
    # the training store serves it like any cache (rows from both shards)
    from saediff.cache import ActivationStore

    store = ActivationStore(str(tmp_path / "two.h5"), batch_size=64, seed=0)
    batch = next(iter(store))
    store.close()
    assert batch.shape == (64, info["d_model"]) and bool(batch.isfinite().all())
    # a rerun reuses both finished shards and rewrites the merged file identically
    again = _cache(common + ["--out", str(tmp_path / "two.h5")], tmp_path, 2)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    c2 = _per_document(tmp_path / "two.h5")
    assert all(np.array_equal(c2[d]["acts/finetuned"], b[d]["acts/finetuned"]) for d in b)
