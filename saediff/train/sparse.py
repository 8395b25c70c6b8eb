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

import warnings
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


def _sampled(acts: SparseActs, g: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """<g[row], W_dec[col]> for every active entry (sampled dense-dense matmul)."""
    pattern = acts.csr(torch.zeros_like(acts.vals))
    out = torch.sparse.sampled_addmm(pattern, g, w_dec.T, beta=0.0, alpha=1.0)
    return out.values()


def _decode(acts: SparseActs, w_dec: torch.Tensor) -> torch.Tensor:
    """A @ W_dec as a weighted gather-sum of decoder rows (one fused kernel, no CSR build):
    embedding_bag over each row's active latents, rows given by their start offsets."""
    counts = torch.bincount(acts.rows, minlength=acts.n_rows)
    offsets = torch.zeros(acts.n_rows, dtype=torch.int64, device=acts.rows.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return F.embedding_bag(acts.cols, w_dec, offsets, mode="sum",
                           per_sample_weights=acts.vals.to(w_dec.dtype))


def _stable_argsort(t: torch.Tensor) -> torch.Tensor:
    """Stable argsort; on CPU numpy's single-threaded sort: torch's parallel sort of a few
    10^4 indices stalls for up to a second on a busy 2-core machine (measured 0.73-1.06 s
    with 2 threads vs 6-15 ms with 1), the same permutation either way."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.argsort(t.numpy(), kind="stable"))
    return torch.argsort(t, stable=True)


@torch.no_grad()
def select(sae: TopKTrainingSAE, x: torch.Tensor, dp: Any = None,
           w_buf: torch.Tensor | None = None
           ) -> tuple[SparseActs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode a batch: (active latents with values in decoder units, pre_s [B, d_sae], n, sae_in).

    `dp` (`train.ddp.DataParallel` under torchrun, x = this rank's share): BatchTopK keeps the
    k * (global batch) largest activations of the global batch, as a single process would.
    `w_buf` ([d_in, d_sae], optional): where to write W_enc * n (decoder-norm rescale), so the
    step reuses one buffer instead of allocating (and page-faulting) a fresh d_in x d_sae
    tensor each step; the same values either way.
    """
    w_enc, b_enc, w_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    with record_function("saediff.scale"):
        sae_in = x - b_dec if sae.cfg.apply_b_dec_to_input else x
        n = w_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
        if n is not None:
            w_s = torch.mul(w_enc, n, out=w_buf) if _fits(w_buf, w_enc) else w_enc * n
            b_s = b_enc * n
        else:
            w_s, b_s = w_enc, b_enc
    with record_function("saediff.encode"):
        pre_s = torch.addmm(b_s, sae_in, w_s)
    with record_function("saediff.topk"):
        acts = _top(sae, pre_s, dp)
    return (acts, pre_s, n if n is not None else torch.ones(acts.n_cols, device=pre_s.device),
            sae_in)


def _fits(buf: torch.Tensor | None, like: torch.Tensor) -> bool:
    """`buf` can take the result of an elementwise op on `like`."""
    return buf is not None and buf.shape == like.shape and buf.dtype == like.dtype \
        and buf.device == like.device


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
        rows, cols, vals = flat // m, flat % m, scores[flat]
    elif isinstance(sae, BatchTopKTrainingSAE):
        top = torch.topk(pre_s.relu().flatten(), int(sae.cfg.k * B), sorted=False)
        order = _stable_argsort(top.indices)      # indices are distinct: any sort agrees
        flat = top.indices[order]
        rows, cols, vals = flat // m, flat % m, top.values[order]
    else:
        top = torch.topk(pre_s, int(sae.cfg.k), dim=-1, sorted=False)
        rows = torch.arange(B, device=pre_s.device).repeat_interleave(int(sae.cfg.k))
        cols, vals = top.indices.flatten(), top.values.flatten().relu()
    return SparseActs(rows, cols, vals, B, m)


class SparseTopKStep:
    """SAELens `training_forward_pass` + backward for one TopK/BatchTopK SAE, sparse.

    The scaled encoder (W_enc * n) and W_enc's [d_in, d_sae] gradient live in buffers
    allocated once and reused: a fresh d_in x d_sae tensor each step costs its page faults.
    """

    def __init__(self, sae: TopKTrainingSAE):
        self.sae = sae
        m, d = sae.W_dec.shape
        kw = {"dtype": sae.W_dec.dtype, "device": sae.W_dec.device}
        self.buf_w_enc = torch.empty(d, m, **kw)
        # W_enc * n (decoder-norm rescale): the encoder's weights this step
        self.buf_w_enc_s = torch.empty(d, m, **kw) if sae.cfg.rescale_acts_by_decoder_norm \
            else None

    @staticmethod
    def _scatter(acts: SparseActs, order: torch.Tensor, crow: torch.Tensor,
                 values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """A^T @ dense ([n_cols, d]), A = acts pattern with `values`: one bag per latent
        (its entries, sorted by latent) summing the weighted rows of `dense`. embedding_bag's
        fused gather-sum ran 2x faster than the CSR sparse @ dense product on this CPU (466
        vs 959 ms at d_sae 16,384, batch 4,096); a latent with no entry gets a zero row."""
        return F.embedding_bag(acts.rows[order], dense, crow[:-1], mode="sum",
                               per_sample_weights=values[order].to(dense.dtype))

    @staticmethod
    def _transpose_pattern(acts: SparseActs) -> tuple[torch.Tensor, torch.Tensor]:
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
        backward / aux / transpose), which `benchmarks/bench_scale_train.py` turns into a
        breakdown.
        """
        sae = self.sae
        B = x.shape[0]
        acts_s, pre_s, n, sae_in = select(sae, x, dp, self.buf_w_enc_s)
        self._update_threshold(acts_s, x, dp)
        a = acts_s.vals / n[acts_s.cols]           # value multiplying the raw decoder row
        acts = SparseActs(acts_s.rows, acts_s.cols, a, B, acts_s.n_cols)
        with record_function("saediff.decode"):
            x_hat = _decode(acts, sae.W_dec).add_(sae.b_dec) if a.numel() else \
                sae.b_dec.expand_as(x).clone()
            diff = x_hat - x
            mse = diff.pow(2).sum(-1).mean()
        with record_function("saediff.backward"):
            g = diff * (2.0 / B)
            da = _sampled(acts, g, sae.W_dec) * (a > 0)
        with record_function("saediff.aux"):
            aux, aux_part = self._aux_loss(pre_s, n, diff, dead_mask)
        with record_function("saediff.backward"):
            parts = [(acts, g, da)] + ([aux_part] if aux_part is not None else [])
            grad_b_enc = self._accumulate(parts, sae_in)
            grad_b_dec = g.sum(0)
            if sae.cfg.apply_b_dec_to_input:
                grad_b_dec -= sae.W_enc @ grad_b_enc
        with record_function("saediff.transpose"):
            # the gradient is built as [d_sae, d_in] (CSR rows = latents); W_enc is [d_in, d_sae]
            self.buf_w_enc.copy_(self.grad_w_enc_t.T)
        sae.W_enc.grad = self.buf_w_enc
        sae.W_dec.grad = self.grad_w_dec
        sae.b_enc.grad = grad_b_enc
        sae.b_dec.grad = grad_b_dec
        return {"mse_loss": mse, "auxiliary_reconstruction_loss": aux, "loss": mse + aux,
                "sae_out": x_hat, "acts": acts_s}

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
        """grad_w_dec = sum A^T g, grad_w_enc_t = sum dA^T sae_in over `parts` (acts with values
        a, g, da: the main loss and the aux loss); returns d b_enc (colsum of every dA).

        The parts go in one sparse product over stacked rows (part i's entries point at rows
        i*B.. of [g_0; g_1] and [sae_in; sae_in]): one transpose pattern and one write of each
        [d_sae, d_in] gradient instead of a second read-modify-write pass for the aux loss."""
        acts, g, da = parts[0]
        if len(parts) > 1:
            B = acts.n_rows
            rows = torch.cat([p[0].rows + i * B for i, p in enumerate(parts)])
            acts = SparseActs(rows, torch.cat([p[0].cols for p in parts]),
                              torch.cat([p[0].vals for p in parts]), B * len(parts), acts.n_cols)
            g = torch.cat([p[1] for p in parts])
            da = torch.cat([p[2] for p in parts])
            sae_in = sae_in.repeat(len(parts), 1)
        order, crow = self._transpose_pattern(acts)
        self.grad_w_dec = self._scatter(acts, order, crow, acts.vals, g)
        self.grad_w_enc_t = self._scatter(acts, order, crow, da, sae_in)
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
        dead_idx = torch.nonzero(dead_mask).flatten()
        top = pre_s.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
        cols = dead_idx[top.indices.flatten()]
        rows = torch.arange(B, device=diff.device).repeat_interleave(k_aux)
        aux_acts = SparseActs(rows, cols, top.values.flatten() / n[cols], B, pre_s.shape[1])
        aux_diff = _decode(aux_acts, self.sae.W_dec) + diff   # recons - (x - x_hat)
        aux = coef * aux_diff.pow(2).sum(-1).mean()
        g_aux = aux_diff * (2.0 * coef / B)
        da_aux = _sampled(aux_acts, g_aux, self.sae.W_dec)
        return aux, (aux_acts, g_aux, da_aux)


def train_step_grads(sae: TopKTrainingSAE, x: torch.Tensor,
                     dead_mask: torch.Tensor | None) -> dict:
    """One-off `SparseTopKStep(sae)(x, dead_mask)` (tests; training reuses the step object)."""
    return SparseTopKStep(sae)(x, dead_mask)


@torch.no_grad()
def encode_ceiling_step(w_enc: torch.Tensor, b_enc: torch.Tensor, x: torch.Tensor, k: int) -> None:
    """The lower bound of any TopK step: one encoder matmul and a top-k per token."""
    torch.addmm(b_enc, x, w_enc).topk(k, dim=-1, sorted=False)
