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


def test_transposed_encoder_resumes_and_saves_like_a_plain_one(tmp_path):
    """The sparse step stores W_enc transposed ([d_sae, d_in] memory): a checkpoint round trip
    (contiguous files, moments put back in the parameter's layout) continues exactly as the
    uninterrupted run, and the final SAELens file holds the same W_enc (not its memory read
    in the wrong order)."""
    from safetensors.torch import load_file

    from saediff.train.final import save_final
    from saediff.train.trainer import FastSAETrainer

    cfg, sae = _make("topk", {})
    resumed_sae = copy.deepcopy(sae)
    run = FastSAETrainer(cfg, sae, None)
    assert sae.W_enc.stride() == (1, D_IN)                  # the layout under test
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, D_IN, generator=g) * 2 for _ in range(6)]
    for x in xs[:3]:
        run.step(x)
    tensors, meta = run.state_tensors()
    assert all(t.is_contiguous() for t in tensors.values())
    resumed = FastSAETrainer(cfg, resumed_sae, None)
    resumed.load_state_tensors({k: v.clone() for k, v in tensors.items()}, meta)  # as a file
    for x in xs[3:]:
        run.step(x)
        resumed.step(x)
    for p, q in zip(run.sae.parameters(), resumed.sae.parameters()):
        assert torch.equal(p, q)
    save_final(run, tmp_path)
    saved = load_file(tmp_path / "sae_weights.safetensors")
    w_enc, w_dec = run.sae.W_enc.detach(), run.sae.W_dec.detach()
    # SAELens's inference file folds the decoder norms into the encoder (rescale on)
    assert torch.allclose(saved["W_enc"], w_enc * w_dec.norm(dim=-1), atol=1e-6)
    assert not torch.allclose(saved["W_enc"], w_enc.T.reshape(D_IN, D_SAE) * w_dec.norm(dim=-1))


def test_reused_gradient_buffers_hold_only_this_steps_gradient():
    """On CPU the step writes W_enc's and W_dec's gradients into two buffers it keeps (no fresh
    [d_sae, d_in] tensor per step): whatever they held (the last step's gradient, with or
    without the aux loss; NaN) must not leak into the next one, and they must really be reused
    (the same memory every call), else this test checks nothing."""
    from saediff.train.sparse import SparseTopKStep

    _, sae = _make("topk", {})
    step = SparseTopKStep(sae)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:20] = True
    g = torch.Generator().manual_seed(2)
    ptrs = None
    for i, (B, mask) in enumerate([(64, dead), (48, None), (80, dead), (64, None)]):
        x = torch.randn(B, D_IN, generator=g) * 2
        if i == 2:
            for buf in step.grad_bufs:
                buf.fill_(float("nan"))      # stale garbage in the buffers
        step(x, mask)
        got = {n: p.grad.clone() for n, p in sae.named_parameters()}
        now = (sae.W_enc.grad.data_ptr(), sae.W_dec.grad.data_ptr())
        assert ptrs is None or now == ptrs, "gradient buffers not reused"
        ptrs = now
        fresh = copy.deepcopy(sae)
        SparseTopKStep(fresh)(x, mask)       # a step that has never run before
        for n, p in fresh.named_parameters():
            assert torch.isfinite(got[n]).all(), (i, n)
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), (i, n)
