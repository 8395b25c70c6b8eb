"""SAELens's `SAETrainer` with a sparse TopK step, a NaN guard and pickle-free state.

We keep SAELens's trainer for everything it owns (activation scaler, LR and coefficient
schedules, dead-latent tracking, `step()` seam) and replace only `_train_step`:
- TopK / BatchTopK SAEs use `saediff.train.sparse.SparseTopKStep` (same loss and gradients);
- every architecture raises `FloatingPointError` before the optimizer step when the loss is
  not finite, so the weights and the last checkpoint stay good;
- Adam is torch's fused CPU/GPU kernel (same update rule, ~5x faster than the for-loop one).
State goes to safetensors + JSON (SAELens's own `save_trainer_state` pickles).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.profiler import record_function

from saediff.errors import SaediffError
from saediff.io import atomic_path, safe_child, write_json
from saediff.train.metrics import step_metrics
from saediff.train.sparse import SparseTopKStep, serial_cpu, supports_fast_path

log = logging.getLogger(__name__)


class FastSAETrainer(SAETrainer):
    """A SAELens SAE's trainer for `train.loop` (the `registry.DictionaryTrainer` interface)."""

    def __init__(self, cfg: Any, sae: Any, store: Any):
        tcfg = SAETrainerConfig(
            total_training_samples=cfg.steps * cfg.batch_size,
            train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
            lr_scheduler_name=cfg.lr_scheduler, lr_warm_up_steps=cfg.lr_warm_up_steps,
            lr_decay_steps=cfg.lr_decay_steps, device=cfg.device,
            dead_feature_window=cfg.dead_feature_window,
            feature_sampling_window=2 * cfg.dead_feature_window)
        super().__init__(tcfg, sae, store)
        self.sae.to(tcfg.device)
        fused = torch.device(tcfg.device).type in ("cpu", "cuda")
        self.fast = SparseTopKStep(sae) if cfg.fast_path and supports_fast_path(sae) else None
        # the sparse step's W_enc is a view of a [d_sae, d_in] parameter: Adam updates that one
        params = self.fast.optimizer_params() if self.fast else list(sae.parameters())
        self.optimizer = torch.optim.Adam(params, lr=tcfg.lr,
                                          betas=(tcfg.adam_beta1, tcfg.adam_beta2), fused=fused)
        self.lr_scheduler = get_lr_scheduler(
            tcfg.lr_scheduler_name, lr=tcfg.lr, optimizer=self.optimizer,
            warm_up_steps=tcfg.lr_warm_up_steps, decay_steps=tcfg.lr_decay_steps,
            training_steps=tcfg.total_training_steps, lr_end=tcfg.lr_end,
            num_cycles=tcfg.n_restart_cycles)
        # set by the loop under torchrun (saediff.train.ddp.DataParallel): batches are this
        # rank's share, gradients/fire counts are all-reduced before the optimizer step
        self.ddp: Any = None

    def step(self, batch: torch.Tensor) -> Any:
        """SAETrainer.step, counting the *global* batch when this rank trains on a share."""
        batch = batch.to(self.sae.device)
        self.n_training_samples += batch.shape[0] * self._world()
        return self._train_step(sae=self.sae, sae_in=self.activation_scaler(batch))

    def _world(self) -> int:
        return self.ddp.world.world_size if self.ddp is not None else 1

    # -- one step -----------------------------------------------------------------------------
    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> dict[str, Any]:  # type: ignore
        sae.train()
        B = sae_in.shape[0]
        if self.fast is not None:
            r = self.fast(sae_in, self.dead_neurons, self.ddp)
            with serial_cpu(sae_in):       # B*k-entry bookkeeping (see train.sparse)
                fired = r["acts"].cols[r["acts"].vals > 0]
                counts = torch.bincount(fired, minlength=sae.cfg.d_sae).float()
            out = {"loss": r["loss"], "mse_loss": r["mse_loss"],
                   "aux_loss": r["auxiliary_reconstruction_loss"], "l0": fired.numel() / B,
                   "sae_out": r["sae_out"]}
        else:
            o = sae.training_forward_pass(TrainStepInput(
                sae_in=sae_in, coefficients=self.get_coefficients(),
                dead_neuron_mask=self.dead_neurons, n_training_steps=self.n_training_steps,
                is_logging_step=False))
            with torch.no_grad():
                fa = o.feature_acts.to_dense() if o.feature_acts.is_sparse else o.feature_acts
                active = fa != 0
                counts = active.sum(0).float()
            out = {"loss": o.loss, "mse_loss": o.losses.get("mse_loss", o.loss),
                   "aux_loss": sum((v.detach() for k, v in o.losses.items()
                                    if k != "mse_loss"), torch.zeros((), device=sae_in.device)),
                   "l0": active.sum().item() / B, "sae_out": o.sae_out.detach()}
        if self.fast is None:
            out["loss"].backward()   # before the check: a NaN step discards its grads anyway
        if self.ddp is not None:
            # every rank must see the same loss (so all raise together), counts and grads
            with torch.no_grad():
                st = torch.stack([out["loss"].detach(), out["mse_loss"].detach(),
                                  torch.as_tensor(out["aux_loss"], device=sae_in.device).detach(),
                                  torch.as_tensor(float(out["l0"]) * B, device=sae_in.device)])
                counts, st = self.ddp.sync(sae, counts, st)
            out.update(loss=st[0], mse_loss=st[1], aux_loss=st[2], l0=float(st[3]) / B)
            B = B * self._world()
        if not math.isfinite(float(out["loss"].detach())):
            sae.zero_grad(set_to_none=True)
            self.optimizer.zero_grad()  # the sparse step's [d_sae, d_in] W_enc too
            raise FloatingPointError(f"loss = {float(out['loss'].detach())}")
        with torch.no_grad(), record_function("saediff.stats"), serial_cpu(sae_in):
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[counts > 0] = 0
            self.act_freq_scores += counts
            self.n_frac_active_samples += B
        with record_function("saediff.clip"):
            self._clip_grads(sae)
        with record_function("saediff.optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad()
            sae.zero_grad()            # the sparse step's W_enc.grad view
        if self.ddp is not None:
            self.ddp.sync_buffers(sae)
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        out["sae_in"] = sae_in
        return out

    def _clip_grads(self, sae: Any, max_norm: float = 1.0) -> None:
        """`clip_grad_norm_(max_norm)`; with fused Adam the clip factor c = max_norm / (norm +
        1e-6) (at most 1) becomes Adam's `grad_scale` (the kernel divides by 1/c as it reads
        each gradient), instead of one more read-and-write pass over both [d_in, d_sae]
        gradients. Same update up to the last bit of g*c vs g/(1/c); exact when no clip."""
        if not self.optimizer.defaults.get("fused"):
            torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
            return
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        self.optimizer.grad_scale = ((total + 1e-6) / max_norm).clamp(min=1.0)

    def maybe_reset_sparsity(self) -> dict[str, Any]:
        if self.n_training_steps > 0 and \
                self.n_training_steps % self.cfg.feature_sampling_window == 0:
            self._reset_running_sparsity_stats()
        return {}

    def metrics(self, out: dict[str, Any], step: int) -> dict[str, Any]:
        return step_metrics(self, out, step)

    # -- the run directory ----------------------------------------------------------------------
    def save_final(self, run_dir: Path) -> None:
        """The SAE in SAELens's format, input scale folded in (`train.final.save_final`)."""
        from saediff.train.final import save_final

        save_final(self, run_dir)

    def write_evals(self, run_dir: Path, cfg: Any, models: dict[str, Any] | None = None,
                    caches: list[Any] | None = None) -> Path:
        """evals.json per source (`train.evals.write_evals`)."""
        from saediff.train.evals import write_evals

        return write_evals(run_dir, cfg, models=models, caches=caches)

    # -- state (safetensors + JSON, no pickle) --------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t: dict[str, torch.Tensor] = {f"sae.{k}": v.detach().cpu().contiguous()
                                      for k, v in self.sae.state_dict().items()}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        if self.fast is not None:
            names[id(self.fast.w_enc_t)] = "W_enc"
        opt_meta = {}
        for p, st in self.optimizer.state.items():
            n = names[id(p)]
            for key, val in st.items():
                if torch.is_tensor(val):
                    # W_enc's moments in W_enc's [d_in, d_sae] shape, whatever the layout
                    flip = self.fast is not None and p is self.fast.w_enc_t and val.dim() == 2
                    val = val.T if flip else val
                    t[f"opt.{n}.{key}"] = val.detach().cpu().contiguous()
                else:
                    opt_meta[f"{n}.{key}"] = val
        t["act_freq_scores"] = self.act_freq_scores.cpu().contiguous()
        t["n_forward_passes_since_fired"] = self.n_forward_passes_since_fired.cpu().contiguous()
        meta = {"n_training_samples": self.n_training_samples,
                "n_training_steps": self.n_training_steps,
                "n_frac_active_samples": self.n_frac_active_samples,
                "lr_scheduler": json.loads(json.dumps(self.lr_scheduler.state_dict(),
                                                      default=lambda o: None)),
                "coefficient_schedulers": {k: s.state_dict()
                                           for k, s in self.coefficient_schedulers.items()},
                "optimizer_scalars": opt_meta}
        return t, meta

    def load_state_tensors(self, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        dev = self.cfg.device
        self.sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
        for p_name, p in self.sae.named_parameters():
            st = {key[len(f"opt.{p_name}."):]: v.to(dev) for key, v in t.items()
                  if key.startswith(f"opt.{p_name}.")}
            if self.fast is not None and p is self.sae.W_enc:   # Adam's W_enc: [d_sae, d_in]
                p = self.fast.w_enc_t
                st = {k: v.T.contiguous() if v.dim() == 2 else v for k, v in st.items()}
            st.update({key[len(p_name) + 1:]: v for key, v in meta["optimizer_scalars"].items()
                       if key.startswith(p_name + ".")})
            if st:
                self.optimizer.state[p] = st
        self.act_freq_scores = t["act_freq_scores"].to(dev)
        self.n_forward_passes_since_fired = t["n_forward_passes_since_fired"].to(dev)
        self.n_training_samples = meta["n_training_samples"]
        self.n_training_steps = meta["n_training_steps"]
        self.n_frac_active_samples = meta["n_frac_active_samples"]
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for k, s in meta["coefficient_schedulers"].items():
            self.coefficient_schedulers[k].load_state_dict(s)


class TensorStore:
    """In-RAM stand-in for `ActivationStore`: shuffled batches of a [N, d] tensor (a
    crosscoder's: [N, 2, d] pairs), resumable."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.d_model = data.shape[-1]
        self.epoch = self.pos = 0
        self._perm = self._make_perm()

    def _make_perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data), generator=g)

    def __iter__(self) -> TensorStore:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.data):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        idx = self._perm[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data[idx]

    def peek_batches(self, n: int) -> list[torch.Tensor]:
        return [self.data[i * self.batch_size: (i + 1) * self.batch_size]
                for i in range(min(n, len(self.data) // self.batch_size))]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.epoch, self.pos = st["epoch"], st["pos"]
        self._perm = self._make_perm()


# --- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(root: Path, step: int, trainers: list[Any], store: Any,
                    extra: dict[str, Any]) -> Path:
    """Write checkpoints/step_N atomically, then point `latest` at it, then prune."""
    ck = root / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step_{step:08d}"
    with atomic_path(final) as tmp:  # a unique temp dir, renamed over `final` when complete
        tmp.mkdir()
        for i, tr in enumerate(trainers):
            tensors, meta = tr.state_tensors()
            save_file(tensors, tmp / f"sae{i}.safetensors")
            write_json(tmp / f"sae{i}.json", meta)
        save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        write_json(tmp / "state.json", {"step": step, "store": store.state_dict(), **extra})
    write_json(ck / "latest.json", {"step": step, "dir": final.name})
    for old in ck.iterdir():
        if old.is_dir() and old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, trainers: list[Any], store: Any) -> dict[str, Any] | None:
    latest = root / "checkpoints" / "latest.json"
    if not latest.is_file():
        return None
    try:
        ref = json.loads(latest.read_text())["dir"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise SaediffError(f"{latest} is not a saediff checkpoint pointer ({exc!r}); remove "
                           "it to start afresh or use another --out") from exc
    # latest.json names a directory inside checkpoints/; a resume must never follow it out
    d = safe_child(root / "checkpoints", str(ref), f"checkpoint dir in {latest}")
    try:
        return _load_checkpoint_dir(d, trainers, store)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
        raise SaediffError(f"checkpoint {d} is unreadable ({exc!r}); remove {root / 'checkpoints'}"
                           " to start afresh or use another --out") from exc


def _load_checkpoint_dir(d: Path, trainers: list[Any], store: Any) -> dict[str, Any]:
    state = json.loads((d / "state.json").read_text())
    if state.get("n_saes") != len(trainers):
        raise SaediffError(f"checkpoint {d} holds {state.get('n_saes')} SAEs, this config "
                           f"trains {len(trainers)}; use another --out")
    for i, tr in enumerate(trainers):
        t = load_file(d / f"sae{i}.safetensors")
        have, want = tuple(t["sae.W_enc"].shape), tuple(tr.sae.W_enc.shape)
        if have != want:
            raise SaediffError(f"d_in mismatch: checkpoint {d} has W_enc {have} (d_in, d_sae), "
                               f"this config/cache needs {want}; use another --out")
        tr.load_state_tensors(t,
                              json.loads((d / f"sae{i}.json").read_text()))
    store.load_state_dict(state["store"])
    torch.set_rng_state(load_file(d / "rng.safetensors")["torch_rng"])
    state["dir"] = str(d)
    return state


def check_resume_config(fields: dict[str, Any], state: dict[str, Any] | None, root: Path) -> None:
    """Refuse to resume a checkpoint written under a different training config."""
    if not state or "config" not in state:
        return
    now = json.loads(json.dumps(fields))  # the JSON types of the stored copy
    old = state["config"]
    diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {old.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise SaediffError(f"{root} holds a checkpoint of a different training config ({detail}); "
                           f"resume with the same config, or use another --out")
