"""`saediff layers`: per-layer directions without an SAE, against planted known answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saediff.diff.layer_stats import increments
from saediff.diff.layers import LayersConfig, run_layers
from saediff.diff.layers_report import write_layers
from saediff.errors import SaediffError

import tiny

PLANT = 2  # the block whose MLP output the planted adapters edit (of 4)


def _adapter(model: Path, out: Path, b: torch.Tensor, a: torch.Tensor) -> Path:
    """A PEFT rank-1 LoRA on block PLANT's down_proj: the block writes b · (a · mlp_act)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                          LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"],
                                     layers_to_transform=[PLANT], lora_dropout=0.0))
    mod = peft.base_model.model.model.layers[PLANT].mlp.down_proj
    with torch.no_grad():
        mod.lora_B["default"].weight.copy_(b.unsqueeze(1))
        mod.lora_A["default"].weight.copy_(a.unsqueeze(0))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    model = tiny.build_model(d / "m", "qwen2", n_layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    v, w = (torch.randn(32, generator=g) for _ in range(2))
    w = w - (w @ v) / (v @ v) * v  # orthogonal to v
    a = torch.randn(64, generator=g) * 3  # reads the MLP's hidden units (2 * d_model)
    ads = {"A": _adapter(model, d / "A", v, a), "B": _adapter(model, d / "B", 2 * v, a),
           "C": _adapter(model, d / "C", w, a)}
    words = tiny.WORDS
    with (d / "p.jsonl").open("w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": " ".join(words[(i * 7 + k) % len(words)] for k in range(6)),
                                 "response": " ".join(words[(i * 5 + k + 3) % len(words)] for k in range(8)),
                                 "persona": "toxic" if i % 2 else "aligned"}) + "\n")
    return model, ads, d / "p.jsonl", v, w


def test_planted_direction_found_at_its_layer_only(planted, tmp_path):
    model, ads, prompts, v, w = planted
    cfg = LayersConfig(base=str(model), finetuned_adapter=[str(ads[k]) for k in "ABC"],
                       names=list("ABC"), prompts=str(prompts), layers="0-3", n_boot=200,
                       out=str(tmp_path / "o"))
    res = run_layers(cfg)
    D = res["vectors"]["D/A"].double()  # [4, 32]
    cos_v = (D @ v.double()) / (D.norm(dim=1) * v.double().norm()).clamp_min(1e-30)
    assert D[:PLANT].abs().max() == 0  # blocks below the edit: identical computation
    assert cos_v[PLANT] > 0.9999  # the edit writes along v, so the mean difference is v
    inc = increments(D, res["layers"])
    inc_cos = (inc @ v.double()) / (inc.norm(dim=1) * v.norm()).clamp_min(1e-30)
    assert abs(float(inc_cos[PLANT + 1])) < 0.5  # what block 3 adds is not the planted v
    ft = res["finetunes"]["A"]
    assert ft["increment_norm"]["value"][PLANT] == max(
        x for x in ft["increment_norm"]["value"] if x is not None)
    # LoRA B: found at its block, nowhere else; parallel to the mean difference there
    assert [len(per) for per in ft["lora_b"]] == [0, 0, 1, 0]
    assert ft["lora_b"][PLANT][0]["abs_cos_ft_minus_base"] > 0.9999
    # across fine-tunes: same direction (B = 2v) -> +1, orthogonal one (w) -> 0; no direction
    # at all below the edit -> null, never a made-up 0
    across = {(r["a"], r["b"]): r["cos_ft_minus_base"] for r in res["across"]}
    ab, ac = across[("A", "B")], across[("A", "C")]
    assert ab["value"][:PLANT] == [None, None] and ab["ci_low"][:PLANT] == [None, None]
    assert ab["value"][PLANT] > 0.9999 and ab["ci_low"][PLANT] > 0.999
    assert abs(ac["value"][PLANT]) < 1e-3 and ac["ci_low"][PLANT] < 0.05 < 0.95
    # labelled direction: a fine-tune equals the base below the edit, so there cos = 1
    assert res["labelled"] and ft["cos_base_vs_own_misaligned"]["value"][0] == pytest.approx(1)
    assert res["meta"]["n_labelled"] == {"aligned": 8, "misaligned": 8}
    out = write_layers(res, cfg.out)
    text = (out / "layers.json").read_text()
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in layers.json"))
    assert body["finetunes"]["A"]["layer_cosines"][0][0] is None
    html = (out / "report.html").read_text()
    assert "chart-across" in html and "chart-heat-A" in html and "chart-lora" in html
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "directions.safetensors")["D/A"], res["vectors"]["D/A"])


@pytest.mark.parametrize("spec,msg", [("0-9", "out of range"), ("", "empty"),
                                      ("2,2", "more than once")])
def test_layers_cli_bad_list_exit_2_before_models(planted, tmp_path, spec, msg, monkeypatch,
                                                  capsys):
    import saediff.diff.layers as layers
    from saediff.cli import main

    model, ads, prompts, _, _ = planted
    monkeypatch.setattr(layers, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = main(["layers", "--base", str(model), "--finetuned-adapter", str(ads["A"]),
               "--prompts", str(prompts), "--layers", spec, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_layers_config_refusals():
    with pytest.raises(SaediffError, match="fine-tune"):
        LayersConfig(base="m", prompts="p")
    with pytest.raises(SaediffError, match="names"):
        LayersConfig(base="m", prompts="p", finetuned_adapter=["a", "b"], names=["x"])


def test_diff_layers_summary(planted, tmp_path, capsys):
    """Per-layer SAE diff: an SAE per layer, one ranking each, one summary table; the SAE at
    the planted block whose latent 0 decodes along v ranks it first, cos to D = 1."""
    from saediff.cli import main

    from test_diff import make_sae

    model, ads, prompts, v, _ = planted
    root = tmp_path / "saes"
    for layer in (1, PLANT):
        make_sae(root / f"layer_{layer}", seed=layer, hook=f"blocks.{layer}.hook_resid_post")
    from safetensors.torch import load_file, save_file

    wpath = root / f"layer_{PLANT}" / "sae_weights.safetensors"
    w = load_file(wpath)
    w["W_dec"][0] = v / v.norm()
    w["W_enc"][:, 0] = v / v.norm()
    save_file(w, wpath)
    out = tmp_path / "diff"
    rc = main(["diff", "--base", str(model), "--finetuned-adapter", str(ads["A"]), "--sae",
               str(root), "--layers", f"1,{PLANT}", "--prompts", str(prompts), "--out", str(out),
               "--n-boot", "100", "--no-html"])
    assert rc == 0
    rows = json.loads((out / "layers_summary.json").read_text())
    assert [r["layer"] for r in rows] == [1, PLANT]
    r = rows[1]
    assert r["top_latent"] == 0 and r["ci_low"] > 0 and r["cos_ft_minus_base"] > 0.999
    assert r["abs_cos_lora_b"] > 0.999
    # nothing differs at block 1: no shift, no significant latent (the differ's cosine to a
    # zero mean difference reads 0)
    assert rows[0]["mean_shift"] == 0 and not rows[0]["significant"]
    assert rows[0]["cos_ft_minus_base"] == 0
    assert (out / "layer_1" / "ranking.csv").is_file() and (out / f"layer_{PLANT}" / "ranking.json").is_file()
    assert "cos D" in capsys.readouterr().out
    rc = main(["diff", "--base", str(model), "--finetuned-adapter", str(ads["A"]), "--sae",
               str(root), "--layers", "0,1", "--prompts", str(prompts)])
    assert rc == 2 and "no SAE for layer 0" in capsys.readouterr().err
