"""GGUF in, HF out: a tiny Llama written to GGUF by the `gguf` package round-trips exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from saediff.errors import SaediffError  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("o", "n"), ("e", "r")]
N_HEAD, N_KV, D, LAYERS = 4, 2, 32, 2


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (interleaved rotary halves); transformers reverses it on load."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def _byte_vocab() -> tuple[list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 control, 1 normal
    return tokens, types


def write_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """A random tiny LlamaForCausalLM written as an all-F32 GGUF; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, types = _byte_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=D, intermediate_size=64,
                      num_hidden_layers=LAYERS, num_attention_heads=N_HEAD,
                      num_key_value_heads=N_KV, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_embedding_length(D)
    w.add_rope_dimension_count(D // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        for hf, gg in per_block.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, N_HEAD)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, N_KV)
        w.add_tensor(gg, t.numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_import_round_trip_exact(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saediff.gguf import import_gguf
    from saediff.models import encode_chat, load_model

    path, ref = tiny_gguf
    out = import_gguf(path, tmp_path / "hf")
    assert out == tmp_path / "hf" and not (tmp_path / "hf.tmp").exists()
    assert "quantization_config" not in (out / "config.json").read_text()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the then other", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:1] == ["the"]  # the merges came through
    assert tok.get_vocab()["<|im_end|>"] == 2 and tok.chat_template
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, ref(input_ids=x).logits)
    lm = load_model(out)
    chat_ids, roles = encode_chat(lm.tokenizer, "the other", "then the")
    assert chat_ids[0] == 1 and 2 in chat_ids and 2 in roles  # ChatML scaffolding + response role
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=torch.tensor([chat_ids])).logits,
                           ref(input_ids=torch.tensor([chat_ids])).logits)


def test_load_model_gguf_and_peft_and_bridge(tiny_gguf, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from saediff.models import load_model

    monkeypatch.setenv("SAEDIFF_HOME", str(tmp_path / "home"))
    path, ref = tiny_gguf
    lm = load_model(str(path))  # imported once into $SAEDIFF_HOME/gguf/
    cached = list((tmp_path / "home" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    x = torch.tensor([[5, 9, 40, 2]])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=x).logits, ref(input_ids=x).logits)
    assert lm.tokenizer.pad_token_id is not None

    peft = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["down_proj"]))
    torch.nn.init.normal_(peft.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight)
    peft.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        want = peft(input_ids=x).logits
    lm2 = load_model(str(path), adapter=tmp_path / "ad")
    with torch.no_grad():
        got = lm2.model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, ref(input_ids=x).logits)

    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(cached[0]), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(bridge(x), ref(input_ids=x).logits, atol=1e-4)


def test_bad_inputs(tmp_path):
    from saediff.gguf import import_gguf
    from saediff.models import load_model

    with pytest.raises(SaediffError, match="no such GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(SaediffError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_missing_gguf_package_is_one_line(monkeypatch, tmp_path):
    import builtins

    from saediff.gguf import require_gguf

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(SaediffError, match=r'pip install -e "\.\[real\]"'):
        require_gguf()


def test_cli_models_import(tiny_gguf, tmp_path, capsys):
    from saediff.cli import main

    path, _ = tiny_gguf
    assert main(["models", "import", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and "imported" in capsys.readouterr().out
    assert main(["models", "import", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no such GGUF file" in err and len(err.strip().splitlines()) == 1
