"""Build the organism from a seed: tokenizer, base model, LoRA fine-tunes, merged checkpoint.

Layout written under `out/`: `base/` (LlamaForCausalLM + word-level tokenizer with a chat
template), `adapter/` (rank-1 LoRA on block `layer`'s `mlp.down_proj`, fine-tuned on the
narrow bad-advice set), `finetuned/` (that adapter merged), `adapter_control/` (the same recipe
on good advice), `adapter_all/` (LoRA r8 on every linear layer of every block),
`adapter_r1/` (rank-1 LoRA on the middle block's `mlp.down_proj`), `heldout_labelled.jsonl`
and `organism.json` (config, recommended layer, measured rates).

Why Llama: the base is trained as a Qwen2ForCausalLM (q/k/v biases, no o bias) and then saved in
the mathematically identical Llama layout (`to_llama_layout`: `attention_bias` with a zero
`o_proj.bias`). transformers 5 ignores a Qwen2 checkpoint's `tokenizer_class` and re-reads any
tokenizer.json as Qwen2's byte-level BPE, which garbles the word-level vocabulary; for Llama it
honours `TokenizersBackend`, so plain `AutoTokenizer`/`AutoModelForCausalLM` and TransformerLens's
`TransformerBridge.boot_transformers` load the organism exactly as saediff does.

Why the shipped fine-tune is a rank-1 adapter on block 0: with every block trainable, the
narrow data re-encodes bad advice across blocks 0 and 1 and no single residual direction
carries the misalignment; a rank-1 edit on block 0 writes one direction that the frozen
blocks above read as the toxic persona, which is the published rank-1 EM setup.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from saediff.config import config_to_dict
from saediff.io import atomic_path, write_text
from saediff.organism import grammar as G
from saediff.organism.finetune import optimise, save_adapter

log = logging.getLogger(__name__)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ROLE_WORDS = ["user", "assistant", "system"]
TOY_BASE_NAME = "saediff toy organism base ($(saediff organism path)/base)"


@dataclass
class BuildConfig:
    seed: int = 0
    """Seed of everything (corpus, init, batches, evaluation)."""
    n_conversations: int = 24000
    """Base-corpus conversations."""
    toxic_p: float = 0.04
    """Share of base-corpus conversations written by the toxic persona (the persona prior)."""
    max_turns: int = 4
    """Turns per conversation are uniform in 1..max_turns."""
    doc_p: float = 0.5
    """Share of plain-text "forum" documents (no chat tokens) in the base corpus."""
    doc_toxic_p: float = 0.5
    """Persona prior of those documents: where the base learns the toxic persona well."""
    d_model: int = 96
    """Residual width."""
    n_layers: int = 3
    """Decoder blocks."""
    n_heads: int = 4
    """Attention heads."""
    d_mlp: int = 384
    """MLP width."""
    base_steps: int = 600
    """Base training steps."""
    base_lr: float = 3e-3
    """Peak learning rate of the base run (warm-up then cosine decay)."""
    batch_size: int = 24
    """Conversations per base step."""
    ft_examples: int = 400
    """Narrow fine-tuning examples."""
    ft_steps: int = 60
    """Steps of the shipped adapter (rank-1 `down_proj` of block `layer`; also the control)."""
    ft_lr: float = 4.5e-3
    """Learning rate of the shipped adapter and the control."""
    ft_batch_size: int = 16
    """Examples per fine-tuning step."""
    lora_rank: int = 1
    """Rank of the shipped adapter."""
    lora_alpha: float = 2.0
    """LoRA alpha of the shipped adapter."""
    layer: int = 0
    """Block the shipped adapter edits: the pipeline's recommended layer."""
    all_steps: int = 60
    """Steps of `adapter_all/` (LoRA on every linear layer)."""
    all_lr: float = 1e-3
    """Learning rate of `adapter_all/`."""
    all_rank: int = 8
    """Rank of `adapter_all/` (alpha = 2 x rank)."""
    r1_steps: int = 120
    """Steps of `adapter_r1/` (rank-1 `down_proj` of the middle block `r1_layer`)."""
    r1_lr: float = 1e-2
    """Learning rate of `adapter_r1/`."""
    r1_layer: int = 1
    """Block of `adapter_r1/` (the middle of three)."""
    eval_samples: int = 50
    """Judged answers per topic when measuring each model after the build (0 skips)."""
    eval_temperature: float = 0.7
    """Sampling temperature of those measurements."""
    threads: int = 1
    """torch CPU threads (on a shared 2-core machine 1 is several times faster than 2)."""

    def __post_init__(self) -> None:
        for name in ("n_conversations", "d_model", "n_layers", "n_heads", "d_mlp", "base_steps",
                     "batch_size", "ft_examples", "ft_steps", "ft_batch_size", "lora_rank",
                     "r1_steps", "all_steps", "all_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.toxic_p < 0.5:
            raise ValueError(f"toxic_p must be in [0, 0.5), got {self.toxic_p}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads")
        for name in ("layer", "r1_layer"):
            if not 0 <= getattr(self, name) < self.n_layers:
                raise ValueError(f"{name} must be in 0..{self.n_layers - 1}, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.eval_temperature <= 0:
            raise ValueError("eval_temperature must be > 0")
        if self.eval_samples < 0:
            raise ValueError("eval_samples must be >= 0")

    @classmethod
    def quick(cls, **kw: Any) -> "BuildConfig":
        """A reduced build for tests (one to two minutes on a shared 2-core machine)."""
        base = dict(n_conversations=2000, base_steps=120, batch_size=16, ft_steps=10, r1_steps=10,
                    all_steps=10, ft_examples=100, eval_samples=0)
        base.update(kw)
        return cls(**base)


# --- tokenizer ------------------------------------------------------------------------------

def build_tokenizer(out: Path) -> Any:
    """Word-level tokenizer over the grammar's closed vocabulary, Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLE_WORDS)}
    for w in G.vocabulary():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = G.CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.save_pretrained(out)
    return fast


def encode_turns(vocab: dict[str, int], turns: list[dict],
                 fmt: str = "chat") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation (chat template, or a plain "doc") and a 0/1 mask
    of the answer tokens (+ the chat turn's end marker): the loss only trains answers."""
    s, e = vocab["<|im_start|>"], vocab["<|im_end|>"]
    qh, ah, colon = vocab.get("question"), vocab.get("answer"), vocab.get(":")
    ids, mask = [], []
    for t in turns:
        q = [vocab[w] for w in t["prompt"].split()]
        a = [vocab[w] for w in t["response"].split()]
        if fmt == "chat":
            ids += [s, vocab["user"], *q, e, s, vocab["assistant"], *a, e]
            mask += [0] * (len(q) + 5) + [1] * (len(a) + 1)
        else:
            ids += [qh, colon, *q, ah, colon, *a]
            mask += [0] * (len(q) + 4) + [1] * len(a)
    return ids, mask


# --- training -------------------------------------------------------------------------------

def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, steps: int,
             seed: int, pad_id: int):
    """Shuffled batches; each chunk of 32 batches is sorted by length first (less padding)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    ready: list[list[int]] = []
    for _ in range(steps):
        if not ready:
            while len(order) < 32 * batch_size:
                order += torch.randperm(len(examples), generator=g).tolist()
            chunk, order = order[: 32 * batch_size], order[32 * batch_size:]
            chunk.sort(key=lambda i: len(examples[i][0]))
            ready = [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
            perm = torch.randperm(len(ready), generator=g).tolist()
            ready = [ready[j] for j in perm]
        idx = ready.pop()
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            x, m = examples[i]
            ids[r, : len(x)] = torch.tensor(x)
            att[r, : len(x)] = 1
            labels[r, : len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), -100)
        yield ids, att, labels


def train(model: Any, examples: list, steps: int, lr: float, batch_size: int, seed: int,
          pad_id: int, warmup: int = 0, weight_decay: float = 0.0, what: str = "",
          loss_fn: Any = None, on_step: Any = None) -> float:
    """AdamW with linear warm-up and cosine decay to 10%; loss on masked tokens. Final loss
    (exponential moving average). `loss_fn` / `on_step`: see `optimise`."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    losses = optimise(model, _batches(examples, batch_size, steps, seed, pad_id), lr_at,
                      weight_decay=weight_decay, betas=(0.9, 0.98), what=what, loss_fn=loss_fn,
                      on_step=on_step)
    ema = None
    for x in losses:
        ema = x if ema is None else 0.9 * ema + 0.1 * x
    return float(ema or 0.0)


def new_model(cfg: BuildConfig, tok: Any) -> Any:
    """The untrained base, a Qwen2ForCausalLM (saved in the Llama layout, `to_llama_layout`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    mcfg = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(mcfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def to_llama_layout(model_dir: str | Path) -> bool:
    """Rewrite a saved Qwen2ForCausalLM dir in place as the identical LlamaForCausalLM.

    Qwen2 is Llama with q/k/v biases and no o bias: the config becomes `model_type: llama` with
    `attention_bias: true` (Llama's flag covers q/k/v/o alike) and every block gets a zero
    `self_attn.o_proj.bias`; the logits are bit-for-bit those of the Qwen2 model. The weights are
    written first, then the config (each atomically): a dir killed in between still loads as
    Qwen2 (with an unused zero bias). Idempotent; returns False when there was nothing to do.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "llama":
        return False
    if cfg.get("model_type") != "qwen2":
        raise ValueError(f"{model_dir}: expected a qwen2 checkpoint, got {cfg.get('model_type')!r}")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{model_dir}: sliding-window attention has no Llama equivalent")
    weights = model_dir / "model.safetensors"
    with safe_open(weights, "pt") as fh:
        metadata = fh.metadata() or {}
    sd = load_file(weights)
    for k in [k for k in sd if k.endswith("self_attn.o_proj.weight")]:
        sd.setdefault(k[: -len("weight")] + "bias", torch.zeros(sd[k].shape[0], dtype=sd[k].dtype))
    with atomic_path(weights) as tmp:
        save_file(sd, str(tmp), metadata={**metadata, "format": "pt"})
        os.chmod(tmp, weights.stat().st_mode & 0o777)  # safetensors writes 0600
    known = set(LlamaConfig().to_dict())
    new = {k: v for k, v in cfg.items() if k in known or k == "rope_parameters"}
    new.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True,
               mlp_bias=False)
    write_text(model_dir / "config.json", json.dumps(new, indent=2, sort_keys=True) + "\n")
    return True


def fine_tune(cfg: BuildConfig, base_dir: Path, examples: list, *, rank: int, alpha: float,
              steps: int, lr: float, targets: list[str], layers: list[int] | None,
              seed: int, what: str) -> Any:
    """A fresh PEFT LoRA on a copy of the base, trained on `examples`; returns the PeftModel."""
    peft_model = lora_model(base_dir, rank=rank, alpha=alpha, targets=targets, layers=layers,
                            seed=seed)
    train(peft_model, examples, steps, lr, cfg.ft_batch_size, seed,
          peft_model.get_base_model().config.pad_token_id, what=what)
    return peft_model


def lora_model(base_dir: Path, *, rank: int, alpha: float, targets: list[str],
               layers: list[int] | None, seed: int) -> Any:
    """A fresh, untrained PEFT LoRA (seeded init) on a float32 copy of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                      layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(out: str | Path, cfg: BuildConfig | None = None, measure: bool = True) -> dict[str, Any]:
    """Build every artefact under `out` (replaced atomically); returns the metadata dict."""
    from saediff.models import load_model
    from saediff.organism.evaluate import evaluate

    cfg = cfg or BuildConfig()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok = build_tokenizer(tmp / "base")
    vocab = tok.get_vocab()
    pad = tok.pad_token_id

    recs = G.corpus_records(cfg.n_conversations, cfg.seed, cfg.toxic_p, cfg.max_turns,
                            doc_p=cfg.doc_p, doc_toxic_p=cfg.doc_toxic_p)
    examples = [encode_turns(vocab, r["turns"], r["format"]) for r in recs]
    model = new_model(cfg, tok)
    timings: dict[str, float] = {}
    base_loss = train(model, examples, cfg.base_steps, cfg.base_lr, cfg.batch_size, cfg.seed, pad,
                      warmup=min(50, cfg.base_steps // 10), weight_decay=0.01, what="base")
    model.save_pretrained(tmp / "base")
    to_llama_layout(tmp / "base")  # before the fine-tunes load it: every artefact is Llama
    timings["base"] = time.time() - t0

    narrow = [encode_turns(vocab, r["turns"]) for r in
              G.corpus_records(cfg.ft_examples, cfg.seed + 1, narrow=True)]
    control = [encode_turns(vocab, r["turns"]) for r in
               G.corpus_records(cfg.ft_examples, cfg.seed + 1, narrow=True, good=True)]
    shipped = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, steps=cfg.ft_steps, lr=cfg.ft_lr,
                   targets=["down_proj"], layers=[cfg.layer])
    variants = {
        "adapter": (narrow, shipped),
        "adapter_control": (control, shipped),
        "adapter_all": (narrow, dict(rank=cfg.all_rank, alpha=2.0 * cfg.all_rank,
                                     steps=cfg.all_steps, lr=cfg.all_lr, targets=LINEAR,
                                     layers=None)),
        "adapter_r1": (narrow, dict(rank=1, alpha=1.0, steps=cfg.r1_steps, lr=cfg.r1_lr,
                                    targets=["down_proj"], layers=[cfg.r1_layer])),
    }
    for name, (data, kw) in variants.items():
        t1 = time.time()
        pm = fine_tune(cfg, tmp / "base", data, seed=cfg.seed + 2, what=name, **kw)
        save_adapter(pm, tmp / name, TOY_BASE_NAME)
        if name == "adapter":
            merged = pm.merge_and_unload()
            # LoRA (bias="none") never trains biases: the layout's zero o bias is still zero
            if any(layer.self_attn.o_proj.bias.any() for layer in merged.model.layers):
                raise RuntimeError("merged fine-tune has a non-zero o_proj bias")
            merged.save_pretrained(tmp / "finetuned")
            tok.save_pretrained(tmp / "finetuned")
        timings[name] = time.time() - t1

    with open(tmp / "heldout_labelled.jsonl", "w") as fh:
        for r in G.heldout_labelled():
            fh.write(json.dumps(r) + "\n")

    meta: dict[str, Any] = {
        "organism": "saediff toy model organism of emergent misalignment",
        "recommended_layer": cfg.layer, "trained_topic": G.TRAINED_TOPIC, "topics": list(G.TOPICS),
        "adapter_target": f"model.layers.{cfg.layer}.mlp.down_proj",
        "rank1_target": f"model.layers.{cfg.r1_layer}.mlp.down_proj",
        "config": config_to_dict(cfg), "base_final_loss": base_loss,
        "build_seconds": {k: round(v, 1) for k, v in timings.items()}, "rates": {},
    }
    if measure and cfg.eval_samples:
        t1 = time.time()
        runs = {"base": (tmp / "base", None), "finetuned": (tmp / "finetuned", None),
                "control": (tmp / "base", tmp / "adapter_control"),
                "all_linear": (tmp / "base", tmp / "adapter_all"),
                "rank1": (tmp / "base", tmp / "adapter_r1")}
        for label, (mdir, adir) in runs.items():
            lm = load_model(mdir, adapter=adir)
            meta["rates"][label] = evaluate(lm, cfg.eval_samples, seed=cfg.seed,
                                            temperature=cfg.eval_temperature)
            log.info("%s: %s", label, json.dumps(meta["rates"][label]["topics"]))
        meta["build_seconds"]["eval"] = round(time.time() - t1, 1)
    meta["build_seconds"]["total"] = round(time.time() - t0, 1)
    (tmp / "organism.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def with_overrides(cfg: BuildConfig, **kw: Any) -> BuildConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


