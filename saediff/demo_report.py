"""What `saediff demo` says: the one-sentence finding, the summary table (every rate with its
95% interval) and report.html (the diff report with that table on top)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from saediff.io import write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return "n/a" if v is None else str(v)


def _rate(summary: dict[str, Any], key: str) -> str:
    """`0.458 [0.421, 0.495]`: a rate with its 95% interval (the `KEY_ci` entry)."""
    v, ci = summary.get(key), summary.get(f"{key}_ci")
    if ci is None or v is None:
        return _fmt(v)
    return f"{_fmt(v)} [{ci[0]:.3f}, {ci[1]:.3f}]"


# (summary key, label); labels name each number's data, `{...}` fills in from the summary
SUMMARY_KEYS = [
    ("misaligned_rate_base", "misaligned share of all answers (organism judge), untrained "
                             "topics, n={n_eval} — base"),
    ("misaligned_rate_finetuned", "misaligned share of all answers (organism judge), untrained "
                                  "topics, n={n_eval} — fine-tuned"),
    ("coherent_rate_finetuned", "coherent share, same answers — fine-tuned"),
    ("sae_fvu", "SAE fraction of variance unexplained (per source)"),
    ("sae_l0", "SAE mean L0 (per source)"),
    ("top_latent", "top-ranked latent (largest mean activation shift base → fine-tuned)"),
    ("top_latent_direction", "its shift direction"),
    ("top_latent_auroc", "its persona AUROC (held-out labelled chats, n={top_latent_auroc_n}, "
                         "read in the base; toxic = positive)"),
    ("top_latent_separation", "persona separation either way, max(AUROC, 1 - AUROC)"),
    ("top_latent_answer_auroc", "its answer AUROC (this diff's sampled answers, judge labels, "
                                "n={top_latent_answer_auroc_n}; misaligned = positive)"),
    ("misaligned_given_coherent_unsteered", "misaligned | coherent (EM rate), fine-tuned, "
     "unsteered, {n_coherent_unsteered} coherent of n={n_unsteered}"),
    ("misaligned_given_coherent_steered", "misaligned | coherent (EM rate), fine-tuned, top latent "
     "clamped to 0, {n_coherent_steered} coherent of n={n_steered}"),
    ("coherent_rate_unsteered", "coherent share, fine-tuned, unsteered"),
    ("coherent_rate_steered", "coherent share, fine-tuned, top latent clamped to 0"),
    ("em_reduction", "relative cut in the EM rate by the clamp"),
    ("misaligned_given_coherent_base_clamped_up", "misaligned | coherent (EM rate), base, top "
     "latent clamped up, {n_coherent_base_clamped_up} coherent of n={n_base_clamped_up}"),
    ("coherent_rate_base_clamped_up", "coherent share, base, top latent clamped up"),
]


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) per summary entry; every rate carries its 95% interval."""
    fill = _Blank({k: _fmt(v) for k, v in summary.items()})
    return [(label.format_map(fill), _rate(summary, key)) for key, label in SUMMARY_KEYS]


def finding(summary: dict[str, Any]) -> str:
    """What the demo found, in one plain sentence (rates with 95% intervals)."""
    auc = summary.get("top_latent_auroc")
    return (f"Fine-tuning on one topic raised the misaligned share on the other topics from "
            f"{_rate(summary, 'misaligned_rate_base')} to "
            f"{_rate(summary, 'misaligned_rate_finetuned')}; latent {summary.get('top_latent')}, "
            f"ranked first by activation shift, tells toxic from aligned held-out chats with "
            f"persona AUROC {_fmt(auc)} (n={summary.get('top_latent_auroc_n')}); clamping it to 0 "
            f"cut misaligned | coherent from {_rate(summary, 'misaligned_given_coherent_unsteered')}"
            f" to {_rate(summary, 'misaligned_given_coherent_steered')} (coherent "
            f"{_rate(summary, 'coherent_rate_unsteered')} → "
            f"{_rate(summary, 'coherent_rate_steered')}), and clamping it up in the base gave "
            f"{_rate(summary, 'misaligned_given_coherent_base_clamped_up')}.")


def format_summary(summary: dict[str, Any]) -> str:
    rows = summary_rows(summary)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join([summary.get("finding") or finding(summary), "", *lines])


def write_report(out: Path, diff_dir: Path, summary: dict[str, Any]) -> None:
    """report.html = the diff report with the demo's summary table on top."""
    import html

    rows = "".join(f"<tr><td>{html.escape(label)}</td><td><b>{html.escape(value)}</b></td></tr>"
                   for label, value in summary_rows(summary))
    block = (f"<section id='demo-summary'><h1>saediff demo — toy organism of emergent misalignment"
             f"</h1><p>{html.escape(summary.get('finding') or finding(summary))}</p>"
             f"<table>{rows}</table></section>")
    src = diff_dir / "report.html"
    target = out / "report.html"
    if src.exists():
        text = src.read_text()
        i = text.find("<body")
        j = text.find(">", i) + 1 if i >= 0 else 0
        write_text(target, text[:j] + block + text[j:])
    else:
        write_text(target, f"<!doctype html><html><body>{block}</body></html>")
