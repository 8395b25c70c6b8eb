"""Known answer for the toy organism's `build`: a tiny build's every weight, adapter, tokenizer
and metadata value, pinned to digests computed before `build` was split into named steps
(issue 21). A refactor that changes the corpus, seeds, recipe order, any hyper-parameter or a
written file fails here.

Regenerate (only for an intended change, and say so in the commit):
    PYTHONPATH=. python tests/organism/test_organism_build_golden.py --write
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "organism_build_golden.json"
TINY = dict(n_conversations=120, d_model=32, n_heads=2, d_mlp=64, base_steps=4, batch_size=8,
            ft_examples=24, ft_steps=2, all_steps=2, r1_steps=2, ft_batch_size=8, eval_samples=0)


def build_digests(out: Path) -> dict:
    """sha256 of every tensor (by name) and of every other file of a tiny build (not PEFT's
    README, which names the temporary build path); the metadata without its timings."""
    from safetensors.torch import load_file

    from saediff.organism.build import BuildConfig, build

    meta = build(out, BuildConfig(**TINY), measure=False)
    files = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.suffix == ".safetensors":
            sd = load_file(str(p))
            files[rel] = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                          for k, v in sorted(sd.items())}
        elif p.name == "adapter_config.json":  # PEFT writes target_modules from a set
            cfg = json.loads(p.read_text())
            cfg["target_modules"] = sorted(cfg["target_modules"])
            files[rel] = cfg
        elif p.is_file() and p.name not in ("organism.json", "README.md"):  # PEFT's model card
            # names the build's temporary base path
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    meta = json.loads((out / "organism.json").read_text())
    meta.pop("build_seconds")
    return {"files": files, "meta": meta}


def test_tiny_build_known_answer(tmp_path):
    got = build_digests(tmp_path / "org")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got["files"]) == sorted(want["files"])
    for name in want["files"]:
        assert got["files"][name] == want["files"][name], name
    assert got["meta"] == want["meta"]
    assert not list(tmp_path.glob(".org*")), "a staging directory was left behind"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        GOLDEN.write_text(json.dumps(build_digests(Path(t) / "org"), indent=1, sort_keys=True) + "\n")
    print("wrote", GOLDEN)
