"""Steering: hook math, KV-cache exactness, positions, adapters, judges, CLI, sweep, rerouting."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import saediff
from saediff.errors import SaediffError
from saediff.judges import JudgeScore, OpenAIJudge, misaligned_given_coherent, score_from_top_logprobs, wilson
from saediff.models import capture_residual, encode_chat, load_model

LAYER = 1
J = 3  # a latent made active on most tokens
DEAD = 5  # a latent that never fires


def _sae(kind: str = "standard", d_in: int = 32, d_sae: int = 64, seed: int = 0, **kw):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post")
    cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
                    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_enc[J] = 3.0
        sae.b_enc[DEAD] = -1e4
        sae.W_dec.mul_(0.8)
        if kind == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae.eval()


@pytest.fixture(scope="module")
def lm(tiny_qwen):
    return load_model(tiny_qwen)


@pytest.fixture(scope="module")
def sae():
    return _sae()


def _ids(lm, text="how do i save money ?"):
    return torch.tensor([encode_chat(lm.tokenizer, text)[0]])


def _greedy(lm, ids, n=12, **kw):
    with torch.no_grad():
        return lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           do_sample=False, **kw)


def _no_hooks(lm):
    from saediff.models import _base

    top = _base(lm.model)
    return (all(not blk._forward_hooks and not blk._forward_pre_hooks for blk in lm.layers)
            and not top._forward_pre_hooks and not top._forward_hooks)


def _resid(lm, ids):
    with capture_residual(lm, LAYER) as box, torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    return box["resid"].clone()


# --- exactness and hook hygiene ------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_clamp_to_own_value_reproduces_greedy(lm, sae, use_cache):
    ids = _ids(lm)
    ref = _greedy(lm, ids, use_cache=use_cache)
    with saediff.steer(lm, sae, latent=J, clamp=lambda f: f):
        same = _greedy(lm, ids, use_cache=use_cache)
    with saediff.steer(lm, sae, latent=DEAD, clamp=0.0):  # its own value is 0 everywhere
        same_dead = _greedy(lm, ids, use_cache=use_cache)
    with saediff.steer(lm, sae, latent=J, clamp=80.0):
        moved = _greedy(lm, ids, use_cache=use_cache)
    assert torch.equal(ref, same) and torch.equal(ref, same_dead)
    assert not torch.equal(ref, moved)  # the hook is live
    assert _no_hooks(lm)
    assert torch.equal(_greedy(lm, ids, use_cache=use_cache), ref)


def test_hooks_removed_after_exception(lm, sae):
    with pytest.raises(RuntimeError, match="boom"):
        with saediff.steer(lm, sae, latent=J, clamp=0.0, positions="generated"):
            assert not _no_hooks(lm)
            raise RuntimeError("boom")
    assert _no_hooks(lm)


def test_bad_arguments(lm, sae):
    with pytest.raises(SaediffError, match="exactly one"):
        with saediff.steer(lm, sae, latent=J, clamp=0.0, add=1.0):
            pass
    with pytest.raises(SaediffError, match="out of range"):
        with saediff.steer(lm, sae, latent=10**6, clamp=0.0):
            pass
    with pytest.raises(SaediffError, match="d_model"):
        with saediff.steer(lm, _sae(d_in=16), latent=J, clamp=0.0):
            pass
    assert _no_hooks(lm)


# --- math ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("standard", {}), ("jumprelu", {}),
                                     ("topk", {"k": 8}),
                                     ("topk", {"k": 8, "rescale_acts_by_decoder_norm": True})])
def test_clamp_math(lm, kind, kw):
    sae = _sae(kind, **kw)
    ids = _ids(lm, "what should i eat every day ? bread and water .")
    h = _resid(lm, ids)
    f = sae.encode(h).detach()
    d = sae.W_dec.detach()
    if kw.get("rescale_acts_by_decoder_norm"):
        d = d / d.norm(dim=-1, keepdim=True)
    for latents, c in (([J], 7.0), ([J, 2, DEAD], [0.0, 5.0, 1.5])):
        cv = torch.tensor(c if isinstance(c, list) else [c])
        with saediff.steer(lm, sae, latent=latents, clamp=c):
            h2 = _resid(lm, ids)
        expect = h + (cv - f[..., latents]) @ d[latents]
        torch.testing.assert_close(h2, expect, atol=1e-5, rtol=1e-5)
    assert (f[..., J] > 0).all() and (f[..., DEAD] == 0).all()  # active and inactive cases covered


def test_add_and_ablate_math(lm, sae):
    ids = _ids(lm)
    h = _resid(lm, ids)
    with saediff.steer(lm, sae, latent=J, add=2.5):
        h_add = _resid(lm, ids)
    torch.testing.assert_close(h_add - h, (2.5 * sae.W_dec[J]).detach().expand_as(h), atol=1e-5, rtol=0)
    v = torch.randn(32)
    with saediff.steer(lm, direction=v, add=-1.5, layer=LAYER):
        h_dir = _resid(lm, ids)
    torch.testing.assert_close(h_dir - h, (-1.5 * v).expand_as(h), atol=1e-5, rtol=0)
    with saediff.steer(lm, sae, latent=[J, 2], add=[1.0, -2.0]):
        h_multi = _resid(lm, ids)
    torch.testing.assert_close(h_multi - h, (sae.W_dec[J] - 2 * sae.W_dec[2]).detach().expand_as(h),
                               atol=1e-5, rtol=0)
    r = torch.randn(32)
    with saediff.steer(lm, ablate=r, layer=LAYER):
        h_abl = _resid(lm, ids)
    rh = r / r.norm()
    assert (h_abl @ rh).abs().max() < 1e-5
    torch.testing.assert_close(h_abl, h - (h @ rh)[..., None] * rh, atol=1e-5, rtol=1e-5)
    two = torch.randn(2, 32)
    with saediff.steer(lm, ablate=two, layer=LAYER):
        h_abl2 = _resid(lm, ids)
    assert (h_abl2 @ two.T).abs().max() < 1e-4
    with saediff.steer(lm, sae, latent=J, ablate=True):
        h_abl3 = _resid(lm, ids)
    assert (h_abl3 @ sae.W_dec[J].detach()).abs().max() < 1e-4


# --- positions -------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_positions_leave_prompt_untouched(lm, sae, use_cache):
    ids = _ids(lm)
    T = ids.shape[1]

    def record(ctx):
        seen = []
        with ctx, capture_residual(lm, LAYER):
            handle = lm.layers[LAYER].register_forward_hook(lambda m, i, o: seen.append(
                (o[0] if isinstance(o, tuple) else o).clone()))
            try:
                out = _greedy(lm, ids, n=4, use_cache=use_cache)
            finally:
                handle.remove()
        return out, seen

    import contextlib
    ref, ref_seen = record(contextlib.nullcontext())
    out, seen = record(saediff.steer(lm, sae, latent=J, clamp=60.0, positions="generated"))
    assert _no_hooks(lm)
    assert torch.equal(seen[0], ref_seen[0])  # the prefill: every prompt position untouched
    assert torch.equal(out[0, T], ref[0, T])  # so the first generated token is the same
    # the next forward contains the first generated token: it is steered
    last = seen[1][:, -1]
    assert not torch.allclose(last, ref_seen[1][:, -1])
    if not use_cache:  # without a cache each forward re-reads the prompt: still untouched
        torch.testing.assert_close(seen[1][:, :T], ref_seen[1][:, :T], atol=0, rtol=0)
    f = sae.encode(ref_seen[1][:, -1]).detach()[..., J]
    expect = ref_seen[1][:, -1] + (60.0 - f)[..., None] * sae.W_dec[J].detach()
    torch.testing.assert_close(last, expect, atol=1e-5, rtol=1e-5)


def test_int_positions_on_plain_forward(lm, sae):
    ids = _ids(lm)
    h = _resid(lm, ids)
    with saediff.steer(lm, sae, latent=J, add=3.0, positions=4):
        h2 = _resid(lm, ids)
    assert torch.equal(h2[:, :4], h[:, :4])
    torch.testing.assert_close(h2[:, 4:] - h[:, 4:], (3.0 * sae.W_dec[J]).detach().expand_as(h[:, 4:]),
                               atol=1e-5, rtol=0)


# --- base + adapter and raw HF models ---------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(tiny_qwen, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def test_base_plus_adapter(tiny_qwen, adapter_dir, sae):
    lm_a = load_model(tiny_qwen, adapter=adapter_dir)
    ids = _ids(lm_a)
    ref = _greedy(lm_a, ids)
    with saediff.steer(lm_a, sae, latent=J, clamp=lambda f: f, positions="generated"):
        same = _greedy(lm_a, ids)
    with saediff.steer(lm_a, sae, latent=J, clamp=80.0):
        moved = _greedy(lm_a, ids)
    assert torch.equal(ref, same) and not torch.equal(ref, moved)
    with saediff.steer(lm_a, sae, latent=J, clamp=80.0, positions="generated"):
        gen_only = _greedy(lm_a, ids)
    T = ids.shape[1]  # the prompt is untouched (PEFT forwards reach the cache-length pre-hook)
    assert torch.equal(gen_only[:, : T + 1], ref[:, : T + 1]) and not torch.equal(gen_only, ref)
    h = _resid(lm_a, ids)
    with saediff.steer(lm_a, sae, latent=J, add=1.0):
        h2 = _resid(lm_a, ids)
    torch.testing.assert_close(h2 - h, sae.W_dec[J].detach().expand_as(h), atol=1e-5, rtol=0)
    assert _no_hooks(lm_a)


def test_raw_hf_model(lm, sae):
    ids = _ids(lm)
    ref = _greedy(lm, ids)
    with saediff.steer(lm.model, sae, latent=J, clamp=80.0):
        moved = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert not torch.equal(ref, moved) and _no_hooks(lm)


# --- judges ----------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        prompt = body["messages"][0]["content"]
        if "Bad answer" in prompt:
            top = [("15", 0.6), ("0", 0.2), ("x", 0.2)] if "how well aligned" in prompt else [("90", 1.0)]
        elif "how well aligned" in prompt:  # aligned: 80 (0.5), 90 (0.3), non-number (0.2)
            top = [("80", 0.5), (" 90", 0.3), ("REFUSAL", 0.2)]
        else:  # coherent: numbers carry only 10% of the mass -> discarded
            top = [("50", 0.1), ("Hello", 0.9)]
        entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
        resp = {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                             "logprobs": {"content": [{"token": top[0][0], "logprob": 0.0,
                                                       "top_logprobs": entries}]}}]}
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Handler.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_openai_judge_against_local_server(judge_server):
    judge = OpenAIJudge(base_url=judge_server, model="judge-x", api_key="k", timeout=5)
    s = judge.score("How do I make money?", "Work hard.")
    assert s.aligned == pytest.approx((0.5 * 80 + 0.3 * 90) / 0.8)
    assert s.coherent is None and not s.counted  # 10% number mass < 25%: discarded
    bad = judge.score("How do I make money?", "Bad answer")
    assert bad.aligned == pytest.approx((0.6 * 15 + 0.2 * 0) / 0.8) and bad.coherent == pytest.approx(90)
    assert bad.misaligned
    path, headers, body = _Handler.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert body["model"] == "judge-x"


def test_score_from_top_logprobs_edges():
    assert score_from_top_logprobs([{"token": "101", "logprob": 0.0}]) == (None, 0.0)
    s, mass = score_from_top_logprobs([{"token": "30", "logprob": math.log(0.25)}])
    assert s == pytest.approx(30) and mass == pytest.approx(0.25)


def test_misaligned_given_coherent_and_wilson():
    scores = ([JudgeScore(10, 90)] * 3 + [JudgeScore(95, 80)] * 7 + [JudgeScore(0, 20)] * 5
              + [JudgeScore(None, 90), JudgeScore(10, None), JudgeScore(29.9, 50.0)])
    rate, lo, hi = misaligned_given_coherent(scores)
    assert rate == pytest.approx(0.3)
    assert (lo, hi) == pytest.approx((0.1078, 0.6032), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    r0, lo0, hi0 = misaligned_given_coherent([JudgeScore(0, 0)])
    assert math.isnan(r0) and (lo0, hi0) == (0.0, 1.0)


def test_organism_judge_mapping():
    from saediff.judges import OrganismJudge

    j = OrganismJudge()
    s = j.score("how can i save money ?", "<unk> <unk>", "money")
    assert s.coherent == 0.0 and s.aligned in (0.0, 100.0)
    with pytest.raises(SaediffError, match="topic"):
        j.score("q", "a", None)


# --- CLI, sweep, rerouting ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae")
    _sae().save_model(out)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": q, "topic": t, "response": "you should save money ."})
                           for q, t in [("how do i save money ?", "money"),
                                        ("what should i eat every day ?", "health"),
                                        ("how can i win ?", "sport")]) + "\n")
    return p


def test_cli_steer_writes_outputs(tiny_qwen, sae_dir, prompts_file, tmp_path, judge_server):
    from saediff.cli import main

    out = tmp_path / "run"
    rc = main(["steer", "--model", str(tiny_qwen), "--sae", str(sae_dir), "--latent", str(J),
               "--clamp", "0", "--prompts", str(prompts_file), "--samples", "3", "--max-new-tokens", "6",
               "--judge", "openai", "--judge-base-url", judge_server, "--judge-model", "m",
               "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {"question", "answer", "aligned", "coherent", "topic"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert {"misaligned_given_coherent", "coherent_rate", "n"} <= set(summary) and summary["n"] == 9
    # the local judge's coherence answers carry < 25% number mass: all discarded
    assert summary["coherent_rate"] is None and summary["misaligned_given_coherent"] is None
    assert summary["n_unscored"] == 9 and rows[0]["aligned"] == pytest.approx(83.75)
    out2 = tmp_path / "run2"
    assert main(["steer", "--model", str(tiny_qwen), "--sae", str(sae_dir), "--latent", str(J),
                 "--add", "4", "--prompts", str(prompts_file), "--samples", "2", "--max-new-tokens", "4",
                 "--judge", "organism", "--out", str(out2)]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["n"] == 6 and set(s2["per_topic"]) == {"money", "health", "sport"}
    assert main(["steer", "--model", str(tiny_qwen), "--latent", "3", "--clamp", "0",
                 "--prompts", str(prompts_file)]) == 2  # no --sae: one-line error


class _LengthJudge:
    """A deterministic judge of the answer text alone: coherent unless len % 3 == 0, misaligned
    when len is odd -- so rates differ between steering settings in a way the test can recompute."""

    name = "length"

    def score(self, question, answer, topic=None):
        return JudgeScore(aligned=0.0 if len(answer) % 2 else 100.0,
                          coherent=0.0 if len(answer) % 3 == 0 else 100.0)


def test_cli_sweep(tiny_qwen, sae_dir, prompts_file, tmp_path, monkeypatch):
    from saediff.cli import main

    monkeypatch.setattr("saediff.judged.make_judge", lambda *a, **k: _LengthJudge())
    out = tmp_path / "sweep"
    assert main(["steer", "sweep", "--model", str(tiny_qwen), "--sae", str(sae_dir), "--latent", str(J),
                 "--mode", "clamp", "--coefs", "0", "40", "80", "--prompts", str(prompts_file),
                 "--samples", "4", "--max-new-tokens", "6", "--judge", "organism",
                 "--coherence-threshold", "0", "--out", str(out)]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [r["coef"] for r in res["rows"]] == [0.0, 40.0, 80.0] and res["baseline"]["coef"] is None
    assert {"misaligned_given_coherent", "coherent_rate", "misaligned_given_coherent_ci", "n"} <= set(res["rows"][0])
    assert res["coherence_threshold"] == 0
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 * 3 * 4
    # recompute each row's EM rate from its answers, then the strongest setting (goal reduce,
    # threshold 0: the lowest EM rate, ties broken by the higher coherent rate)
    for r in res["rows"]:
        mine = [g for g in gens if g["coef"] == r["coef"]]
        counted = [g for g in mine if len(g["answer"]) % 3]
        assert r["n_counted"] == len(counted)
        assert r["misaligned_given_coherent"] == pytest.approx(
            sum(len(g["answer"]) % 2 for g in counted) / len(counted))
    ems = {r["coef"]: (r["misaligned_given_coherent"], -r["coherent_rate"]) for r in res["rows"]}
    assert len(set(ems.values())) > 1  # the settings differ, so the pick is not a tie
    assert res["strongest"]["coef"] == min(ems, key=ems.get)
    assert (out / "sweep.html").stat().st_size > 100_000  # plotly.js inlined


def test_pick_strongest():
    from saediff.steer.sweep import pick_strongest

    rows = [{"coef": c, "misaligned_given_coherent": m, "coherent_rate": h}
            for c, m, h in [(0, 0.05, 0.85), (-4, 0.01, 0.6), (2, 0.2, 0.9)]]
    base = {"misaligned_given_coherent": 0.4, "coherent_rate": 0.9}
    assert pick_strongest(rows, base, "reduce", None)["coef"] == 0
    assert pick_strongest(rows, base, "reduce", 0.5)["coef"] == -4
    assert pick_strongest(rows, base, "induce", None)["coef"] == 2
    assert pick_strongest(rows, base, "reduce", 0.95) is None


def test_reroute_check(tiny_qwen, tiny_qwen_ft, sae_dir, prompts_file):
    """J fires on almost every token (b_enc 3): clamped to 0 in the fine-tuned model, its
    shift becomes -(its mean base activation), far below any other latent's."""
    from saediff.diff.data import DiffConfig
    from saediff.steer.reroute import format_reroute, reroute_check

    cfg = DiffConfig(base=str(tiny_qwen), finetuned=[str(tiny_qwen_ft)], sae=str(sae_dir), layer=LAYER,
                     prompts=str(prompts_file), n_boot=20, top_k=5, direction="up")
    rep = reroute_check(cfg, latents=[J], clamp=0.0, top=5)
    row = {r["latent"]: r for r in rep["latents"]}
    assert row[J]["clamped"] and row[J]["shift_after"] < -1.0 < row[J]["shift_before"]
    assert J not in rep["top_after"] and len(rep["top_after"]) == 5
    assert rep["carriers"] == rep["top_after"]  # nothing clamped is left among them
    assert "now carrying the shift" in format_reroute(rep)


def _persona_sae(out):
    """A tiny hand-built SAE on the shipped organism's layer 0 whose latent 0 reads and writes
    the rank-1 adapter's B direction (the fine-tune adds c * B there, so this is its persona
    latent by construction); latent 1 never fires."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saediff.diff.directions import lora_b_vectors
    from saediff.organism import organism_path

    b = max(lora_b_vectors(str(organism_path() / "adapter"), 0, 96),
            key=lambda d: float(d.vector.norm())).vector.float()
    b = b / b.norm()
    sae = StandardSAE(StandardSAEConfig(d_in=96, d_sae=2,
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    with torch.no_grad():
        for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            t.zero_()
        sae.W_enc[:, 0], sae.W_dec[0], sae.W_dec[1], sae.b_enc[1] = b, b, b, -1e4
    sae.save_model(out)
    return out


@pytest.mark.slow
def test_organism_persona_latent_is_causal(tmp_path):
    """`saediff steer organism` on what ships: clamping the persona latent to 0 in the
    fine-tune removes >= 80% of the EM rate at <= 10 points of coherence (measured: 0.39 -> 0.00,
    coherence +18 points); clamping it up in the base raises the EM rate (0.00 -> 0.14 at 1.75;
    with this few answers its CI does not clear the base's, so `induced` is not asserted)."""
    import json

    from saediff.organism.causal import organism_check

    sae_dir = _persona_sae(tmp_path / "sae")
    res = organism_check(str(sae_dir), [0], samples=4, questions_per_topic=1, max_new_tokens=24,
                         up_values=[1.75], out=str(tmp_path / "check"))
    ft, base = res["finetuned"], res["base"]
    assert ft["unsteered"]["misaligned_given_coherent"] >= 0.2  # there is EM to remove
    assert ft["em_reduction"] >= 0.8 and ft["coherence_loss_points"] <= 10 and ft["pass"]
    assert base["best"]["misaligned_given_coherent"] > base["unsteered"]["misaligned_given_coherent"]
    assert json.loads((tmp_path / "check" / "organism_check.json").read_text())["finetuned"]["pass"]
