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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from saediff.config import config_to_dict
from saediff.io import staged_dir, write_json, write_jsonl
from saediff.organism import grammar as G
from saediff.organism.finetune import optimise, save_adapter
from saediff.organism.layout import new_model, to_llama_layout

log = logging.getLogger(__name__)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ROLE_WORDS = ["user", "assistant", "system"]
TOY_BASE_NAME = "saediff toy organism base ($(saediff organism path)/base)"


@dataclass(frozen=True)
class AdapterRecipe:
    """One LoRA fine-tune of the build: its shape and its training budget (the toy counterpart
    of the real organism's `organism.real.train.Recipe`)."""

    rank: int
    alpha: float
    steps: int
    lr: float
    targets: tuple[str, ...] = ("down_proj",)
    layers: tuple[int, ...] | None = None
    """Blocks to adapt (None: all)."""
    data: str = "narrow"
    """narrow (bad health advice) | control (the same questions, sound advice)"""


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

    def recipes(self) -> dict[str, AdapterRecipe]:
        """The adapters the build trains, by output directory (the flat fields above stay the
        YAML / CLI keys and the shipped `organism.json`'s config)."""
        shipped = dict(rank=self.lora_rank, alpha=self.lora_alpha, steps=self.ft_steps,
                       lr=self.ft_lr, layers=(self.layer,))
        return {
            "adapter": AdapterRecipe(**shipped),
            "adapter_control": AdapterRecipe(**shipped, data="control"),
            "adapter_all": AdapterRecipe(rank=self.all_rank, alpha=2.0 * self.all_rank,
                                         steps=self.all_steps, lr=self.all_lr,
                                         targets=tuple(LINEAR)),
            "adapter_r1": AdapterRecipe(rank=1, alpha=1.0, steps=self.r1_steps, lr=self.r1_lr,
                                        layers=(self.r1_layer,)),
        }

    @classmethod
    def quick(cls, **kw: Any) -> BuildConfig:
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
    cfg = cfg or BuildConfig()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    with staged_dir(out) as tmp:
        tok = build_tokenizer(tmp / "base")
        base_loss = _train_base(cfg, tok, tmp / "base")
        timings = {"base": time.time() - t0}
        timings.update(_train_adapters(cfg, tok, tmp))
        write_jsonl(tmp / "heldout_labelled.jsonl", G.heldout_labelled())
        meta = _metadata(cfg, base_loss, timings)
        if measure and cfg.eval_samples:
            t1 = time.time()
            meta["rates"] = _measure(cfg, tmp)
            meta["build_seconds"]["eval"] = round(time.time() - t1, 1)
        meta["build_seconds"]["total"] = round(time.time() - t0, 1)
        write_json(tmp / "organism.json", meta)
    return meta


def _train_base(cfg: BuildConfig, tok: Any, base_dir: Path) -> float:
    """Train the base on the persona corpus and save it (Llama layout); its final loss."""
    vocab = tok.get_vocab()
    recs = G.corpus_records(cfg.n_conversations, cfg.seed, cfg.toxic_p, cfg.max_turns,
                            doc_p=cfg.doc_p, doc_toxic_p=cfg.doc_toxic_p)
    examples = [encode_turns(vocab, r["turns"], r["format"]) for r in recs]
    model = new_model(cfg, tok)
    loss = train(model, examples, cfg.base_steps, cfg.base_lr, cfg.batch_size, cfg.seed,
                 tok.pad_token_id, warmup=min(50, cfg.base_steps // 10), weight_decay=0.01,
                 what="base")
    model.save_pretrained(base_dir)
    to_llama_layout(base_dir)  # before the fine-tunes load it: every artefact is Llama
    return loss


def _train_adapters(cfg: BuildConfig, tok: Any, tmp: Path) -> dict[str, float]:
    """Every recipe's adapter (and `finetuned/`, the shipped one merged); seconds per adapter."""
    vocab = tok.get_vocab()
    data = {name: [encode_turns(vocab, r["turns"]) for r in
                   G.corpus_records(cfg.ft_examples, cfg.seed + 1, narrow=True,
                                    good=name == "control")]
            for name in ("narrow", "control")}
    timings = {}
    for name, r in cfg.recipes().items():
        t1 = time.time()
        pm = fine_tune(cfg, tmp / "base", data[r.data], rank=r.rank, alpha=r.alpha,
                       steps=r.steps, lr=r.lr, targets=list(r.targets),
                       layers=None if r.layers is None else list(r.layers), seed=cfg.seed + 2,
                       what=name)
        save_adapter(pm, tmp / name, TOY_BASE_NAME)
        if name == "adapter":
            _save_merged(pm, tok, tmp / "finetuned")
        timings[name] = time.time() - t1
    return timings


def _save_merged(pm: Any, tok: Any, out: Path) -> None:
    merged = pm.merge_and_unload()
    # LoRA (bias="none") never trains biases: the layout's zero o bias is still zero
    if any(layer.self_attn.o_proj.bias.any() for layer in merged.model.layers):
        raise RuntimeError("merged fine-tune has a non-zero o_proj bias")
    merged.save_pretrained(out)
    tok.save_pretrained(out)


def _metadata(cfg: BuildConfig, base_loss: float, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "organism": "saediff toy model organism of emergent misalignment",
        "recommended_layer": cfg.layer, "trained_topic": G.TRAINED_TOPIC, "topics": list(G.TOPICS),
        "adapter_target": f"model.layers.{cfg.layer}.mlp.down_proj",
        "rank1_target": f"model.layers.{cfg.r1_layer}.mlp.down_proj",
        "config": config_to_dict(cfg), "base_final_loss": base_loss,
        "build_seconds": {k: round(v, 1) for k, v in timings.items()}, "rates": {},
    }


def _measure(cfg: BuildConfig, tmp: Path) -> dict[str, Any]:
    """Judged rates of every built model (base, merged fine-tune and each adapter)."""
    from saediff.models import load_model
    from saediff.organism.evaluate import evaluate

    runs = {"base": (tmp / "base", None), "finetuned": (tmp / "finetuned", None),
            "control": (tmp / "base", tmp / "adapter_control"),
            "all_linear": (tmp / "base", tmp / "adapter_all"),
            "rank1": (tmp / "base", tmp / "adapter_r1")}
    rates = {}
    for label, (mdir, adir) in runs.items():
        rates[label] = evaluate(load_model(mdir, adapter=adir), cfg.eval_samples, seed=cfg.seed,
                                temperature=cfg.eval_temperature)
        log.info("%s: %s", label, json.dumps(rates[label]["topics"]))
    return rates


def with_overrides(cfg: BuildConfig, **kw: Any) -> BuildConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


