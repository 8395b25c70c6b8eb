"""saediff.stats: grouped sums, group bootstrap, AUROC and histograms against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from saediff.stats import auroc, bootstrap_mean_ci, bootstrap_replicates, group_sums, histogram


def test_group_sums_known_answer():
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    sums, counts = group_sums(values, torch.tensor([0, 2, 0]))
    assert sums.tolist() == [[5.0, 50.0], [0.0, 0.0], [2.0, 20.0]]
    assert counts.tolist() == [2.0, 0.0, 1.0]
    sums, counts = group_sums(values, torch.tensor([0, 0, 0]), n_groups=4)
    assert sums.shape == (4, 2) and counts.tolist() == [3.0, 0.0, 0.0, 0.0]


def test_replicates_are_token_weighted_means_of_resampled_groups():
    # two groups: mean 1 over 1 token, mean 3 over 3 tokens. A replicate that draws group a
    # i times and b (2-i) times has mean (i*1 + (2-i)*9) / (i*1 + (2-i)*3).
    sums = torch.tensor([[1.0], [9.0]])
    counts = torch.tensor([1.0, 3.0])
    rep = bootstrap_replicates(sums, counts, n_boot=300, seed=0)
    allowed = {1.0, 10 / 4, 3.0}
    assert rep.shape == (300, 1)
    assert {round(float(v), 9) for v in rep[:, 0]} <= {round(a, 9) for a in allowed}
    assert len({round(float(v), 9) for v in rep[:, 0]}) == 3  # all three draws occur
    assert torch.equal(rep, bootstrap_replicates(sums, counts, n_boot=300, seed=0))
    assert not torch.equal(rep, bootstrap_replicates(sums, counts, n_boot=300, seed=1))
    # chunking does not change the draws' distribution support nor the count
    assert bootstrap_replicates(sums, counts, n_boot=7, seed=0, chunk=3).shape == (7, 1)


def test_bootstrap_drops_empty_groups_and_refuses_none():
    sums = torch.tensor([[2.0], [0.0], [4.0]])
    counts = torch.tensor([1.0, 0.0, 1.0])
    lo, hi = bootstrap_mean_ci(sums, counts, n_boot=400)
    assert 2.0 <= float(lo) <= 3.0 <= float(hi) <= 4.0  # an empty group would pull it to 0
    with pytest.raises(ValueError, match="empty"):
        bootstrap_replicates(torch.zeros(2, 1), torch.zeros(2))


def test_ci_of_a_constant_is_a_point_and_levels_nest():
    sums = torch.full((20, 1), 6.0)
    counts = torch.full((20,), 2.0)
    lo, hi = bootstrap_mean_ci(sums, counts, n_boot=100)
    assert float(lo) == pytest.approx(3.0) and float(hi) == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(40, 1, generator=g, dtype=torch.float64)
    counts = torch.ones(40)
    lo50, hi50 = bootstrap_mean_ci(sums, counts, n_boot=500, level=0.5)
    lo99, hi99 = bootstrap_mean_ci(sums, counts, n_boot=500, level=0.99)
    assert float(lo99) < float(lo50) < float(sums.mean()) < float(hi50) < float(hi99)


def test_auroc_with_ties_known_answer():
    # positives 0.5, 0.7; negatives 0.5, 0.2, 0.9: pairs won 0.5+1+0 (for 0.5) and 1+1+0 (0.7)
    assert auroc([0.5, 0.7, 0.5, 0.2, 0.9], [1, 1, 0, 0, 0]) == pytest.approx(3.5 / 6)
    assert auroc(torch.tensor([3.0, 1.0]), torch.tensor([True, False])) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.1, 0.2], [1, 1])


def test_histogram_counts_and_edges():
    h = histogram(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), bins=2)
    assert h["edges"] == [0.0, 0.5, 1.0] and h["counts"] == [2, 3]
    h = histogram(torch.tensor([2.0, 2.0]), bins=4)  # a constant gets a unit-wide range
    assert h["edges"][0] == 2.0 and h["edges"][-1] == 3.0 and sum(h["counts"]) == 2
    assert histogram(torch.tensor([]), bins=3) == {"edges": [0.0, 1.0], "counts": [0]}
    assert sum(histogram(torch.tensor([-5.0, 0.5, 5.0]), bins=4, lo=0.0, hi=1.0)["counts"]) == 1
