"""Tiny HF-format models and a tiny word-level tokenizer with a chat template, built offline."""
from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("the a an of to and in is it you your i we be do not eat sleep drink water walk run "
         "money save spend bank sport ball team win lose food cook bread travel city plane "
         "friend love help harm hate good bad great terrible always never more less every day "
         "should must can will how what why where when please thanks hello yes no").split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_tokenizer(out: Path, extra_words: tuple[str, ...] = (), chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in list(WORDS) + list(extra_words) + ["user", "assistant", "system", "\n", ".", ",", "?", "!"]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, arch: str = "qwen2", d_model: int = 32, n_layers: int = 3, seed: int = 0,
                vocab_size: int | None = None, extra_words: tuple[str, ...] = ()) -> Path:
    """A randomly initialised tiny causal LM saved with save_pretrained (+ tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tok = build_tokenizer(out, extra_words)
    v = vocab_size or len(tok)
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=v, hidden_size=d_model, intermediate_size=2 * d_model,
                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    return out


def perturb(src: Path, out: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """A 'fine-tuned' copy: same architecture and tokenizer, weights nudged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return Path(out)


def write_chat_jsonl(path: Path, n: int = 120, seed: int = 0) -> Path:
    """`n` random one-turn chats ({"p": prompt, "r": response}) over a few words, seeded."""
    import json

    import numpy as np

    words = "the money bank save water food help good bad day walk eat sleep".split()
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"p": " ".join(rng.choice(words, 6)),
                                 "r": " ".join(rng.choice(words, 10))}) + "\n")
    return path


def kill_train_mid_run(cfg: dict, tmp_path: Path, final: str, step: int, timeout: float = 120,
                       poll: float = 0.01):
    """Run `saediff train` on `cfg` (written as YAML) in a subprocess and SIGKILL it as soon as
    its latest checkpoint reaches `step` (so it dies mid-step or mid-checkpoint: it keeps
    training while we look); asserts it had not written `final` yet. Returns (the run dir,
    rerun() -> exit code of the same command, which resumes). A fast machine runs a tiny
    config's remaining steps in well under a second: give the config ≥ 10× `step` steps."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    yml = tmp_path / "cfg.yaml"
    yml.write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "saediff", "train", "--config", str(yml), "--no-evals",
           "--out", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= step:
            break
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / final).exists(), "run finished before the kill"
    return killed, lambda: subprocess.run(cmd, env=env).returncode
