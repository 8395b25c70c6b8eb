"""The sparse TopK / BatchTopK step (saediff/train/sparse.py) trains the same weights as a
reference written here: SAELens's dense `training_forward_pass` + autograd, clipped, with
torch's plain (for-loop) Adam. N full steps, batch sizes changing between steps (the step's
reused buffers must follow), across the configurations the fast path accepts."""
from __future__ import annotations

import copy

import pytest
import torch

from saediff.train.loop import TrainConfig, build_sae

D_IN, D_SAE, STEPS = 24, 96, 6


def _reference_step(sae, opt, x, dead):
    """One dense SAELens step: the ground truth (no saediff code)."""
    from sae_lens.saes.sae import TrainStepInput

    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
        is_logging_step=False))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return float(out.loss)


def _make(arch, sae_kwargs):
    cfg = TrainConfig(architecture=arch, d_sae=D_SAE, k=4, batch_size=64,
                      total_tokens=64 * 100, lr=1e-3, normalize=False, dead_feature_window=10 ** 6,
                      lr_scheduler="constant", lr_warm_up_steps=0, sae_kwargs=sae_kwargs)
    sae = build_sae(cfg, D_IN, {})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_enc[:20] = -8.0                # never fire: marked dead, the aux loss runs
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)   # uneven decoder norms
    return cfg, sae


@pytest.mark.parametrize("arch,kw", [
    ("topk", {}),                                          # SAELens defaults: rescale on
    ("topk", {"rescale_acts_by_decoder_norm": False}),
    ("topk", {"apply_b_dec_to_input": False}),
    ("batchtopk", {}),
])
def test_sparse_step_weights_match_dense_reference(arch, kw):
    from saediff.train.trainer import FastSAETrainer

    cfg, sae = _make(arch, kw)
    ref = copy.deepcopy(sae)
    start = {n: p.detach().clone() for n, p in sae.named_parameters()}
    fast = FastSAETrainer(cfg, sae, None)
    assert fast.fast is not None             # the sparse path is under test
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, foreach=False)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:20] = True
    g = torch.Generator().manual_seed(0)
    for i in range(STEPS):
        B = (64, 48, 64, 80)[i % 4]          # a new batch size re-plans the buffers
        x = torch.randn(B, D_IN, generator=g) * 2 + 0.5
        fast.n_forward_passes_since_fired[:20] = 10 ** 7      # same dead set in both
        fast.n_forward_passes_since_fired[20:] = 0
        assert torch.equal(fast.dead_neurons, dead)
        loss_fast = float(fast.step(x)["loss"])
        loss_ref = _reference_step(ref, opt, x, dead)
        assert abs(loss_fast - loss_ref) <= 1e-4 * max(1.0, abs(loss_ref)), (i, loss_fast, loss_ref)
    for (name, p), q in zip(ref.named_parameters(), sae.parameters()):
        assert (q - start[name]).abs().max() > 1e-3, name      # it really trained
        assert (p - q).abs().max() < 2e-5, (name, float((p - q).abs().max()))
    if arch == "batchtopk":                  # the running inference threshold too
        assert torch.allclose(ref.topk_threshold, sae.topk_threshold, atol=1e-5)
