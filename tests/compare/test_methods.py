"""Diffing methods with known answers: crosscoder (+ latent scaling), diff-SAE, lenses, PCA."""
from __future__ import annotations

import copy

import pytest
import torch

from saediff.sae import load_sae
from saediff.sae.crosscoder import Crosscoder, latent_scaling
from saediff.train.loop import TrainConfig, train
from saediff.train.trainer import TensorStore


def _planted_pairs(n: int = 30_000, d: int = 16, seed: int = 0):
    """Paired activations from 6 shared, 3 fine-tuned-only and 3 base-only feature directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T[:12]  # orthonormal rows
    fire = (torch.rand(n, 12, generator=g) < 0.08).float()
    mag = fire * (1.0 + 0.2 * torch.randn(n, 12, generator=g)).abs()
    shared, ft_only, base_only = range(0, 6), range(6, 9), range(9, 12)
    in_base = torch.zeros(12)
    in_base[list(shared) + list(base_only)] = 1
    in_ft = torch.zeros(12)
    in_ft[list(shared) + list(ft_only)] = 1
    xb = (mag * in_base) @ dirs
    xf = (mag * in_ft) @ dirs
    return torch.stack([xb, xf], 1), dirs, (list(shared), list(ft_only), list(base_only))


def _cc_cfg(tmp_path, **kw):
    base = dict(cache=["unused.h5"], out=str(tmp_path / "cc"), architecture="crosscoder",
                d_sae=24, k=1.0, total_tokens=1200 * 256, batch_size=256, lr=3e-3,
                norm_batches=4, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def planted_cc(tmp_path_factory):
    torch.manual_seed(0)
    data, dirs, groups = _planted_pairs()
    out = tmp_path_factory.mktemp("cc")
    (run,) = train(_cc_cfg(out), store=TensorStore(data, 256),)
    return load_sae(run), data, dirs, groups


def _match(W: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best latent per planted direction by decoder cosine: (cosine, latent index)."""
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (dirs @ Wn.T).max(dim=1)


def test_crosscoder_recovers_shared_and_exclusive_latents(planted_cc):
    cc, data, dirs, (shared, ft_only, base_only) = planted_cc
    assert isinstance(cc, Crosscoder)
    rel = cc.relative_norms()
    cos_ft, lat_ft = _match(cc.W_dec[1].detach(), dirs)
    cos_b, lat_b = _match(cc.W_dec[0].detach(), dirs)
    for i in ft_only:
        assert cos_ft[i] > 0.9 and rel[lat_ft[i]] > 0.9, (i, cos_ft[i], rel[lat_ft[i]])
    for i in base_only:
        assert cos_b[i] > 0.9 and rel[lat_b[i]] < 0.1, (i, cos_b[i], rel[lat_b[i]])
    for i in shared:
        assert cos_ft[i] > 0.9 and 0.3 < rel[lat_ft[i]] < 0.7, (i, cos_ft[i], rel[lat_ft[i]])
    # reconstruction through the saved (scale-folded) weights at raw scale
    xb, xf = data[:2000, 0], data[:2000, 1]
    _, rb, rf = cc(xb, xf)
    fvu = ((xf - rf) ** 2).sum() / ((xf - xf.mean(0)) ** 2).sum()
    assert fvu < 0.15


def test_latent_scaling_separates_true_from_false_exclusives(planted_cc):
    cc, data, dirs, (shared, ft_only, _) = planted_cc
    _, lat_ft = _match(cc.W_dec[1].detach(), dirs)
    true_excl = [int(lat_ft[i]) for i in ft_only]
    # a false exclusive: a shared latent whose base decoder is removed, so it *looks*
    # fine-tuned-only although its direction is in the base activations all the same
    fake = copy.deepcopy(cc)
    false_excl = [int(lat_ft[i]) for i in shared[:3]]
    with torch.no_grad():
        fake.W_dec[0, false_excl] = 0.0
    assert (fake.relative_norms()[false_excl] > 0.99).all()
    pairs = [(data[a:a + 4096, 0], data[a:a + 4096, 1]) for a in range(0, 16384, 4096)]
    beta = latent_scaling(fake, pairs, torch.tensor(true_excl + false_excl))
    ratio = beta["ratio"]
    assert (beta["beta_ft"] > 0.7).all(), beta
    assert (ratio[:3].abs() < 0.15).all() and (ratio[3:] > 0.8).all(), ratio


def test_crosscoder_save_load_round_trip(planted_cc, tmp_path):
    cc, data, _, _ = planted_cc
    cc.save(tmp_path / "again")
    back = load_sae(tmp_path / "again")
    x = data[:64]
    assert torch.equal(cc.encode(x[:, 0], x[:, 1]), back.encode(x[:, 0], x[:, 1]))
    assert torch.equal(back.decode(back.encode(x[:, 0], x[:, 1]), "finetuned"),
                       cc.decode(cc.encode(x[:, 0], x[:, 1]), 1))


# --- diff-SAE -----------------------------------------------------------------------------------

def test_diff_sae_recovers_planted_difference_direction(tmp_path):
    from saediff.diff.methods import METHODS, MethodInputs

    from test_train import write_array_cache

    g = torch.Generator().manual_seed(1)
    n, d = 16_384, 16
    xb = torch.randn(n, d, generator=g) * 2.0
    v = torch.randn(d, generator=g)
    v = v / v.norm()
    w = torch.randn(d, generator=g)
    w = w - (w @ v) * v
    w = w / w.norm()
    on = (torch.rand(n, generator=g) < 0.2).float() * (1 + torch.rand(n, generator=g))
    weak = (torch.rand(n, generator=g) < 0.05).float() * 0.5  # a rarer, weaker change
    xf = xb + on[:, None] * 3.0 * v + weak[:, None] * w
    cache = write_array_cache(tmp_path / "pair.h5", {"base": xb.numpy(), "finetuned": xf.numpy()})
    cfg = TrainConfig(cache=[str(cache)], out=str(tmp_path / "dsae"), input="difference",
                      architecture="topk", d_sae=8, k=1, total_tokens=120 * 256, batch_size=256,
                      lr=5e-3, eval_sequences=0, checkpoint_every=0, buffer_rows=4096,
                      norm_batches=4, dead_feature_window=40)
    (run,) = train(cfg)
    sae = load_sae(run)
    assert sae.cfg.metadata.saediff_input == "difference"
    inputs = MethodInputs(layer=1, d_model=d, x_base=xb[:4096], x_ft=xf[:4096],
                          diff_sae=str(run))
    best = METHODS["diff_sae"]().candidates(inputs, top=3)[0]
    cos = float(best.vector @ v / best.vector.norm())
    assert cos > 0.95, cos


def test_paired_store_rows_are_the_same_tokens(tmp_path):
    from saediff.cache.store import PairedStore

    from test_train import write_array_cache

    n, d = 3000, 4
    xb = torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    cache = write_array_cache(tmp_path / "p.h5", {"base": xb.numpy(),
                                                  "finetuned": (xb * 3).numpy()})
    st = PairedStore(str(cache), batch_size=256, seed=3, buffer_rows=1024, block_rows=128)
    for _ in range(20):  # across buffer groups and epochs
        b = next(st)
        assert torch.equal(b[:, 1], b[:, 0] * 3)
    diff = next(PairedStore(str(cache), mode="diff", batch_size=64, seed=3))
    assert diff.shape == (64, d) and (diff != 0).any()


# --- lenses and PCA -----------------------------------------------------------------------------

def test_kl_lens_ranks_the_planted_changed_token_first(tiny_qwen):
    from torch import nn

    from saediff.diff.methods.lenses import rank_token_ids, token_kl, top_tokens
    from saediff.models import load_model

    base = load_model(tiny_qwen)
    ft = load_model(tiny_qwen)
    planted = base.tokenizer.convert_tokens_to_ids("water")
    hf = ft.model
    with torch.no_grad():
        hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())  # untie
        emb = hf.get_input_embeddings().weight
        emb[planted] += 4.0 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    vocab = list(range(4, 60))
    seqs = [[vocab[i] for i in torch.randint(0, len(vocab), (24,), generator=g)] for _ in range(12)]
    for s in seqs[:6]:
        s[5] = planted
    kl = token_kl(base, ft, seqs)
    ranked = rank_token_ids(kl, seqs)
    assert ranked[0][0] == planted, ranked[:3]
    assert top_tokens(kl, seqs, base.tokenizer, k=1)[0]["token_id"] == planted
    # identical models: zero KL everywhere
    same = token_kl(base, base, seqs[:2])
    assert max(float(x.max()) for x in same) < 1e-6


def test_pca_finds_the_planted_varying_difference():
    from saediff.diff.methods import METHODS, MethodInputs, pca_directions

    g = torch.Generator().manual_seed(4)
    n, d = 5000, 12
    xb = torch.randn(n, d, generator=g)
    v = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T
    xf = xb + torch.randn(n, 1, generator=g) * 3.0 * v[0] + 1.0 * v[0] \
        + torch.randn(n, 1, generator=g) * 0.3 * v[1] + 0.05 * torch.randn(n, d, generator=g)
    axes, share = pca_directions(xf - xb, 2)
    assert abs(float(axes[0] @ v[0])) > 0.99 and abs(float(axes[1] @ v[1])) > 0.95
    assert share[0] > 0.8
    best = METHODS["pca"]().candidates(MethodInputs(layer=0, d_model=d, x_base=xb, x_ft=xf))[0]
    assert float(best.vector @ v[0]) > 0.99  # oriented along the shift


# --- LoRA amplification --------------------------------------------------------------------------

def test_amplify_interpolates_between_base_and_finetune_and_restores():
    from saediff.compare.amplify import amplify
    from saediff.models import load_model
    from saediff.organism import organism_path

    org = organism_path()
    base = load_model(org / "base")
    ft = load_model(org / "base", org / "adapter_all")
    ids = torch.tensor([base.tokenizer.encode("how do i save money ?")])
    with torch.no_grad():
        lb, lf = base(input_ids=ids).logits, ft(input_ids=ids).logits
        with amplify(ft, 0.0):
            l0 = ft(input_ids=ids).logits
        with amplify(ft, 2.0):
            l2 = ft(input_ids=ids).logits
        assert torch.allclose(l0, lb, atol=1e-5)
        assert not torch.allclose(l2, lf, atol=1e-3)
        with pytest.raises(RuntimeError):
            with amplify(ft, 3.0):
                raise RuntimeError("boom")
        assert torch.allclose(ft(input_ids=ids).logits, lf, atol=1e-6)  # restored


# --- `saediff compare` on the shipped organism ----------------------------------------------------

def test_compare_cli_on_the_rank1_organism(tmp_path):
    """Rank-1 adapter on block 0: x_ft − x_base after block 0 is exactly a multiple of the B
    vector, so PCA's top direction must be B (cosine 1), and the CLI writes the interface."""
    import json

    from saediff.cache import CacheConfig, build_cache
    from saediff.cli import main
    from saediff.io import write_jsonl
    from saediff.organism import load_heldout_labelled, organism_path
    from saediff.organism.grammar import corpus_records

    org = organism_path()
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, corpus_records(120, 1, max_turns=1))
    cache = tmp_path / "pair.h5"
    build_cache(CacheConfig(base=str(org / "base"), finetuned_adapter=str(org / "adapter"),
                            layer=0, dataset=str(corpus), prompt_field="prompt",
                            response_field="response", max_tokens=3000, out=str(cache)))
    rows = load_heldout_labelled()
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, [r for r in rows if r["persona"] == "aligned"][:24]
                + [r for r in rows if r["persona"] != "aligned"][:24])
    out = tmp_path / "cmp"
    rc = main(["compare", "--heldout", str(heldout), "--base", str(org / "base"),
               "--finetuned-adapter", str(org / "adapter"), "--cache", str(cache), "--prompts", "organism:money",
               "--methods", "pca,mean_diff,lora_b", "--judge", "organism", "--samples", "2",
               "--questions-per-topic", "2", "--max-new-tokens", "24", "--lens-sequences", "2",
               "--out", str(out)])
    assert rc == 0
    board = json.loads((out / "compare.json").read_text())
    keys = {"method", "candidate", "auroc", "cos_lora_b", "cos_mean_diff",
            "misaligned_given_coherent_unsteered", "misaligned_given_coherent_steered",
            "coherent_rate_steered", "n"}
    assert [r["method"] for r in board] == ["pca", "mean_diff", "lora_b"]
    assert all(set(r) == keys for r in board)
    by = {r["method"]: r for r in board}
    assert by["lora_b"]["cos_lora_b"] == pytest.approx(1.0, abs=1e-5)
    assert by["pca"]["cos_lora_b"] > 0.999
    assert by["mean_diff"]["cos_mean_diff"] == pytest.approx(1.0, abs=1e-5)
    assert by["mean_diff"]["auroc"] > 0.9 and all(r["n"] == 4 for r in board)
    assert "chart-leaderboard" in (out / "report.html").read_text()
    assert main(["compare", "--base", "x", "--cache", str(cache), "--finetuned", "y",
                 "--methods", "nope", "--out", str(out)]) == 2


def test_crosscoder_aux_loss_known_answer():
    """AuxK: the k_aux = d_in/2 largest pre-ReLU outputs among dead latents reconstruct each
    model's residual error; only dead latents' decoder rows get a gradient."""
    from saediff.sae.crosscoder import CrosscoderCfg
    from saediff.train.crosscoder_trainer import aux_loss

    cc = Crosscoder(CrosscoderCfg(d_in=4, d_sae=6, k=1.0), seed=1)
    h = torch.tensor([[0.5, -1.0, 2.0, 3.0, -0.2, 0.1],
                      [1.0, 0.3, -2.0, 0.0, 0.7, 4.0]])
    dead = torch.tensor([False, True, True, False, True, False])  # 3 dead > k_aux = 2
    e = (torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
         torch.randn(2, 4, generator=torch.Generator().manual_seed(1)))
    loss = aux_loss(cc, h, e, dead)
    # by hand: row 0 keeps dead latents 2 (2.0) and 4 (-0.2); row 1 keeps 4 (0.7) and 1 (0.3)
    f = torch.zeros(2, 6)
    f[0, 2], f[0, 4], f[1, 4], f[1, 1] = 2.0, -0.2, 0.7, 0.3
    want = sum(((f @ cc.W_dec[m] - e[m]) ** 2).sum(-1).mean() for m in range(2))
    assert torch.allclose(loss, want)
    loss.backward()
    live = (~dead).nonzero().flatten()
    assert cc.W_dec.grad[:, live].abs().max() == 0 and cc.W_dec.grad[:, 2].abs().max() > 0
    # one dead latent (< k_aux): scaled by 1/2
    one = torch.tensor([False, False, True, False, False, False])
    f1 = torch.zeros(2, 6)
    f1[:, 2] = h[:, 2]
    want1 = 0.5 * sum(((f1 @ cc.W_dec[m] - e[m]) ** 2).sum(-1).mean() for m in range(2))
    assert torch.allclose(aux_loss(cc, h, e, one), want1)
    assert aux_loss(cc, h, e, torch.zeros(6, dtype=torch.bool)) == 0
