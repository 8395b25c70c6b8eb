"""Known answer for `run_diff`: the full outputs of two tiny diffs, pinned to numbers computed
before `run_diff` was split into named steps (issue 21). A refactor that changes any ranking,
CI, direction, evidence row, AUROC or trajectory value fails here.

Regenerate (only for an intended change of results, and say so in the commit):
    PYTHONPATH=. python tests/diff/test_diff_golden.py --write
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from test_diff import LAYER, make_sae, write_prompts  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "diff_golden.json"


def _strict(text: str) -> object:
    def refuse(c: str) -> None:
        raise ValueError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=refuse)


def golden_outputs(d: Path) -> dict:
    """Two diffs of a tiny model: (a) two checkpoints (trajectory) with labelled answers
    (diff-in-means of labels, answer AUROC); (b) a memory bound so small that the per-prompt
    table does not fit (second-pass CIs for the top latents only, NaN -> null for the rest)."""
    from saediff.diff.data import DiffConfig
    from saediff.diff.differ import run_diff

    base = tiny.build_model(d / "base", "qwen2", seed=0)
    ft1 = tiny.perturb(base, d / "ft1", scale=0.03, seed=1)
    ft2 = tiny.perturb(base, d / "ft2", scale=0.08, seed=1)
    sae = make_sae(d / "sae", seed=5)
    prompts = write_prompts(d / "prompts.jsonl", n=12, seed=3)
    out = {}
    for name, kw in (("trajectory", {"finetuned": [str(ft1), str(ft2)]}),
                     ("small_memory", {"finetuned": [str(ft2)], "max_memory_gb": 1e-6,
                                       "direction": "up"})):
        cfg = DiffConfig(base=str(base), sae=str(sae), layer=LAYER, prompts=str(prompts),
                         n_boot=100, top_k=5, batch_size=5, **kw)
        res = run_diff(cfg)
        res.to_dir(d / name, html=False)
        files = {f: _strict((d / name / f).read_text())
                 for f in ("ranking.json", "evidence.json", "directions.json", "trajectory.json")
                 if (d / name / f).exists()}
        meta = _strict((d / name / "meta.json").read_text())
        files["meta"] = {k: meta[k] for k in ("n_prompts", "n_examples", "n_tokens", "d_sae",
                                               "roles", "prompt_induced")}
        out[name] = files
    return out


def _close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_run_diff_known_answer(tmp_path):
    got = golden_outputs(tmp_path)
    want = json.loads(GOLDEN.read_text())
    # the small-memory diff has latents without a CI: they are null in strict JSON
    assert any(r["ci_low"] is None for r in got["small_memory"]["ranking.json"])
    assert all(r["ci_low"] is not None for r in got["small_memory"]["ranking.json"][:5])
    assert len(got["trajectory"]["trajectory.json"]["checkpoints"]) == 2
    _close(want, got)


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden_outputs(Path(t))) + "\n")
    print("wrote", GOLDEN)
