"""Sparse forward/backward for SAELens TopK and BatchTopK training SAEs (CPU fast path).

SAELens trains a TopK SAE by scattering the k active values into a dense [B, d_sae] tensor and
decoding with a dense matmul, so autograd's backward costs two more dense B x d_in x d_sae
matmuls (one for W_dec, one for W_enc) on top of the encoder. Only B*k entries are non-zero,
so, as EleutherAI/sparsify does, we keep the activations as index/value lists and compute the
gradients by hand:

    forward   pre_s = (x - b_dec) @ (W_enc * n) + b_enc * n     n = ||W_dec rows|| (or 1)
              top-k of pre_s (per row, or over the batch for BatchTopK), a = relu(v) / n
              x_hat = a @ W_dec + b_dec                          (gather-sum of rows)
    backward  g = d loss / d x_hat;  da = <g_row, W_dec_col>     (sampled dense-dense mm)
              dW_dec = A^T g,  dW_enc = (x - b_dec)^T dA,  db_enc = colsum dA,
              db_dec = sum g - W_enc db_enc                       (all sparse, O(B k d))

It is the same function as SAELens's `training_forward_pass` (MSE + TopK auxiliary loss on
dead latents, `rescale_acts_by_decoder_norm` honoured), so gradients match its autograd up to
float rounding (`tests/train/test_train.py` checks allclose). The weights stay the SAELens
parameters; only the arithmetic differs.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch.profiler import record_function

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


def supports_fast_path(sae: torch.nn.Module) -> bool:
    """True for plain TopK / BatchTopK training SAEs (not Matryoshka or other subclasses)."""
    return (type(sae) in (TopKTrainingSAE, BatchTopKTrainingSAE)
            and sae.cfg.normalize_activations in ("none", "expected_average_only_in")
            and sae.cfg.reshape_activations == "none")


@dataclass
class SparseActs:
    """Active latents of a batch as COO lists sorted by row: rows, cols, values (a >= 0)."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    n_rows: int
    n_cols: int

    def csr(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """[n_rows, n_cols] CSR (rows must be sorted)."""
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        crow = torch.zeros(self.n_rows + 1, dtype=torch.int64, device=self.rows.device)
        torch.cumsum(counts, 0, out=crow[1:])
        v = self.vals if values is None else values
        return torch.sparse_csr_tensor(crow, self.cols, v, (self.n_rows, self.n_cols))


@contextlib.contextmanager
def serial_cpu(t: torch.Tensor) -> Iterator[None]:
    """One intra-op thread on CPU for the step's bookkeeping: index/value vectors of B*k
    entries, per-latent counters, and the elementwise ops and reductions over B x d_in
    (x - b_dec, x_hat + b_dec, the residual, its square sum and column sums). Each such op
    takes well under a millisecond on one thread, but a multi-threaded one waits for every
    worker to be scheduled (shared 2-core machine, load 8: a 32,768-entry gather 18 ms with 2
    threads vs 0.1 ms with one). B*k*d_in products, d_sae x d_in and B x d_sae work keep every
    thread. Same ops, same results; a no-op on other devices."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sampled(acts: SparseActs, g: torch.Tensor, w_dec: torch.Tensor,
             alpha: float = 1.0) -> torch.Tensor:
    """alpha * <g[row], W_dec[col]> for every active entry (sampled dense-dense matmul)."""
    with serial_cpu(g):
        pattern = acts.csr(torch.zeros_like(acts.vals))
    out = torch.sparse.sampled_addmm(pattern, g, w_dec.T, beta=0.0, alpha=alpha)
    return out.values()


def _decode(acts: SparseActs, w_dec: torch.Tensor) -> torch.Tensor:
    """A @ W_dec as a weighted gather-sum of decoder rows (one fused kernel, no CSR build):
    embedding_bag over each row's active latents, rows given by their start offsets."""
    with serial_cpu(w_dec):
        counts = torch.bincount(acts.rows, minlength=acts.n_rows)
        offsets = torch.zeros(acts.n_rows, dtype=torch.int64, device=acts.rows.device)
        torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return F.embedding_bag(acts.cols, w_dec, offsets, mode="sum",
                           per_sample_weights=acts.vals.to(w_dec.dtype))


def _sq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all entries: one dot product instead of pow + sum passes."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _stable_argsort(t: torch.Tensor) -> torch.Tensor:
    """Stable argsort; on CPU numpy's single-threaded sort: torch's parallel sort of a few
    10^4 indices stalls for up to a second on a busy 2-core machine (measured 0.73-1.06 s
    with 2 threads vs 6-15 ms with 1), the same permutation either way."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.argsort(t.numpy(), kind="stable"))
    return torch.argsort(t, stable=True)


@torch.no_grad()
def select(sae: TopKTrainingSAE, x: torch.Tensor, dp: Any = None,
           w_buf: torch.Tensor | None = None, pre_buf: torch.Tensor | None = None
           ) -> tuple[SparseActs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode a batch: (active latents with values in decoder units, pre_s [B, d_sae], n, sae_in).

    `dp` (`train.ddp.DataParallel` under torchrun, x = this rank's share): BatchTopK keeps the
    k * (global batch) largest activations of the global batch, as a single process would.
    `w_buf` ([d_in, d_sae]) and `pre_buf` ([B, d_sae]), optional: kept buffers for W_enc * n
    (decoder-norm rescale) and pre_s, instead of fresh (page-faulting) tensors each step.
    """
    w_enc, b_enc, w_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    with record_function("saediff.scale"):
        with serial_cpu(x):
            sae_in = x - b_dec if sae.cfg.apply_b_dec_to_input else x
        n = w_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
        if n is not None:
            w_s = torch.mul(w_enc, n, out=w_buf) if _fits(w_buf, w_enc) else w_enc * n
            with serial_cpu(x):
                b_s = b_enc * n
        else:
            w_s, b_s = w_enc, b_enc
    with record_function("saediff.encode"):
        pre_s = torch.addmm(b_s, sae_in, w_s, out=pre_buf) if _fits(pre_buf, sae_in, w_s) \
            else torch.addmm(b_s, sae_in, w_s)
    with record_function("saediff.topk"):
        acts = _top(sae, pre_s, dp)
    return (acts, pre_s, n if n is not None else torch.ones(acts.n_cols, device=pre_s.device),
            sae_in)


def _fits(buf: torch.Tensor | None, like: torch.Tensor, mat2: torch.Tensor | None = None
          ) -> bool:
    """`buf` can take the result of an elementwise op on `like` (of `like @ mat2` if given)."""
    if buf is None:
        return False
    shape = like.shape if mat2 is None else (like.shape[0], mat2.shape[1])
    layout = buf.is_contiguous() if mat2 is not None else buf.stride() == like.stride()
    return buf.shape == shape and buf.dtype == like.dtype and buf.device == like.device and layout


def _top(sae: TopKTrainingSAE, pre_s: torch.Tensor, dp: Any) -> SparseActs:
    """The active latents of pre_s: top k per row (TopK) or of the whole batch (BatchTopK)."""
    B, m = pre_s.shape
    if isinstance(sae, BatchTopKTrainingSAE) and dp is not None and dp.active:
        scores = pre_s.relu().flatten()
        n_keep = int(sae.cfg.k * B * dp.world.world_size)
        local = torch.topk(scores, min(n_keep, scores.numel()), sorted=False).values
        cut = dp.kth_largest(local, n_keep)
        # zeros a single process would also "keep" carry no value and no gradient: dropped
        flat = torch.nonzero((scores >= cut) & (scores > 0)).flatten()
        with serial_cpu(flat):
            rows, cols, vals = flat // m, flat % m, scores[flat]
    elif isinstance(sae, BatchTopKTrainingSAE):
        top = torch.topk(pre_s.relu().flatten(), int(sae.cfg.k * B), sorted=False)
        with serial_cpu(pre_s):
            order = _stable_argsort(top.indices)      # indices are distinct: any sort agrees
            flat = top.indices[order]
            rows, cols, vals = flat // m, flat % m, top.values[order]
    else:
        top = torch.topk(pre_s, int(sae.cfg.k), dim=-1, sorted=False)
        with serial_cpu(pre_s):
            rows = torch.arange(B, device=pre_s.device).repeat_interleave(int(sae.cfg.k))
            cols, vals = top.indices.flatten(), top.values.flatten().relu()
    return SparseActs(rows, cols, vals, B, m)


def store_encoder_transposed(w_enc: torch.nn.Parameter) -> torch.nn.Parameter:
    """Keep W_enc ([d_in, d_sae], SAELens's shape) in [d_sae, d_in] memory; returns that
    memory as a contiguous [d_sae, d_in] parameter, W_enc being its transposed view.

    The sparse backward builds W_enc's gradient latent by latent ([d_sae, d_in] rows), so
    with this layout the gradient needs no per-step transposed copy, and Adam updates the
    contiguous [d_sae, d_in] parameter (torch's fused CPU Adam copies a non-contiguous one to
    a contiguous buffer and back, every step: more than the transpose). W_enc's values and
    shape are unchanged and it sees every update (shared memory); the encoder matmul reads it
    as a transposed operand. Files need contiguous tensors: checkpoints store W_enc and its
    moments as [d_in, d_sae] and `train.final.save_final` writes a contiguous copy."""
    t = w_enc.data.T.contiguous()
    w_enc.data = t.T
    return torch.nn.Parameter(t)


class SparseTopKStep:
    """SAELens `training_forward_pass` + backward for one TopK/BatchTopK SAE, sparse.

    W_enc is stored transposed (`store_encoder_transposed`) so its gradient needs no copy;
    the scaled encoder (W_enc * n) lives in a buffer allocated once, in the same layout, and
    reused: a fresh d_in x d_sae tensor each step costs its page faults. On CPU the W_enc and
    W_dec gradients are two such buffers too: each call overwrites them (never accumulates),
    so a `.grad` kept past the next call changes with it; so is the encoder's [B, d_sae]
    output (`_pre_buf`).
    """

    def __init__(self, sae: TopKTrainingSAE):
        self.sae = sae
        self.w_enc_t = store_encoder_transposed(sae.W_enc)   # what the optimizer updates
        m, d = sae.W_dec.shape
        kw = {"dtype": sae.W_dec.dtype, "device": sae.W_dec.device}
        # W_enc * n (decoder-norm rescale): the encoder's weights this step
        self.buf_w_enc_s = torch.empty(m, d, **kw).T if sae.cfg.rescale_acts_by_decoder_norm \
            else None
        # CPU: the two [d_sae, d_in] gradients are written into these every step (see _scatter)
        cpu = sae.W_dec.device.type == "cpu"
        self.grad_bufs = (torch.empty(m, d, **kw), torch.empty(m, d, **kw)) if cpu else None
        self.pre_buf: torch.Tensor | None = None   # CPU: the encoder's [B, d_sae] output

    def optimizer_params(self) -> list[torch.nn.Parameter]:
        """The SAE's parameters for the optimizer, W_enc as its [d_sae, d_in] memory."""
        return [self.w_enc_t if p is self.sae.W_enc else p for p in self.sae.parameters()]

    @staticmethod
    def _scatter(acts: SparseActs, order: torch.Tensor, crow: torch.Tensor,
                 values: torch.Tensor, dense: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """A^T @ dense ([n_cols, d]), A = acts pattern with `values`; a latent with no entry
        gets a zero row. With `out` (CPU): a CSR A^T (one row per latent) times `dense`,
        written over `out` (beta = 0: whatever `out` held is ignored, NaN included). A fresh
        [d_sae, d_in] result costs its page faults every step on CPU (glibc maps allocations
        above 32 MB anew and torch's CPU allocator keeps none): alone
        (benchmarks/bench_topk_scatter.py, load 0.9) this was 3.0-6.0x faster than
        embedding_bag into a fresh tensor (16,384 / 1,024: 5.6 vs 27 ms). Without `out`:
        embedding_bag's fused gather-sum (GPU: its caching allocator makes fresh tensors free)."""
        with serial_cpu(dense):
            idx, w = acts.rows[order], values[order].to(dense.dtype)
        if out is None:
            return F.embedding_bag(idx, dense, crow[:-1], mode="sum", per_sample_weights=w)
        a_t = torch.sparse_csr_tensor(crow, idx, w, (acts.n_cols, dense.shape[0]))
        return torch.addmm(out, a_t, dense, beta=0.0, out=out)

    @staticmethod
    def _transpose_pattern(acts: SparseActs) -> tuple[torch.Tensor, torch.Tensor]:
        with serial_cpu(acts.cols):
            order = _stable_argsort(acts.cols)
            counts = torch.bincount(acts.cols, minlength=acts.n_cols)
            crow = torch.zeros(acts.n_cols + 1, dtype=torch.int64, device=acts.cols.device)
            torch.cumsum(counts, 0, out=crow[1:])
        return order, crow

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, dead_mask: torch.Tensor | None, dp: Any = None) -> dict:
        """Loss on batch `x`; sets `.grad` of every parameter of the SAE.

        Returns mse_loss, auxiliary_reconstruction_loss, loss, sae_out and `acts` (the active
        latents, values as SAELens's feature_acts). Each phase runs under a
        `torch.profiler.record_function` label (saediff.scale / encode / topk / decode /
        backward / aux), which `benchmarks/bench_scale_train.py` turns into a
        breakdown.
        """
        sae = self.sae
        if sae.W_enc.data_ptr() != self.w_enc_t.data_ptr():
            raise RuntimeError("SAE.W_enc was replaced after the sparse step was built; the "
                               "optimizer would no longer update it")
        B = x.shape[0]
        acts_s, pre_s, n, sae_in = select(sae, x, dp, self.buf_w_enc_s, self._pre_buf(x))
        self._update_threshold(acts_s, x, dp)
        with serial_cpu(x):
            a = acts_s.vals / n[acts_s.cols]           # value multiplying the raw decoder row
        acts = SparseActs(acts_s.rows, acts_s.cols, a, B, acts_s.n_cols)
        with record_function("saediff.decode"):
            x_hat = _decode(acts, sae.W_dec) if a.numel() else torch.zeros_like(x)
            with serial_cpu(x):
                x_hat.add_(sae.b_dec)
                diff = x_hat - x
                mse = _sq_sum(diff) / B
        with record_function("saediff.backward"):
            # d mse / d x_hat = diff * 2/B: the factor goes into the B*k entry weights and
            # alpha, not into one more B x d_in pass
            c = 2.0 / B
            da = _sampled(acts, diff, sae.W_dec, alpha=c)
            with serial_cpu(da):
                da *= a > 0
        with record_function("saediff.aux"):
            aux, aux_part = self._aux_loss(pre_s, n, diff, dead_mask)
        with record_function("saediff.backward"):
            with serial_cpu(da):
                main = SparseActs(acts.rows, acts.cols, a * c, B, acts.n_cols)
            parts = [(main, diff, da)] + ([aux_part] if aux_part is not None else [])
            grad_b_enc = self._accumulate(parts, sae_in)
            with serial_cpu(diff):
                grad_b_dec = diff.sum(0).mul_(c)
            if sae.cfg.apply_b_dec_to_input:
                grad_b_dec -= sae.W_enc @ grad_b_enc
        # built as [d_sae, d_in] (one row per latent): the layout W_enc is stored in
        self.w_enc_t.grad = self.grad_w_enc_t
        sae.W_enc.grad = self.grad_w_enc_t.T       # the same memory (DDP averages it there)
        sae.W_dec.grad = self.grad_w_dec
        sae.b_enc.grad = grad_b_enc
        sae.b_dec.grad = grad_b_dec
        return {"mse_loss": mse, "auxiliary_reconstruction_loss": aux, "loss": mse + aux,
                "sae_out": x_hat, "acts": acts_s}

    def _pre_buf(self, x: torch.Tensor) -> torch.Tensor | None:
        """CPU: a kept [B, d_sae] buffer for the encoder's output (new when B changes; none under
        autocast): a fresh one costs its page faults every step (16,384 / 1,024: 67 MB)."""
        if self.grad_bufs is None or torch.is_autocast_enabled(x.device.type):
            return None
        if not _fits(self.pre_buf, x, self.w_enc_t.T):
            self.pre_buf = x.new_empty(x.shape[0], self.w_enc_t.shape[0])
        return self.pre_buf

    def _update_threshold(self, acts_s: SparseActs, x: torch.Tensor, dp: Any) -> None:
        """BatchTopK: the running inference threshold tracks the smallest kept activation."""
        if not isinstance(self.sae, BatchTopKTrainingSAE):
            return
        pos = acts_s.vals > 0
        low = acts_s.vals[pos].min() if pos.any() else x.new_tensor(float("inf"))
        if dp is not None:
            low = dp.min(low)  # the global batch's smallest kept activation
        if torch.isfinite(low):
            self.sae.update_topk_threshold(low.reshape(1))

    def _accumulate(self, parts: list[tuple[SparseActs, torch.Tensor, torch.Tensor]],
                    sae_in: torch.Tensor) -> torch.Tensor:
        """grad_w_dec = sum A^T g, grad_w_enc_t = sum dA^T sae_in over `parts` (the main loss
        and the aux loss: acts with values c*a, the residual r with d loss / d x_hat = c*r, and
        dA); returns d b_enc (colsum of every dA). Below, g stands for r.

        The parts go in one sparse product over stacked rows (part i's entries point at rows
        i*B.. of [g_0; g_1] and [sae_in; sae_in]): one transpose pattern and one write of each
        [d_sae, d_in] gradient instead of a second read-modify-write pass for the aux loss."""
        acts, g, da = parts[0]
        if len(parts) > 1:
            B = acts.n_rows
            with serial_cpu(g):
                rows = torch.cat([p[0].rows + i * B for i, p in enumerate(parts)])
                acts = SparseActs(rows, torch.cat([p[0].cols for p in parts]),
                                  torch.cat([p[0].vals for p in parts]), B * len(parts),
                                  acts.n_cols)
                da = torch.cat([p[2] for p in parts])
                g = torch.cat([p[1] for p in parts])
                sae_in = sae_in.repeat(len(parts), 1)
        order, crow = self._transpose_pattern(acts)
        bufs = self.grad_bufs or (None, None)
        self.grad_w_dec = self._scatter(acts, order, crow, acts.vals, g, bufs[0])
        self.grad_w_enc_t = self._scatter(acts, order, crow, da, sae_in, bufs[1])
        with serial_cpu(g):
            return torch.zeros(acts.n_cols, dtype=g.dtype, device=g.device).index_add_(
                0, acts.cols, da)

    def _aux_loss(self, pre_s: torch.Tensor, n: torch.Tensor, diff: torch.Tensor,
                  dead_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, tuple[SparseActs, torch.Tensor, torch.Tensor] | None]:
        """SAELens's TopK auxiliary loss on dead latents, and its part of the backward
        (aux latents, d aux / d recons, d aux / d their values) for `_accumulate`."""
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        if num_dead == 0:
            return diff.new_zeros(()), None
        B, d = diff.shape
        k_aux = d // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        coef = self.sae.cfg.aux_loss_coefficient * scale
        # top k_aux among the dead columns only: the same set as masking the live ones to
        # -inf, without writing and searching a full [B, d_sae] copy
        with serial_cpu(diff):
            dead_idx = torch.nonzero(dead_mask).flatten()
        top = pre_s.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
        with serial_cpu(diff):
            cols = dead_idx[top.indices.flatten()]
            rows = torch.arange(B, device=diff.device).repeat_interleave(k_aux)
            aux_acts = SparseActs(rows, cols, top.values.flatten() / n[cols], B, pre_s.shape[1])
        aux_diff = _decode(aux_acts, self.sae.W_dec)
        with serial_cpu(diff):
            aux_diff += diff                                 # recons - (x - x_hat)
            aux = coef * _sq_sum(aux_diff) / B
        c = 2.0 * coef / B                                   # d aux / d aux_diff = c * aux_diff
        da_aux = _sampled(aux_acts, aux_diff, self.sae.W_dec, alpha=c)
        with serial_cpu(da_aux):
            weighted = SparseActs(rows, cols, aux_acts.vals * c, B, aux_acts.n_cols)
        return aux, (weighted, aux_diff, da_aux)


@torch.no_grad()
def encode_ceiling_step(w_enc: torch.Tensor, b_enc: torch.Tensor, x: torch.Tensor, k: int,
                        out: torch.Tensor | None = None) -> None:
    """The lower bound of any TopK step: one encoder matmul and a top-k per token (into `out`,
    a kept [B, d_sae] buffer, if given: the encoder's own cost without a fresh output's page
    faults, as the CPU step has it)."""
    torch.addmm(b_enc, x, w_enc, out=out).topk(k, dim=-1, sorted=False)
