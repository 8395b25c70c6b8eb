"""The sparse TopK / BatchTopK step trains the same SAE as SAELens's dense `SAETrainer`: weights
after N full steps (forward, aux loss on dead latents, backward, clipping, Adam, schedule)."""
from __future__ import annotations

import copy

import pytest
import torch

from saediff.train.loop import TrainConfig, build_sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_weights_after_n_steps_equal_saelens_dense_trainer(arch):
    from sae_lens.training.sae_trainer import SAETrainer

    from saediff.train.trainer import FastSAETrainer

    cfg = TrainConfig(architecture=arch, d_sae=96, k=4, batch_size=64, total_tokens=64 * 40,
                      lr=1e-3, normalize=False, dead_feature_window=2)
    sae = build_sae(cfg, 24, {})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_enc[:24] = -8.0                # never fire: dead after 2 steps, aux loss runs
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    dense_sae = copy.deepcopy(sae)
    start = {n: p.detach().clone() for n, p in sae.named_parameters()}
    fast = FastSAETrainer(cfg, sae, None)
    assert fast.fast is not None             # the sparse path is under test
    dense = SAETrainer(fast.cfg, dense_sae, None)
    g = torch.Generator().manual_seed(0)
    aux_seen = 0.0
    for _ in range(8):
        x = torch.randn(64, 24, generator=g) * 2 + 0.5
        out = fast.step(x)
        dense.step(x)
        aux_seen += float(out["aux_loss"])
    assert aux_seen > 0 and bool(fast.dead_neurons.any())
    assert torch.equal(fast.dead_neurons, dense.dead_neurons)
    for (name, p), q in zip(dense_sae.named_parameters(), sae.parameters()):
        assert (q - start[name]).abs().max() > 1e-3, name     # it really trained
        assert (p - q).abs().max() < 2e-5, (name, (p - q).abs().max())
