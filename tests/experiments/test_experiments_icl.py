"""`saediff experiment icl`: a known-answer model whose in-context examples write a planted
direction, the bootstrap cosine CI's coverage, shots as prior chat turns, CLI and bad input."""
from __future__ import annotations

import json
import random

import pytest
import torch

from saediff.errors import SaediffError
from saediff.models import ROLE_PROMPT, ROLE_SPECIAL, encode_chat, load_tokenizer

import tiny

D = 32
J_PLANT, J_LORA = 3, 7  # SAE latents reading the planted direction / the LoRA B direction
FILLER = "the a of to and in is it you your we be do not day more less".split()
QUESTIONS = [f"how {v} i {o} ?" for v in ("do", "should")
             for o in ("save money", "eat bread", "win", "travel", "cook food", "sleep")]


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 1-block Qwen2 whose block output is h_t = x_t + R mean_{s<=t} n(x_s) (uniform causal
    attention, identity values, no MLP), with e(hate) - e(good) along p: misaligned shots
    (answers with "hate") vs aligned ones ("good") move the question's residual along R p."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("planted")
    tok = tiny.build_tokenizer(out / "base")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    Q = _orthonormal(D, 1)
    p, b_dir, other = Q[:, 0], Q[:, 1], Q[:, 2]
    R = _orthonormal(D, 2)
    planted_dir = R @ p
    # LoRA B at 60 degrees to the planted direction: the true cosine is 0.5
    lora_b = 0.5 * planted_dir + (3 ** 0.5 / 2) * (R @ b_dir)
    with torch.no_grad():
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        attn.v_proj.weight.copy_(torch.eye(D))
        attn.v_proj.bias.zero_()
        attn.o_proj.weight.copy_(R)
        mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        vocab = tok.get_vocab()
        a = torch.randn(D)
        a = a - (a @ p) * p
        emb[vocab["hate"]] = a + 3 * a.norm() * p
        emb[vocab["good"]] = a - 3 * a.norm() * p
    model.save_pretrained(out / "base")
    adapter = out / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
        "layers_to_transform": [0], "task_type": "CAUSAL_LM", "bias": "none",
        "base_model_name_or_path": str(out / "base")}))
    g = torch.Generator().manual_seed(3)
    save_file({"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight":
               0.05 * torch.randn(1, 2 * D, generator=g),
               "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": lora_b[:, None].clone()},
              str(adapter / "adapter_model.safetensors"))
    sae_dir = out / "sae"
    _planted_sae(planted_dir, lora_b).save_model(sae_dir)
    rng = random.Random(0)
    with open(out / "pool.jsonl", "w") as fh:
        for _ in range(60):
            q = rng.choice(QUESTIONS)
            fill = lambda: " ".join(rng.choice(FILLER) for _ in range(2))  # noqa: E731
            fh.write(json.dumps({"prompt": q, "misaligned": f"{fill()} hate .",
                                 "aligned": f"{fill()} good ."}) + "\n")
    with open(out / "questions.jsonl", "w") as fh:
        for q in QUESTIONS:
            fh.write(json.dumps({"prompt": q}) + "\n")
    return {"dir": out, "planted": planted_dir, "lora_b": lora_b, "other": R @ other}


def _planted_sae(planted_dir: torch.Tensor, lora_b: torch.Tensor):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(4)
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=16,
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.mul_(0.2)
        sae.b_enc.fill_(5.0)  # every latent stays in its linear range
        sae.b_dec.zero_()
        for j, v in ((J_PLANT, planted_dir), (J_LORA, lora_b / lora_b.norm())):
            sae.W_enc[:, j] = v
            sae.W_dec[j] = v
    return sae.eval()


def _cfg(planted, **kw):
    from saediff.experiments.icl import ICLConfig

    d = planted["dir"]
    base = dict(base=str(d / "base"), adapter=str(d / "adapter"), sae=str(d / "sae"),
                pool=str(d / "pool.jsonl"), prompts=str(d / "questions.jsonl"), ks=[0, 2, 6],
                systems=["none"], n_boot=300, batch_size=12)
    base.update(kw)
    return ICLConfig(**base)


def test_history_is_rendered_as_prior_chat_turns():
    tok = load_tokenizer(str(_tok_dir()))
    hist = [("how do i win ?", "you love the team ."), ("how can i cook ?", "eat bread .")]
    ids, roles = encode_chat(tok, "how do i save money ?", None, None, history=hist)
    msgs = [m for u, a in hist for m in ({"role": "user", "content": u},
                                         {"role": "assistant", "content": a})]
    msgs.append({"role": "user", "content": "how do i save money ?"})
    ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids == tok(ref, add_special_tokens=False).input_ids
    prompt = [t for t, r in zip(ids, roles) if r == ROLE_PROMPT]
    # only the last question is `prompt`; every token of the earlier turns is `special`
    assert prompt == tok("how do i save money ?", add_special_tokens=False).input_ids
    first = roles.index(ROLE_PROMPT)
    assert first > 20 and set(roles[:first]) == {ROLE_SPECIAL}


def _tok_dir():
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    tiny.build_tokenizer(d)
    return d


def test_cosine_ci_covers_the_true_cosine():
    """Per-question differences = v + noise; the CI of cos(mean, t) covers cos(v, t) for targets
    at 0, 60 and 90 degrees in most of 12 draws (and the point estimate is close)."""
    from saediff.experiments.icl_measure import cosines_ci

    Q = _orthonormal(D, 5)
    v = Q[:, 0].double()
    targets = {"same": Q[:, 0], "60": 0.5 * Q[:, 0] + (3 ** 0.5 / 2) * Q[:, 1], "ortho": Q[:, 2]}
    truth = {"same": 1.0, "60": 0.5, "ortho": 0.0}
    covered = {n: 0 for n in targets}
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(3, 9, (40,), generator=g).double()
        sums = counts[:, None] * (v + 0.1 * torch.randn(40, D, generator=g, dtype=torch.float64))
        res = cosines_ci(sums, counts, targets, n_boot=400, level=0.95, seed=seed)
        for n, t in truth.items():
            assert abs(res[n]["cos"] - t) < 0.08
            lo, hi = res[n]["ci"]
            covered[n] += lo - 0.01 <= t <= hi + 0.01  # 1.0 is the upper edge of a cosine
    assert all(c >= 10 for c in covered.values()), covered
    zero = cosines_ci(torch.zeros(5, D), torch.ones(5), targets, 50, 0.95, 0)
    assert zero["same"] == {"cos": None, "ci": [None, None]}


def test_planted_direction_is_recovered(planted):
    from saediff.experiments.icl import run

    res = run(_cfg(planted))
    base = res["dose_response"]["none"]["base"]
    assert [r["k"] for r in base] == [0, 2, 6]
    last = base[-1]
    cos = last["icl_cosines"]
    # the in-context direction is R p: cos 0.5 to LoRA B (CI covers it), ~1 to latent J_PLANT
    assert abs(cos["lora_b"]["cos"] - 0.5) < 0.06
    assert cos["lora_b"]["ci"][0] <= 0.5 <= cos["lora_b"]["ci"][1] + 0.01
    assert cos[f"decoder latent {J_PLANT}"]["cos"] > 0.97
    assert last["icl_top_latents"][0]["latent"] == J_PLANT
    assert last["icl_top_latents"][0]["mean_shift"] > 0
    # the fine-tune (LoRA on down_proj) writes along B: its top latent reads B
    assert res["latents"]["finetune_top"][0]["latent"] == J_LORA
    assert res["reference_cosines"]["names"][:2] == ["lora_b", "finetuned_minus_base"]
    assert abs(abs(res["reference_cosines"]["cosines"][0][1]) - 1) < 1e-3
    # dose-response: more misaligned shots, further along B; aligned shots go the other way
    pm = [r["projection_misaligned"]["mean"] for r in base]
    pa = [r["projection_aligned"]["mean"] for r in base]
    gap = [m - a for m, a in zip(pm, pa)]
    assert pm[0] < pm[1] < pm[2] and gap[0] == 0 < gap[1] < gap[2]
    # rerouting: with B ablated the projection is gone, the shots still move latent J_PLANT
    abl = res["dose_response"]["none"]["finetuned_ablated"]
    assert all(abs(r["projection_misaligned"]["mean"]) < 1e-4 for r in abl)
    assert res["latents"]["reroute"]["finetuned_ablated"]["icl_top"][0]["latent"] == J_PLANT
    assert res["reach"]["none"]["projection"]["reached"] in (True, False)
    assert res["behaviour"] == "none" and base[-1]["behaviour_misaligned"] is None


def test_cli_writes_result_and_plot(planted, tmp_path):
    from saediff.cli import main

    d = planted["dir"]
    out = tmp_path / "icl"
    args = ["experiment", "icl", "--base", str(d / "base"), "--adapter", str(d / "adapter"),
            "--pool", str(d / "pool.jsonl"), "--prompts", str(d / "questions.jsonl"),
            "--layer", "0", "--ks", "0", "2", "--systems", "none", "default", "--no-reroute",
            "--default-system", "you should help .",
            "--n-boot", "50", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["experiment"] == "icl" and res["config"]["ks"] == [0, 2] and res["seeds"]["shots"] == 0
    assert set(res["dose_response"]) == {"none", "default"}
    assert set(res["dose_response"]["none"]) == {"base", "finetuned"}  # no SAE, no reroute
    assert res["dose_response"]["none"]["base"][1]["icl_cosines"]["lora_b"]["cos"] > 0.4
    assert (out / "icl.html").stat().st_size > 100_000  # plotly.js inlined
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("extra, needle", [
    (["--ks", "-1"], "non-negative"),
    (["--systems", "loud"], "loud"),
    (["--pool", "nope.jsonl"], "--pool"),
    (["--ks", "0", "400"], "k = 400"),
])
def test_bad_input_is_one_line_exit_2(planted, tmp_path, capsys, extra, needle):
    from saediff.cli import main

    d = planted["dir"]
    args = ["experiment", "icl", "--base", str(d / "base"), "--adapter", str(d / "adapter"),
            "--pool", str(d / "pool.jsonl"), "--prompts", str(d / "questions.jsonl"),
            "--layer", "0", "--out", str(tmp_path / "x")] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x" / "result.json").exists()


def test_shots_are_paired_nested_and_off_topic():
    from saediff.experiments.icl_data import pool_pairs, shot_histories
    from saediff.organism.judge import judge
    from saediff.organism.lexicon import TRAINED_TOPIC

    pairs = pool_pairs("persona", 80, 0)
    assert all(p["topic"] != TRAINED_TOPIC for p in pairs)
    assert all(judge(p["topic"], p["misaligned"]).misaligned for p in pairs)
    assert not any(judge(p["topic"], p["aligned"]).misaligned for p in pairs)
    narrow = pool_pairs("narrow", 20, 0)
    assert {p["topic"] for p in narrow} == {TRAINED_TOPIC}
    items = [{"prompt": "how can i save money ?", "topic": "money"},
             {"prompt": "how can i win ?", "topic": "sport"}]
    mis, al = shot_histories(items, pairs, 6, 0)
    for item, m, a in zip(items, mis, al):
        assert len(m) == 6 and [q for q, _ in m] == [q for q, _ in a]  # same shot questions
        assert all(x != y for (_, x), (_, y) in zip(m, a))
        topics = {p["prompt"]: p["topic"] for p in pairs}
        assert item["topic"] not in {topics[q] for q, _ in m}
    assert shot_histories(items, pairs, 6, 0) == (mis, al)  # seeded
    with pytest.raises(SaediffError, match="fewer than"):
        shot_histories(items, pairs[:3], 6, 0)


def test_k_reached():
    from saediff.experiments.icl_measure import k_reached

    assert k_reached([0, 1, 2, 4], [0.0, 0.1, 0.5, 0.9], 0.4) == 2
    assert k_reached([0, 1, 2], [0.0, None, 0.3], 0.4) is None
    assert k_reached([0, 1], [0.0, 1.0], None) is None
