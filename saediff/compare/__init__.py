"""Stage 5 — compare: every diffing method's top direction on one board, scored against
ground truth and causally (`run_compare`), with LoRA amplification and the token lenses.

`run` holds `CompareConfig` and `run_compare` (writes OUT/compare.json, OUT/summary.json,
OUT/report.html), `inputs` what the methods read (dictionaries trained on demand, labelled
residuals), `report` the HTML, `amplify` the LoRA scaling context.
"""
from saediff.compare.run import COMPARE_OUTPUTS, CompareConfig, run_compare

__all__ = ["COMPARE_OUTPUTS", "CompareConfig", "run_compare"]
