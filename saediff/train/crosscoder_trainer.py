"""The crosscoder's trainer (`saediff.sae.crosscoder.Crosscoder`), for `train.loop`'s one loop.

It implements the loop's trainer interface (`train.trainer.DictionaryTrainer`), so a crosscoder
gets what every SAE gets: checkpoints with bit-exact resume, `estimate_scale`, the NaN guard,
metrics.jsonl, evals and torchrun. One step reads a [B, 2, d] batch of (base, fine-tuned)
activations of the same tokens (`PairedStore` / a live pair store), both scaled by the one
factor of `train.data.estimate_scale` (one factor, so relative decoder norms are unchanged when
it is folded back), and minimises the summed squared error of both reconstructions with
BatchTopK sparsity, plus the TopK auxiliary loss on dead latents (as the SAE trainer's sparse
step). The inference threshold is the running mean of the smallest kept norm-weighted
activation per batch.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.optim import get_lr_scheduler

from saediff.dist import Dist
from saediff.errors import SaediffError
from saediff.io import staged_outputs, write_json
from saediff.sae.crosscoder import Crosscoder, CrosscoderCfg
from saediff.train.metrics import step_metrics

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
    xs: list[list[torch.Tensor]] = [[], []]
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


def eval_batches(cfg: Any, caches: list[Any] | None) -> list[torch.Tensor]:
    """Held-out [B, 2, d] batches: from a live run's in-RAM eval cache, or the cache files."""
    from saediff.models import ROLE_SPECIAL, ROLES, role_codes
    from saediff.train.data import open_store

    n = max(1, min(8, cfg.eval_rows // cfg.batch_size))
    if caches:
        codes = role_codes(cfg.roles) if cfg.roles else \
            [v for v in ROLES.values() if v != ROLE_SPECIAL]
        return caches[0].paired_batches(codes, cfg.batch_size, n)
    ev = open_store(cfg, split="eval", seed=cfg.seed + 1, device="cpu")
    try:
        return [next(ev) for _ in range(n)]
    finally:
        ev.close()


class CrosscoderTrainer:
    """Trains one `Crosscoder` (the `DictionaryTrainer` interface of `train.loop`)."""

    def __init__(self, cfg: Any, d_in: int, metadata: dict[str, Any], store: Any = None):
        self.cfg = cfg
        self.sae = Crosscoder(CrosscoderCfg(d_in=d_in, d_sae=cfg.d_sae, k=float(cfg.k),
                                            metadata=dict(metadata)),
                              seed=cfg.seed).to(cfg.device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.lr_scheduler = get_lr_scheduler(
            cfg.lr_scheduler, lr=cfg.lr, optimizer=self.optimizer,
            warm_up_steps=cfg.lr_warm_up_steps, decay_steps=cfg.lr_decay_steps,
            training_steps=cfg.steps, lr_end=cfg.lr / 10, num_cycles=1)
        self.activation_scaler = ActivationScaler()  # the loop sets scaling_factor
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=cfg.device)
        self.thr_sum, self.thr_n = 0.0, 0
        self.n_training_steps = self.n_training_samples = 0
        self.ddp: Any = None  # the loop's `DataParallel` under torchrun
        self._solo = None

    @property
    def dead_neurons(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_feature_window

    def _dp(self) -> Any:
        """The torchrun all-reduces, or their single-process no-ops."""
        if self.ddp is not None:
            return self.ddp
        if self._solo is None:
            from saediff.train.ddp import DataParallel

            self._solo = DataParallel(Dist(), self.cfg.batch_size, self.cfg.device)
        return self._solo

    # -- one step -----------------------------------------------------------------------------
    def step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on this rank's share of a [B, 2, d] batch; raises
        `FloatingPointError` (weights untouched) when the global loss is not finite."""
        cc, dp = self.sae, self._dp()
        x = self.activation_scaler(batch.to(self.cfg.device))
        xb, xf = _split(x)
        self.n_training_samples += x.shape[0] * dp.world.world_size
        h = cc.hidden_pre(xb, xf)
        f = cc.select(torch.relu(h), batch_topk=True, dp=dp)
        rb, rf = cc.decode(f, 0), cc.decode(f, 1)
        mse = ((xb - rb) ** 2).sum(-1).mean() + ((xf - rf) ** 2).sum(-1).mean()
        aux = aux_loss(cc, h, (xb - rb, xf - rf), self.dead_neurons)
        loss = mse + aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            stats = torch.stack([loss.detach(), mse.detach(), aux.detach(),
                                 (f > 0).sum(-1).float().mean()])
            # one all-reduce: gradients and stats averaged, fire counts summed (no-op in 1 rank)
            counts, stats = dp.sync(cc, (f > 0).sum(0), stats)
        if not math.isfinite(float(stats[0])):  # every rank sees the same averaged loss
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"loss = {float(stats[0])}")
        self.optimizer.step()
        self.lr_scheduler.step()
        self._track(f, counts, dp)
        return {"loss": stats[0], "mse_loss": stats[1], "aux_loss": stats[2],
                "l0": float(stats[3]), "sae_in": x, "sae_out": torch.stack([rb, rf], 1).detach()}

    @torch.no_grad()
    def _track(self, f: torch.Tensor, counts: torch.Tensor, dp: Any) -> None:
        """Dead-latent counters and the running inference threshold (global batch)."""
        score = f * self.sae.decoder_norms().sum(0)
        kept = score[score > 0]
        low = kept.min() if kept.numel() else score.new_tensor(float("inf"))
        low = dp.min(low)  # the smallest kept score of the global batch
        if torch.isfinite(low):
            self.thr_sum, self.thr_n = self.thr_sum + float(low), self.thr_n + 1
        self.since_fired += 1
        self.since_fired[counts > 0] = 0

    def maybe_reset_sparsity(self) -> dict[str, Any]:
        return {}  # no running sparsity statistics to reset

    def metrics(self, out: dict[str, Any], step: int) -> dict[str, Any]:
        return step_metrics(self, out, step)

    # -- state (safetensors + JSON) -------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in self.sae.state_dict().items()}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key, val in st.items():  # torch's Adam keeps step, exp_avg, exp_avg_sq tensors
                t[f"opt.{names[id(p)]}.{key}"] = val.detach().cpu().contiguous()
        t["since_fired"] = self.since_fired.cpu().contiguous()
        meta = {"n_training_samples": self.n_training_samples,
                "n_training_steps": self.n_training_steps,
                "thr_sum": self.thr_sum, "thr_n": self.thr_n,
                "lr_scheduler": _json_state(self.lr_scheduler.state_dict())}
        return t, meta

    def load_state_tensors(self, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        dev = self.cfg.device
        self.sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
        for name, p in self.sae.named_parameters():
            st = {k[len(f"opt.{name}."):]: v for k, v in t.items()
                  if k.startswith(f"opt.{name}.")}
            if st:  # Adam's `step` stays on the CPU, as torch keeps it
                self.optimizer.state[p] = {k: v if k == "step" else v.to(dev)
                                           for k, v in st.items()}
        self.since_fired = t["since_fired"].to(dev)
        self.n_training_samples = meta["n_training_samples"]
        self.n_training_steps = meta["n_training_steps"]
        self.thr_sum, self.thr_n = meta["thr_sum"], meta["thr_n"]
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])

    # -- the run directory ----------------------------------------------------------------------
    def save_final(self, run_dir: Path) -> None:
        """Learned threshold and input scale folded into a copy, saved (raw-activation scale)."""
        import copy

        cc = copy.deepcopy(self.sae).cpu().eval()
        scale = self.activation_scaler.scaling_factor
        with torch.no_grad():
            cc.threshold.fill_(self.thr_sum / max(self.thr_n, 1))
        if scale is not None:
            fold_scale(cc, scale)
        cc.cfg.metadata.update({"saediff_input_scale": scale,
                                "saediff_steps": self.n_training_steps,
                                "saediff_tokens": self.n_training_samples})
        # staged: cfg.json and the weights land together (never one from an older run)
        with staged_outputs(run_dir, (), "saediff train") as stage:
            cc.save(stage)

    def write_evals(self, run_dir: Path, cfg: Any, models: dict[str, Any] | None = None,
                    caches: list[Any] | None = None) -> Path:
        """evals.json of the saved crosscoder on held-out paired batches."""
        from saediff.sae import load_sae

        cc = load_sae(run_dir)
        path = Path(run_dir) / "evals.json"
        res = crosscoder_evals(cc, [b.float().cpu() for b in eval_batches(cfg, caches)])
        write_json(path, res)
        log.info("crosscoder FVU base %.4f  fine-tuned %.4f  L0 %.1f", res["base"]["fvu"],
                 res["finetuned"]["fvu"], res["base"]["l0"])
        return path


def _json_state(st: dict[str, Any]) -> dict[str, Any]:
    """An LR scheduler's state as JSON (its lambdas are rebuilt by the constructor)."""
    import json

    return json.loads(json.dumps(st, default=lambda o: None))
