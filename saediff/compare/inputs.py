"""What `saediff compare`'s methods read: dictionaries (trained on the cache when not given),
and labelled residuals of held-out answers inside the fine-tuned model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.stats import persona_label

log = logging.getLogger(__name__)


def train_missing(cfg: Any, out: Path) -> dict[str, str | None]:
    """Run dirs of the dictionaries the methods need, training the missing ones."""
    from saediff.train import TrainConfig, train

    need = {"sae": ("sae", {}), "crosscoder": ("crosscoder", {"architecture": "crosscoder"}),
            "diff_sae": ("diff_sae", {"input": "difference"})}
    runs: dict[str, str | None] = {}
    for method, (attr, over) in need.items():
        given = getattr(cfg, attr)
        if method not in cfg.methods or given:
            runs[attr] = given
            continue
        rdir = out / "runs" / attr
        if (rdir / "cfg.json").is_file():
            import json

            old = json.loads((rdir / "train_config.json").read_text()).get("cache")
            if old != [cfg.cache]:
                raise SaediffError(f"{rdir} was trained on {old}, not {cfg.cache}; pass a "
                                   f"fresh --out or delete {rdir}")
            log.info("reusing %s (trained on the same cache)", rdir)
        else:
            kw: dict[str, Any] = dict(cache=[cfg.cache], out=str(rdir), d_sae=cfg.d_sae, k=cfg.k,
                                      total_tokens=cfg.train_tokens, batch_size=1024, lr=2e-3,
                                      eval_sequences=0, checkpoint_every=0, seed=cfg.seed,
                                      device=cfg.device, buffer_rows=1 << 16,
                                      dead_feature_window=100)
            kw.update(over)
            if over.get("architecture") != "crosscoder":
                kw["architecture"] = "topk"
            log.info("training %s into %s", attr, rdir)
            train(TrainConfig(**kw), evals=False)
        runs[attr] = str(rdir)
    return runs


@torch.no_grad()
def labelled_residuals(lm: Any, rows: list[dict[str, Any]], layer: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean residual over the response tokens [n, d] and labels [n] (1 = toxic)."""
    from saediff.models import ROLE_RESPONSE, encode_chat, run_to_layer

    feats, labels = [], []
    for i, r in enumerate(rows):
        lab = persona_label(r)
        if lab is None or not r.get("response"):
            raise SaediffError(f"held-out row {i}: needs prompt, response and persona or label")
        ids, roles = encode_chat(lm.tokenizer, r["prompt"], r["response"])
        x = torch.tensor([ids])
        h = run_to_layer(lm, x, torch.ones_like(x), layer)[0].float().cpu()
        mask = torch.tensor(roles) == ROLE_RESPONSE
        if not mask.any():
            continue
        feats.append(h[mask].mean(0))
        labels.append(int(lab))
    if len(set(labels)) < 2:
        raise SaediffError("held-out data needs both aligned and misaligned examples")
    return torch.stack(feats), torch.tensor(labels)


def heldout_rows(cfg: Any) -> list[dict[str, Any]]:
    if cfg.heldout is None:
        from saediff.organism import load_heldout_labelled

        return load_heldout_labelled()
    from saediff.prompts import load_prompt_items

    return load_prompt_items(cfg.heldout)
