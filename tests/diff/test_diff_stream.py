"""Issue 13: the streaming differ equals the dense computation, also under a tiny memory bound."""
from __future__ import annotations

import math

import pytest
import torch

from saediff.diff.stream import LatentStats
from saediff.stats import bootstrap_mean_ci, group_sums

from test_diff import cfg_for, make_sae


def sparse_pair(n=300, d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(n, d, generator=g) - 1.0)
    b = torch.relu(a + 0.3 * torch.randn(n, d, generator=g) + torch.linspace(-0.3, 0.3, d))
    groups = torch.arange(n) // 7
    return a, b, groups


def test_stream_equals_dense_in_any_chunking():
    a, b, groups = sparse_pair()
    st = LatentStats(a.shape[1], int(groups.max()) + 1)
    for s, e in [(0, 1), (1, 64), (64, 65), (65, 300)]:  # uneven chunks, one-row chunks
        st.update(a[s:e], b[s:e], groups[s:e])
    rows = {r["latent"]: r for r in st.table(n_boot=300)}
    shift = b.double().mean(0) - a.double().mean(0)
    lo, hi = bootstrap_mean_ci(*group_sums(b - a, groups), 300, 0.95, 0)
    for j in range(a.shape[1]):
        assert rows[j]["mean_shift"] == pytest.approx(float(shift[j]), abs=1e-12)
        assert rows[j]["freq_finetuned"] == pytest.approx(float((b[:, j] > 0).double().mean()))
        assert rows[j]["ci_low"] == pytest.approx(float(lo[j]), abs=1e-6)
        assert rows[j]["ci_high"] == pytest.approx(float(hi[j]), abs=1e-6)
    dense_order = torch.argsort(shift.abs(), descending=True, stable=True).tolist()
    assert [r["latent"] for r in st.table(n_boot=10)] == dense_order


def test_stream_without_prompt_table_reports_given_cis_only():
    a, b, groups = sparse_pair(seed=1)
    full = LatentStats(a.shape[1], int(groups.max()) + 1)
    part = LatentStats(a.shape[1], int(groups.max()) + 1, keep_groups=False)
    full.update(a, b, groups)
    part.update(a, b, groups)
    ref = full.table(n_boot=200)
    top = [r["latent"] for r in ref[:5]]
    sums, _ = group_sums(b[:, top] - a[:, top], groups)
    got = part.table(n_boot=200, group_sums=(top, sums))
    assert [r["latent"] for r in got] == [r["latent"] for r in ref]
    for r, q in zip(got[:5], ref[:5]):
        assert r["ci_low"] == pytest.approx(q["ci_low"], abs=1e-6)
    assert all(math.isnan(r["ci_low"]) and not r["significant"] for r in got[5:])


def test_run_diff_tiny_memory_bound_same_ranking(tmp_path, tiny_qwen, tiny_qwen_ft):
    from saediff.diff.differ import run_diff

    from test_diff import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", n=12)
    sae = make_sae(tmp_path / "sae")
    big = run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, prompts))
    # 64 latents x 12 prompts x 8 B = 6 KB: a 4 KB bound drops the prompt table -> pass-2 CIs
    small = run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, prompts, max_memory_gb=4e-6))
    assert [r["latent"] for r in small.table] == [r["latent"] for r in big.table]
    for r, q in zip(small.table[:10], big.table[:10]):
        assert r["mean_shift"] == pytest.approx(q["mean_shift"], abs=1e-6)  # row-chunked encode
        assert r["ci_low"] == pytest.approx(q["ci_low"], abs=1e-5)
    ctx = lambda res: [[(c["example"], c["peak_pos"], c["tokens"]) for c in e["contexts"]]  # noqa: E731
                       for e in res.evidence]
    assert ctx(small) == ctx(big)
