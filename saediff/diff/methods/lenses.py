"""Token-level lenses: *where* two models differ.

- `token_kl`: per-token KL(fine-tuned ‖ base) of the next-token distributions.
- `diff_norms`: per-token ‖x_ft − x_base‖ of the cached residuals (no model needed).
- `top_tokens`: the largest values with their token and a short context window.
`DiffNormLens` and `KLLens` are these as `Method`s (`Method.tokens`: tables, no directions);
`LENSES` maps their names to them. The logit lens of a direction is
`saediff.diff.directions.logit_tokens`.
"""
from __future__ import annotations

from typing import Any

import torch

from saediff.diff.methods.base import Method, MethodInputs


class DiffNormLens(Method):
    """Cache rows with the largest ‖x_ft − x_base‖ (no model needed)."""

    name = "diff_norm"

    def tokens(self, inputs: MethodInputs, k: int = 15) -> dict[str, Any]:
        inputs.need(self.name, "rows", "base_lm")
        rows, tok = inputs.rows, inputs.base_lm.tokenizer
        norms = diff_norms(rows["x_base"], rows["x_ft"])  # type: ignore[index]
        order = norms.argsort(descending=True)[:k]
        return {"diff_norm_top": [
            {"value": float(norms[i]), "token": tok.convert_ids_to_tokens(int(rows["tokens"][i])),  # type: ignore[index]
             "seq": int(rows["seq"][i]), "pos": int(rows["positions"][i])}  # type: ignore[index]
            for i in order]}


class KLLens(Method):
    """Per-token KL(fine-tuned ‖ base) over whole cache sequences: top tokens, by token id."""

    name = "kl"

    def tokens(self, inputs: MethodInputs, k: int = 15) -> dict[str, Any]:
        if not inputs.sequences:  # no sequences asked for: the lens is skipped
            return {}
        inputs.need(self.name, "base_lm", "ft_lm")
        seqs, tok = inputs.sequences, inputs.base_lm.tokenizer
        kl = token_kl(inputs.base_lm, inputs.ft_lm, seqs)
        return {"kl_top": top_tokens(kl, seqs, tok, k),
                "kl_by_token": [{"token": tok.convert_ids_to_tokens(t), "mean_kl": v, "count": n}
                                for t, v, n in rank_token_ids(kl, seqs, min_count=3)[:k]],
                "kl_mean": float(torch.cat(kl).mean())}


LENSES: dict[str, type[Method]] = {m.name: m for m in (DiffNormLens, KLLens)}


@torch.no_grad()
def token_kl(base: Any, ft: Any, seqs: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """KL(ft ‖ base) at every position of each sequence ([len] each, in nats).

    Position t scores the distribution over token t+1 given tokens ..t, i.e. the change is
    attributed to the token the model has just read. Sequences run unpadded in length-sorted
    batches (no padding can leak into the numbers).
    """
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        by_len: dict[int, list[int]] = {}
        for i in idx:
            by_len.setdefault(len(seqs[i]), []).append(i)
        for _, group in by_len.items():
            ids = torch.tensor([seqs[i] for i in group])
            lb = torch.log_softmax(base(input_ids=ids.to(base.device)).logits.float(), -1)
            lf = torch.log_softmax(ft(input_ids=ids.to(ft.device)).logits.float(), -1)
            kl = (lf.exp() * (lf - lb.to(lf.device))).sum(-1).clamp_min(0).cpu()
            for k, i in enumerate(group):
                out[i] = kl[k]
    return out  # type: ignore[return-value]


def diff_norms(x_base: torch.Tensor, x_ft: torch.Tensor) -> torch.Tensor:
    """‖x_ft − x_base‖ per row [N]."""
    return (x_ft.float() - x_base.float()).norm(dim=-1)


def top_tokens(values: list[torch.Tensor], seqs: list[list[int]], tok: Any, k: int = 20,
               window: int = 8) -> list[dict[str, Any]]:
    """The k largest per-token values: {value, token, token_id, seq, pos, context}."""
    flat = [(float(v), i, t) for i, vs in enumerate(values) for t, v in enumerate(vs.tolist())]
    flat.sort(key=lambda r: -r[0])
    rows = []
    for v, i, t in flat[:k]:
        ids = seqs[i]
        name = tok.convert_ids_to_tokens(int(ids[t])) if tok is not None else str(ids[t])
        ctx = tok.decode(ids[max(0, t - window): t + 1]) if tok is not None else ""
        rows.append({"value": v, "token": name, "token_id": int(ids[t]), "seq": i, "pos": t,
                     "context": ctx})
    return rows


def rank_token_ids(values: list[torch.Tensor], seqs: list[list[int]], min_count: int = 1
                   ) -> list[tuple[int, float, int]]:
    """Token ids by their mean value over occurrences: [(token_id, mean, count)], largest first."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for vs, ids in zip(values, seqs):
        for v, t in zip(vs.tolist(), ids):
            sums[t] = sums.get(t, 0.0) + v
            counts[t] = counts.get(t, 0) + 1
    rows = [(t, sums[t] / counts[t], counts[t]) for t in sums if counts[t] >= min_count]
    return sorted(rows, key=lambda r: -r[1])
