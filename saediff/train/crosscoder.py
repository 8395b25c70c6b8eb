"""Train a two-model crosscoder (`saediff.crosscoder.Crosscoder`) from a paired cache.

Reads (base, fine-tuned) activations of the same tokens (`PairedStore`), scales both by one
shared factor to mean norm sqrt(d) (one factor, so relative decoder norms are unchanged when
it is folded back), and minimises the summed squared error of both reconstructions with
BatchTopK sparsity, plus the TopK auxiliary loss on dead latents (as the SAE trainer, `sparse`).
The inference threshold is the running mean of the smallest kept norm-weighted activation per
batch. Writes the run directory (cfg.json + safetensors,
metrics.jsonl, train_config.json, evals.json with FVU and L0 on held-out tokens).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saediff.config import config_to_dict
from saediff.crosscoder import Crosscoder, CrosscoderCfg
from saediff.dist import Dist
from saediff.errors import SaediffError
from saediff.io import json_dumps, mark_complete, mark_incomplete, write_json, write_text

log = logging.getLogger(__name__)


def _split(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.dim() != 3 or batch.shape[1] != 2:
        raise SaediffError(f"crosscoder batches must be [B, 2, d] (base, fine-tuned), got "
                           f"{tuple(batch.shape)}")
    return batch[:, 0], batch[:, 1]


def aux_loss(cc: Crosscoder, hidden_pre: torch.Tensor, errors: tuple[torch.Tensor, ...],
             dead: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """TopK auxiliary loss (Gao et al. 2024, as SAELens's TopK SAE) for both decoders.

    The k_aux = d_in/2 largest pre-ReLU outputs among dead latents reconstruct each model's
    (detached) residual error, so dead latents get a gradient towards what the live ones miss;
    scaled down while fewer than k_aux latents are dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    k_aux = cc.cfg.d_in // 2
    scale = min(n_dead / k_aux, 1.0)
    top = hidden_pre.masked_fill(~dead, -torch.inf).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    f_aux = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values)
    loss = sum(((f_aux @ cc.W_dec[m] - e.detach()) ** 2).sum(-1).mean()
               for m, e in enumerate(errors))
    return coefficient * scale * loss


@torch.no_grad()
def fold_scale(cc: Crosscoder, scale: float) -> None:
    """Make a crosscoder trained on x * scale work on raw x (encoder x scale, decoder / scale)."""
    cc.W_enc.mul_(scale)
    cc.b_dec.div_(scale)
    cc.W_dec.div_(scale)
    # score = f * decoder norm sum: f is unchanged (same pre-activations), norms shrink by scale
    cc.threshold.div_(scale)


@torch.no_grad()
def crosscoder_evals(cc: Crosscoder, batches: list[torch.Tensor]) -> dict[str, Any]:
    """{base, finetuned: {fvu, l0, dead_frac, tokens}} on held-out paired batches (raw scale)."""
    sse, sst, l0, n = torch.zeros(2), torch.zeros(2), 0.0, 0
    fired = torch.zeros(cc.cfg.d_sae, dtype=torch.bool)
    xs = [[], []]
    for b in batches:
        xb, xf = _split(b)
        f, rb, rf = cc(xb, xf)
        for m, (x, r) in enumerate(((xb, rb), (xf, rf))):
            sse[m] += ((x - r) ** 2).sum()
            xs[m].append(x)
        l0 += float((f > 0).sum())
        n += f.shape[0]
        fired |= (f > 0).any(0)
    for m in range(2):
        x = torch.cat(xs[m])
        sst[m] = ((x - x.mean(0)) ** 2).sum()
    fvu = (sse / sst.clamp_min(1e-12)).tolist()
    # the per-source layout of the SAE evals.json (one shared code, so L0 / dead are shared)
    return {m: {"fvu": fvu[i], "l0": l0 / max(n, 1), "dead_frac": float((~fired).float().mean()),
                "tokens": n} for i, m in enumerate(("base", "finetuned"))}


def train_crosscoder(cfg: Any, store: Any, info: dict[str, Any] | None = None,
                     eval_batches: list[torch.Tensor] | None = None, dp: Any = None) -> Path:
    """Train per `cfg` (a TrainConfig with architecture crosscoder); returns the run dir.

    `store` yields [B, 2, d] paired batches (`PairedStore`, or a `TensorStore` in tests);
    `info` is the cache description from `check_caches` (hook name, layer, models).
    `dp` (`train.ddp.DataParallel`, under torchrun): every rank draws the same global batch,
    trains on its share and all-reduces gradients and fire counts; BatchTopK keeps the largest
    scores of the global batch (as one rank would); rank 0 writes the run.
    """
    info = info or {"layer": getattr(store, "layer", -1),
                    "hook_name": getattr(store, "hook_name", ""), "models": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1 if cfg.device == "cpu" else threads)
    try:
        return _train(cfg, store, info, eval_batches, dp)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Any, store: Any, info: dict[str, Any],
           eval_batches: list[torch.Tensor] | None, dp: Any) -> Path:
    from saediff.train.ddp import DataParallel

    dp = dp or DataParallel(Dist(), cfg.batch_size, cfg.device)
    main = dp.world.is_main
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", config_to_dict(cfg))
        mark_incomplete(out, "saediff train")  # until the crosscoder and its evals are written
    meta = {"hook_name": info["hook_name"], "layer": info["layer"],
            "models": info.get("models", {}),
            "saediff_caches": [str(p) for p in cfg.cache or []]}
    first = next(store)
    d = int(first.shape[-1])  # (a TensorStore's d_model is the pair axis)
    cc = Crosscoder(CrosscoderCfg(d_in=d, d_sae=cfg.d_sae, k=float(cfg.k), metadata=meta),
                    seed=cfg.seed).to(cfg.device)
    probe = [first] + [next(store) for _ in range(cfg.norm_batches - 1)] if cfg.normalize else []
    if probe:
        mean = torch.cat([b.norm(dim=-1).flatten() for b in probe]).mean()
        scale = float(d ** 0.5 / dp.average_local(mean))
    else:
        scale = 1.0
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    thr_sum, thr_n = 0.0, 0
    metrics = []
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=cfg.device)
    for step in tqdm(range(1, cfg.steps + 1), desc="crosscoder", unit="step",
                     disable=None if main else True):
        xb, xf = _split(dp.local(next(store)) * scale)
        h = cc.hidden_pre(xb, xf)
        f = cc.select(torch.relu(h), batch_topk=True, dp=dp)
        rb, rf = cc.decode(f, 0), cc.decode(f, 1)
        mse = ((xb - rb) ** 2).sum(-1).mean() + ((xf - rf) ** 2).sum(-1).mean()
        dead = since_fired >= cfg.dead_feature_window
        aux = aux_loss(cc, h, (xb - rb, xf - rf), dead)
        loss = mse + aux
        if not torch.isfinite(loss):
            raise SaediffError(f"crosscoder: non-finite loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            stats = torch.stack([loss.detach(), aux.detach(), (f > 0).sum(-1).float().mean()])
            # one all-reduce: gradients and stats averaged, fire counts summed (no-op in 1 rank)
            counts, stats = dp.sync(cc, (f > 0).sum(0), stats)
        opt.step()
        with torch.no_grad():
            score = f * cc.decoder_norms().sum(0)
            kept = score[score > 0]
            low = kept.min() if kept.numel() else score.new_tensor(float("inf"))
            low = dp.min(low)  # the smallest kept score of the global batch
            if torch.isfinite(low):
                thr_sum, thr_n = thr_sum + float(low), thr_n + 1
            since_fired += 1
            since_fired[counts > 0] = 0
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics.append({"step": step, "loss": float(stats[0]), "aux_loss": float(stats[1]),
                            "l0": float(stats[2]), "dead_frac": float(dead.float().mean())})
    with torch.no_grad():
        cc.threshold.fill_(thr_sum / max(thr_n, 1))
    fold_scale(cc, scale)
    cc.cfg.metadata.update({"saediff_input_scale": scale, "saediff_steps": cfg.steps,
                            "saediff_tokens": cfg.steps * cfg.batch_size})
    cc = cc.cpu().eval()
    if main:
        cc.save(out)
        write_text(out / "metrics.jsonl", "".join(json_dumps(m) + "\n" for m in metrics))
        if eval_batches:
            write_json(out / "evals.json",
                       crosscoder_evals(cc, [b.cpu() for b in eval_batches]))
        mark_complete(out)
    return out


def train_crosscoder_run(cfg: Any, store: Any, world: Any) -> Path:
    """A crosscoder run of `train`: from `store`, a live source, or the config's caches."""
    from saediff.train.data import check_caches, open_store
    from saediff.train.ddp import DataParallel

    dp = DataParallel(world, cfg.batch_size, cfg.device)
    if store is not None:
        return train_crosscoder(cfg, store, dp=dp)
    if cfg.live:
        from saediff.models import ROLE_SPECIAL, ROLES, role_codes
        from saediff.train.data import live_eval_cache, open_live

        store, info, models = open_live(cfg, world)
        dp.rank_local = store.rank_local
        codes = role_codes(cfg.roles) if cfg.roles else \
            [v for v in ROLES.values() if v != ROLE_SPECIAL]
        n_eval = max(1, min(8, cfg.eval_rows // cfg.batch_size))
        evals = live_eval_cache(cfg, models).paired_batches(codes, cfg.batch_size, n_eval) \
            if world.is_main else []
        return train_crosscoder(cfg, store, info, evals, dp)
    info = check_caches(cfg, cfg.d_in)
    if not {"base", "finetuned"} <= set(info["sources"]):
        raise SaediffError(f"a crosscoder needs a paired cache with sources base and "
                           f"finetuned; {cfg.cache} has {info['sources']}")
    # host batches, the same global batch on every rank: `dp.local` slices this rank's share
    store = open_store(cfg, device="cpu")
    ev = open_store(cfg, split="eval", seed=cfg.seed + 1, device="cpu")
    try:
        evals = [next(ev) for _ in range(max(1, min(8, cfg.eval_rows // cfg.batch_size)))]
    finally:
        ev.close()
    try:
        return train_crosscoder(cfg, store, info, evals, dp)
    finally:
        store.close()
