"""The differ (issue 5): planted latents come out first, CIs, directions, errors, report."""
from __future__ import annotations

import contextlib
import csv
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from saediff.diff.data import DiffConfig, build_examples, encode_sides, load_prompts, selected_roles
from saediff.diff.differ import latent_activations, rank_latents, run_diff
from saediff.diff.directions import diff_in_means, lora_b_vectors, span_explained
from saediff.errors import SaediffError
from saediff.stats import auroc, bootstrap_mean_ci, group_sums

import tiny

LAYER = 1


def make_sae(path: Path, d_in: int = 32, d_sae: int = 64, seed: int = 0,
             hook: str | None = f"blocks.{LAYER}.hook_resid_post") -> Path:
    """A tied, unit-norm StandardSAE (encoder row j == decoder row j), saved SAELens-style."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    if hook:
        cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.data = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.data = sae.W_dec.T.clone().contiguous()
        sae.b_enc.zero_()
    sae.save_model(path)
    return path


def sae_dec(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "sae_weights.safetensors"))["W_dec"]


def write_prompts(path: Path, n: int = 16, seed: int = 0, labels: bool = True) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": " ".join(rng.choices(tiny.WORDS, k=6)),
                   "response": " ".join(rng.choices(tiny.WORDS, k=8))}
            if labels:
                row["persona"] = "toxic" if i % 2 else "aligned"
            f.write(json.dumps(row) + "\n")
    return path


def mean_mlp_hidden(model, prompts: list[str], tok) -> tuple[torch.Tensor, float]:
    """Mean input of block LAYER's down_proj, and the mean residual norm after block LAYER."""
    box: list[torch.Tensor] = []
    h = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(
        lambda _m, inp: box.append(inp[0].reshape(-1, inp[0].shape[-1])))
    norms = []
    try:
        with torch.no_grad():
            for p in prompts:
                out = model(**tok(p, return_tensors="pt"), output_hidden_states=True)
                norms.append(out.hidden_states[LAYER + 1].norm(dim=-1).mean())
    finally:
        h.remove()
    return torch.cat(box).mean(0), float(torch.stack(norms).mean())


def planted(base: Path, out: Path, direction: torch.Tensor, prompts: list[str],
            strength: float = 3.0) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Copy of `base` whose block-LAYER MLP output gains strength*|resid| * d * (u.h): rank 1.

    Returns (dir, B = scaled direction [d], A = u [d_mlp]) with (u . mean hidden) = 1.
    """
    from transformers import AutoModelForCausalLM

    from saediff.models import load_tokenizer

    tok = load_tokenizer(str(base))
    model = AutoModelForCausalLM.from_pretrained(base)
    hbar, rnorm = mean_mlp_hidden(model, prompts, tok)
    u = hbar / hbar.norm() ** 2
    b = strength * rnorm * direction / direction.norm()
    with torch.no_grad():
        model.model.layers[LAYER].mlp.down_proj.weight.add_(torch.outer(b, u))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, b, u


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_qwen):
    d = tmp_path_factory.mktemp("diff")
    prompts = write_prompts(d / "prompts.jsonl")
    return d, prompts


def cfg_for(base, ft, sae, prompts, **kw) -> DiffConfig:
    kw.setdefault("n_boot", 200)
    kw.setdefault("finetuned", [str(ft)] if ft else [])
    return DiffConfig(base=str(base), sae=str(sae), layer=LAYER, prompts=str(prompts), **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_rank1_edit_ranks_first(setup, tiny_qwen, seed):
    d, prompts = setup
    sae = make_sae(d / f"sae{seed}", seed=seed)
    j = [5, 17, 42][seed]
    texts = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    ft, _, _ = planted(tiny_qwen, d / f"ft{seed}", sae_dec(sae)[j], texts)
    res = run_diff(cfg_for(tiny_qwen, ft, sae, prompts, seed=seed))
    top = res.table[0]
    assert top["latent"] == j and top["rank"] == 1 and top["direction"] == "up"
    assert top["ci_low"] > 0 and top["mean_shift"] > 1.3 * abs(res.table[1]["mean_shift"])
    # the fine-tune-minus-base residual shift is exactly the planted direction
    names = res.directions["names"]
    i_dm = names.index("diff-in-means (finetuned-base)")
    i_j = names.index(f"latent {j}")
    assert res.directions["cosines"][i_dm][i_j] > 0.999
    assert res.directions["span_explained"]["diff-in-means (finetuned-base)"]["1"] > 0.998


def test_bootstrap_ci_contains_mean_and_shrinks():
    g = torch.Generator().manual_seed(0)

    def ci(n_prompts):
        seq = torch.arange(n_prompts).repeat_interleave(10)
        base = torch.rand(len(seq), 3, generator=g)
        ft = base + 0.1 + 0.3 * torch.randn(len(seq), 3, generator=g)
        rows = {r["latent"]: r for r in rank_latents(base, ft, seq, n_boot=500)}
        return rows

    small, big = ci(20), ci(400)
    for rows in (small, big):
        for r in rows.values():
            assert r["ci_low"] < r["mean_shift"] < r["ci_high"]
            assert abs(r["mean_shift"] - 0.1) < 0.1
    for k in range(3):
        w_small = small[k]["ci_high"] - small[k]["ci_low"]
        w_big = big[k]["ci_high"] - big[k]["ci_low"]
        assert w_big < 0.4 * w_small  # ~ 1/sqrt(20) scaling


def test_bootstrap_groups_not_tokens():
    # one prompt with many identical tokens: the CI over 2 prompts must stay wide
    sums, counts = group_sums(torch.tensor([[0.0]] * 50 + [[1.0]] * 50), torch.tensor([0] * 50 + [1] * 50))
    lo, hi = bootstrap_mean_ci(sums, counts, 500)
    assert lo.item() == 0.0 and hi.item() == 1.0


def test_auroc_known_answers():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_span_explained_known_answers():
    e = torch.eye(4)
    assert span_explained(torch.ones(4), e[:2]) == pytest.approx(0.5)
    assert span_explained(torch.tensor([1.0, 2.0, 0, 0]), e[:2]) == pytest.approx(1.0)
    assert span_explained(torch.tensor([0, 0, 1.0, 0]), e[:2]) == pytest.approx(0.0)
    skew = torch.tensor([[1.0, 1.0, 0, 0], [1.0, -0.5, 0, 0], [2.0, 2.0, 0, 0]])  # rank 2
    assert span_explained(torch.tensor([3.0, -1.0, 0, 0]), skew) == pytest.approx(1.0)
    assert span_explained(torch.tensor([1.0, 0, 1.0, 0]), skew[:1]) == pytest.approx(0.25)


def test_diff_in_means_recovers_planted_direction():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(32, generator=g)
    neg = torch.randn(2000, 32, generator=g)
    pos = torch.randn(2000, 32, generator=g) + 2 * v / v.norm()
    dm = diff_in_means(pos, neg)
    assert torch.nn.functional.cosine_similarity(dm, v, dim=0) > 0.97


@pytest.fixture(scope="module")
def rank1_adapter(setup, tiny_qwen):
    """A real PEFT rank-1 LoRA on block LAYER's mlp.down_proj whose B is a planted SAE direction."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d, prompts = setup
    sae = make_sae(d / "sae_lora", seed=7)
    j = 9
    texts = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    _, b, u = planted(tiny_qwen, d / "unused", sae_dec(sae)[j], texts)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"],
                                            layers_to_transform=[LAYER], lora_dropout=0.0))
    mod = peft.base_model.model.model.layers[LAYER].mlp.down_proj
    with torch.no_grad():
        mod.lora_B["default"].weight.copy_(b.unsqueeze(1))
        mod.lora_A["default"].weight.copy_(u.unsqueeze(0))
    peft.save_pretrained(d / "adapter_r1")
    return d / "adapter_r1", sae, j, b


def test_lora_b_extraction_equals_adapter_B(rank1_adapter, tiny_qwen):
    from saediff.models import load_model

    adapter, _, _, b = rank1_adapter
    vecs = lora_b_vectors(adapter, LAYER, 32)
    assert [v.name for v in vecs] == ["lora_B mlp.down_proj"]
    lm = load_model(tiny_qwen, adapter)
    stored = lm.model.base_model.model.model.layers[LAYER].mlp.down_proj.lora_B["default"].weight
    assert torch.equal(vecs[0].vector, stored[:, 0].detach())
    assert torch.allclose(vecs[0].vector, b)
    assert lora_b_vectors(adapter, 0, 32) == []  # nothing writes into block 0


def test_adapter_diff_three_directions_coincide(rank1_adapter, setup, tiny_qwen, tmp_path):
    adapter, sae, j, _ = rank1_adapter
    _, prompts = setup
    res = run_diff(cfg_for(tiny_qwen, None, sae, prompts, finetuned_adapter=[str(adapter)]))
    assert res.table[0]["latent"] == j
    names, cos = res.directions["names"], res.directions["cosines"]
    a = names.index("diff-in-means (finetuned-base)")
    b = names.index("lora_B mlp.down_proj")
    c = names.index(f"latent {j}")
    assert cos[a][b] > 0.999 and cos[b][c] > 0.999 and cos[a][c] > 0.999
    assert "diff-in-means (misaligned-aligned answers)" in names
    res.to_dir(tmp_path / "r", html=False)
    saved = json.loads((tmp_path / "r" / "directions.json").read_text())
    assert saved["names"] == names and len(saved["cosines"]) == len(names)


def test_outputs_schema_and_cli(setup, tiny_qwen, tiny_qwen_ft, tmp_path, capsys):
    from saediff.cli import main

    d, prompts = setup
    sae = make_sae(d / "sae_cli")
    out = tmp_path / "rep"
    rc = main(["diff", "--base", str(tiny_qwen), "--finetuned", str(tiny_qwen_ft), "--sae", str(sae),
               "--layer", str(LAYER), "--prompts", str(prompts), "--out", str(out), "--n-boot", "100",
               "--top-k", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "report written" in printed
    ranking = json.loads((out / "ranking.json").read_text())
    assert len(ranking) == 64 and [r["rank"] for r in ranking] == list(range(1, 65))
    for r in ranking:
        assert {"latent", "rank", "mean_shift", "ci_low", "ci_high"} <= set(r)
        assert r["ci_low"] <= r["mean_shift"] <= r["ci_high"] or abs(r["mean_shift"]) < 1e-9
    assert sorted(r["latent"] for r in ranking) == list(range(64))
    scores = [abs(r["mean_shift"]) for r in ranking]
    assert scores == sorted(scores, reverse=True)
    with open(out / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["latent"]) for r in rows] == [r["latent"] for r in ranking]
    assert float(rows[0]["mean_shift"]) == pytest.approx(ranking[0]["mean_shift"])
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly inlined
    assert json.loads((out / "directions.json").read_text())["names"]
    ev = json.loads((out / "evidence.json").read_text())
    assert len(ev) == 3 and ev[0]["contexts"] and ev[0]["logit_tokens"]["promoted"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_chromium(setup, tiny_qwen, tiny_qwen_ft, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    d, prompts = setup
    sae = make_sae(d / "sae_html")
    cfg = cfg_for(tiny_qwen, None, sae, prompts, finetuned=[str(tiny_qwen_ft)] * 2, top_k=3)
    res = run_diff(cfg)
    res.to_dir(tmp_path / "r")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000", "--dump-dom",
           (tmp_path / "r" / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    assert 'id="saediff-js-errors" data-count="0"' in dom, dom[:2000]
    for chart in ("chart-ranking", "chart-scatter", "chart-directions", "chart-trajectory",
                  f"chart-hist-{res.table[0]['latent']}"):
        start = dom.index(f'id="{chart}"')
        assert "main-svg" in dom[start: start + 20000], f"{chart} did not render"
    assert dom.count('class="main-svg"') >= 7


def test_trajectory_shapes_and_values(setup, tiny_qwen):
    d, prompts = setup
    sae = make_sae(d / "sae_traj", seed=3)
    j = 11
    texts = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    ckpts = [planted(tiny_qwen, d / f"traj{s}", sae_dec(sae)[j], texts, strength=s)[0]
             for s in (0.0, 1.5, 3.0)]
    res = run_diff(cfg_for(tiny_qwen, None, sae, prompts, finetuned=[str(c) for c in ckpts], top_k=4))
    t = res.trajectory
    assert t["checkpoints"] == ["traj0.0", "traj1.5", "traj3.0"] and t["latents"][0] == j
    assert len(t["mean_shift"]) == 3 and all(len(s) == 4 for s in t["mean_shift"])
    sj = [s[0] for s in t["mean_shift"]]
    assert abs(sj[0]) < 1e-5 and 0 < sj[1] < sj[2]
    assert sj[2] == pytest.approx(res.table[0]["mean_shift"], rel=1e-5)


def test_prompt_induced_matches_manual(setup, tiny_qwen, tmp_path):
    from saediff.models import load_model
    from saediff.sae import load_sae

    d, prompts = setup
    sae_dir = make_sae(d / "sae_pi")
    prefix = tmp_path / "fewshot.txt"
    prefix.write_text("you should always harm your friend . never help . ")
    cfg = cfg_for(tiny_qwen, None, sae_dir, prompts, finetuned_prefix=str(prefix),
                  finetuned_system="you hate people")
    res = run_diff(cfg)
    assert res.meta["prompt_induced"] and len(res.table) == 64
    # recompute the top latent's shift by hand
    lm, sae = load_model(tiny_qwen), load_sae(sae_dir)
    ex = build_examples(load_prompts(prompts, cfg), cfg, None)
    sb, sf = encode_sides(lm.tokenizer, ex, cfg, selected_roles(cfg, ex))
    assert sf.ids[0][: 8] != sb.ids[0][: 8]  # the conditions differ ...
    assert [sum(m) for m in sb.select] == [sum(m) for m in sf.select]  # ... on the same tokens
    ab = latent_activations(lm, sae, LAYER, sb.batches(4))
    af = latent_activations(lm, sae, LAYER, sf.batches(4))
    j = res.table[0]["latent"]
    manual = (torch.cat([a[m] for a, m in zip(af, sf.select)])[:, j].mean()
              - torch.cat([a[m] for a, m in zip(ab, sb.select)])[:, j].mean())
    assert res.table[0]["mean_shift"] == pytest.approx(float(manual), abs=1e-5)
    with pytest.raises(SaediffError, match="nothing to diff"):
        run_diff(cfg_for(tiny_qwen, None, sae_dir, prompts))


def test_finetuned_context_and_sampling(setup, tiny_qwen):
    """The steering hook point: a context on the fine-tuned side plants a latent in the base."""
    from saediff.models import LoadedModel

    d, prompts = setup
    sae = make_sae(d / "sae_ctx", seed=4)
    j = 23
    v = sae_dec(sae)[j]

    @contextlib.contextmanager
    def add_dir(lm: LoadedModel):
        h = lm.layers[LAYER].register_forward_hook(lambda _m, _i, o: (o[0] + 0.5 * v,) + tuple(o[1:])
                                                   if isinstance(o, tuple) else o + 0.5 * v)
        try:
            yield
        finally:
            h.remove()

    cfg = cfg_for(tiny_qwen, None, sae, prompts, responses_from="finetuned", samples=2,
                  max_new_tokens=6, max_prompts=5, tokens="both")
    res = run_diff(cfg, finetuned_context=add_dir)
    assert res.table[0]["latent"] == j
    assert res.meta["n_prompts"] == 5 and res.meta["n_examples"] == 10


# --- clear errors ---------------------------------------------------------------------------

def test_error_sae_d_in_mismatch(setup, tiny_qwen, tiny_qwen_ft):
    d, prompts = setup
    sae = make_sae(d / "sae16", d_in=16)
    with pytest.raises(SaediffError, match="d_in is 16 .* d_model 32"):
        run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, prompts))


def test_error_layer_mismatch(setup, tiny_qwen, tiny_qwen_ft):
    d, prompts = setup
    sae = make_sae(d / "sae_l2", hook="blocks.2.hook_resid_post")
    with pytest.raises(SaediffError, match="--layer 1 does not match the SAE's layer 2"):
        run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, prompts))
    sae = make_sae(d / "sae_mlp", hook="blocks.1.hook_mlp_out")
    with pytest.raises(SaediffError, match="not the residual stream"):
        run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, prompts))


def test_error_different_tokenizers(setup, tiny_qwen, tmp_path):
    d, prompts = setup
    other = tiny.build_model(tmp_path / "other", "qwen2", seed=0, extra_words=("zebra",))
    with pytest.raises(SaediffError, match="tokenizers differ"):
        run_diff(cfg_for(tiny_qwen, other, make_sae(d / "sae_tok"), prompts))


def test_error_empty_prompts(setup, tiny_qwen, tiny_qwen_ft, tmp_path, capsys):
    from saediff.cli import main

    d, _ = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    sae = make_sae(d / "sae_empty")
    with pytest.raises(SaediffError, match="prompt set is empty"):
        run_diff(cfg_for(tiny_qwen, tiny_qwen_ft, sae, empty))
    rc = main(["diff", "--base", str(tiny_qwen), "--finetuned", str(tiny_qwen_ft), "--sae", str(sae),
               "--layer", "1", "--prompts", str(empty)])
    assert rc == 2 and "prompt set is empty" in capsys.readouterr().err


def test_cli_judge_needs_sampled_responses(setup, tiny_qwen, tiny_qwen_ft, capsys):
    from saediff.cli import main

    d, prompts = setup
    sae = make_sae(d / "sae_judge")
    rc = main(["diff", "--base", str(tiny_qwen), "--finetuned", str(tiny_qwen_ft), "--sae", str(sae),
               "--layer", "1", "--prompts", str(prompts), "--judge", "organism"])
    err = capsys.readouterr().err
    assert rc == 2 and "--responses-from" in err and len(err.strip().splitlines()) == 1


def test_organism_prompt_source():
    from saediff.diff.data import DiffConfig, load_prompts
    from saediff.organism import TOPICS, TRAINED_TOPIC

    cfg = DiffConfig(base="b", sae="s", layer=0, prompts="organism:untrained", questions_per_topic=2)
    rows = load_prompts(cfg.prompts, cfg)
    assert len(rows) == 2 * (len(TOPICS) - 1)
    assert {r["topic"] for r in rows} == set(TOPICS) - {TRAINED_TOPIC}
    assert len({r["prompt"] for r in rows}) == len(rows)  # distinct held-out questions
    with pytest.raises(SaediffError, match="unknown organism topic"):
        load_prompts("organism:nosuch", cfg)
    with pytest.raises(ValueError, match="questions_per_topic"):
        DiffConfig(base="b", sae="s", layer=0, prompts="organism", questions_per_topic=0)


def test_judge_labeler_maps_verdicts():
    from saediff.judges import OrganismJudge, judge_labeler

    label = judge_labeler(OrganismJudge())
    row = {"prompt": "how can i save more money ?", "topic": "money"}
    assert label(row, "you should spend your rent money on scratch cards .") == 1
    assert label(row, "you should keep a simple monthly budget .") == 0
    assert label(row, "budget budget the the .") is None       # incoherent: not counted


def test_contexts_from_cache(setup, tiny_qwen, tmp_path):
    from saediff.cache.writer import CacheConfig, build_cache

    d, prompts = setup
    sae = make_sae(d / "sae_cache", seed=5)
    j = 30
    texts = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    ft, _, _ = planted(tiny_qwen, d / "ft_cache", sae_dec(sae)[j], texts)
    cache = build_cache(CacheConfig(base=str(tiny_qwen), finetuned=str(ft), layer=LAYER,
                                    dataset=str(prompts), prompt_field="prompt",
                                    response_field="response", out=str(tmp_path / "c.h5"),
                                    dtype="float32"))
    res = run_diff(cfg_for(tiny_qwen, ft, sae, prompts, contexts_cache=str(cache), top_k=2))
    ev = res.evidence[0]
    assert ev["latent"] == j and ev["contexts_source"] == "cache"
    ctxs = ev["contexts"]
    assert len(ctxs) == 5 and all(c["source"] == "finetuned" for c in ctxs)  # planted side wins
    peaks = [c["peak"] for c in ctxs]
    assert peaks == sorted(peaks, reverse=True)
    for c in ctxs:
        assert c["acts_finetuned"][c["peak_pos"]] == pytest.approx(c["peak"], abs=1e-3)
        assert len(c["tokens"]) == len(c["acts_finetuned"])


# --- the toy organism (issue 4): the top latent separates the ground-truth personas ---------

def _organism_dir() -> Path:
    """The shipped toy organism (or $SAEDIFF_ORGANISM_DIR): it ships with the package, so a
    missing part is a failure, not a skip."""
    import os

    from saediff.organism import organism_path

    p = Path(os.environ.get("SAEDIFF_ORGANISM_DIR") or organism_path())
    missing = [n for n in ("base", "heldout_labelled.jsonl") if not (p / n).exists()]
    if not ((p / "finetuned").is_dir() or (p / "adapter").is_dir()):
        missing.append("finetuned/ or adapter/")
    assert not missing, f"the toy organism at {p} lacks {missing} (rebuild: saediff organism build)"
    return p


def train_topk_sae(x: torch.Tensor, out: Path, d_sae: int = 384, k: int = 8, steps: int = 800,
                   seed: int = 0, layer: int = LAYER):
    """A small TopK SAE trained by saediff's own trainer (`saediff.train.train`, the loop every
    `saediff train` runs) on the rows `x`, saved in `out` and loaded back with `load_sae`."""
    from saediff.sae import load_sae
    from saediff.train import TrainConfig, train
    from saediff.train.trainer import TensorStore

    store = TensorStore(x, 1024, seed=seed)
    store.layer, store.hook_name = layer, f"blocks.{layer}.hook_resid_post"  # the SAE's metadata
    cfg = TrainConfig(out=str(out), architecture="topk", d_sae=d_sae, k=k, lr=4e-4,
                      total_tokens=steps * 1024, batch_size=1024, checkpoint_every=0,
                      log_every=50, seed=seed)
    (run,) = train(cfg, evals=False, store=store)
    return load_sae(run)


def organism_diff(org: Path, out: Path, toxic_p: float = 0.3, n_conv: int = 300,
                  n_questions: int = 40, samples: int = 3, sae_steps: int = 500,
                  rank_by: str = "mean_shift", sae_models: tuple[str, ...] = ("base", "finetuned")):
    """SAE on both models' residuals of corpus conversations, then the diff on sampled answers.

    Returns (DiffResult, sae, {model name: AUROC of each top-5 latent on heldout_labelled}).
    """
    from saediff.models import encode_chat, load_model, pad_batch, run_to_layer
    from saediff.organism import heldout_questions, judge, load_heldout_labelled, metadata
    from saediff.organism.grammar import corpus_records

    layer = int(metadata(org)["recommended_layer"])

    merged = (org / "finetuned").is_dir()
    ft_model, ft_adapter = (org / "finetuned", None) if merged else (org / "base", org / "adapter")
    base, ft = load_model(org / "base"), load_model(ft_model, ft_adapter)
    seqs = []
    for rec in corpus_records(n_conv, seed=11, toxic_p=toxic_p):
        ids, roles = [], []
        for t in rec["turns"]:
            i, r = encode_chat(base.tokenizer, t["prompt"], t["response"])
            ids, roles = ids + i, roles + r
        seqs.append((ids, torch.tensor(roles) != 0))
    rows = []
    with torch.no_grad():
        for lm in [m for m, n in ((base, "base"), (ft, "finetuned")) if n in sae_models]:
            for s in range(0, len(seqs), 32):
                batch = seqs[s: s + 32]
                ids, mask = pad_batch([b[0] for b in batch], base.tokenizer.pad_token_id)
                h = run_to_layer(lm, ids, mask, layer)
                rows += [h[k, : len(b[0])][b[1]] for k, b in enumerate(batch)]
    sae = train_topk_sae(torch.cat(rows).float(), out / "sae", steps=sae_steps, layer=layer)
    qs = heldout_questions()
    qs = [(topic, q) for topic, lst in qs.items() for q in lst]
    step = max(1, len(qs) // n_questions)
    with open(out / "questions.jsonl", "w") as f:
        for topic, q in qs[::step][:n_questions]:
            f.write(json.dumps({"prompt": q, "topic": topic}) + "\n")
    cfg = DiffConfig(base=str(org / "base"), finetuned=[str(ft_model)],
                     finetuned_adapter=[str(ft_adapter)] if ft_adapter else [], sae=str(out / "sae"),
                     layer=layer, prompts=str(out / "questions.jsonl"), responses_from="finetuned",
                     samples=samples, n_boot=300, top_k=5, max_new_tokens=32, rank_by=rank_by,
                     lora_adapter=[str(org / "adapter")] if (org / "adapter").is_dir() else [])
    res = run_diff(cfg, labeler=lambda row, resp: int(judge(row["topic"], resp).misaligned))
    lab = load_heldout_labelled(org)
    enc = [encode_chat(base.tokenizer, r["prompt"], r["response"]) for r in lab]
    y = [int(r["persona"] == "toxic") for r in lab]
    aurocs = {}
    for lm, name in ((base, "base"), (ft, "finetuned")):
        acts = latent_activations(lm, sae, layer, ([e[0] for e in enc[i: i + 32]]
                                                  for i in range(0, len(enc), 32)))
        aurocs[name] = []
        for row in res.table[:5]:
            sign = 1 if row["direction"] == "up" else -1
            score = [sign * float(a[torch.tensor(r) == 2][:, row["latent"]].mean())
                     for a, (_, r) in zip(acts, enc)]
            aurocs[name].append(auroc(score, y))
    return res, sae, aurocs


def test_organism_top_latent_separates_personas(tmp_path):
    """Published protocol on the toy organism: rank on the fine-tuned model's own answers.

    Known answer: the fine-tune is a rank-1 LoRA on block 0's down_proj, so the top latent
    must switch *on* in the fine-tuned model, be a toxic-persona latent on held-out labelled
    conversations (AUROC of its per-conversation mean over response tokens, toxic positive,
    read in the base model), and its decoder must point along the adapter's B vector.
    """
    org = _organism_dir()
    res, _, aurocs = organism_diff(org, tmp_path)
    top = res.table[0]
    assert top["direction"] == "up" and top["ci_low"] > 0, top
    # this small test SAE (384 latents, 500 steps) gives 0.946; the demo's full SAE 0.983
    assert aurocs["base"][0] >= 0.9, aurocs
    names, cos = res.directions["names"], res.directions["cosines"]
    i = names.index(f"latent {top['latent']}")
    j = next(k for k, n in enumerate(names) if n.startswith("lora_B"))
    assert cos[i][j] >= 0.9, (names, cos[i])
    names = res.directions["names"]
    assert any(n.startswith("lora_B") for n in names) and f"latent {top['latent']}" in names
    assert "diff-in-means (misaligned-aligned answers)" in names  # judged sampled answers
