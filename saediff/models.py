"""Model loading (HF causal LM, optional PEFT adapter), residual-stream capture, chat encoding.

We use plain HF forward hooks on the decoder blocks rather than TransformerBridge: the block
output *is* HF's `hidden_states[L+1]` (checked in tests), a hook can stop the forward right
after block L (the cache never runs the layers above), and PEFT adapters and `generate` with a
KV cache keep working unchanged. `benchmarks/bench_cache.py` measures the bridge's overhead.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saediff.errors import SaediffError
from saediff.hub import hub_local_only, quiet_loading

log = logging.getLogger(__name__)

# Per-token roles stored in the cache and used to filter statistics.
ROLE_SPECIAL, ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEXT = 0, 1, 2, 3
ROLES = {"special": ROLE_SPECIAL, "prompt": ROLE_PROMPT, "response": ROLE_RESPONSE,
         "text": ROLE_TEXT}
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def role_codes(names: list[str] | tuple[str, ...]) -> list[int]:
    """Role names -> codes, with a clear error for unknown names."""
    bad = [n for n in names if n not in ROLES]
    if bad:
        raise SaediffError(f"unknown role(s) {bad}; known roles: {sorted(ROLES)}")
    return [ROLES[n] for n in names]


def _find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM (Llama/Qwen/Mistral, GPT-2, NeoX, OPT, ...)."""
    if hasattr(model, "get_base_model"):  # PEFT wrapper
        model = model.get_base_model()
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "transformer.layers", "model.language_model.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if lists:
        return lists[0]
    raise SaediffError(f"cannot find the decoder blocks of {type(model).__name__}")


@dataclass
class LoadedModel:
    """A HF causal LM (optionally wrapped by PEFT) with its tokenizer and provenance."""

    model: nn.Module
    """The `transformers` model, or a `peft.PeftModel` when an adapter is applied."""
    tokenizer: Any
    """Its tokenizer (fast tokenizer; chat template if the model has one)."""
    name: str
    """Name or path it was loaded from."""
    adapter: str | None = None
    """PEFT adapter directory applied on top, if any."""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def layers(self) -> nn.ModuleList:
        return _find_layers(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        cfg = self.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if hasattr(cfg, key):
                return int(getattr(cfg, key))
        raise SaediffError("cannot read d_model from the model config")

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.model.generate(*args, **kwargs)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SaediffError(f"layer {layer} out of range: {self.name} has {self.n_layers} "
                               f"blocks (valid --layer 0..{self.n_layers - 1})")

    @property
    def max_positions(self) -> int | None:
        """Longest input the position embeddings allow (None when the config does not say)."""
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def check_ctx_len(self, ctx_len: int) -> None:
        # Past the position table a GPT-2 fails deep inside torch with an IndexError.
        n = self.max_positions
        if n is not None and ctx_len > n:
            raise SaediffError(f"--ctx-len {ctx_len} exceeds the {n} positions of {self.name}; "
                               f"pass --ctx-len {n} or less")

    def fingerprint(self) -> str:
        """Content hash of all weights: shapes, dtypes, a strided sample, and an exact checksum.

        The checksum sums the raw bits as integers: exact and independent of summation order
        (a float sum's last digits change with the thread count), and any single edited
        element changes it.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            with torch.no_grad():
                for name, p in sorted(self.model.state_dict().items()):
                    flat = p.detach().contiguous().reshape(-1)
                    bits = flat.view(ints[flat.element_size()]).sum(dtype=torch.int64).item()
                    step = max(1, flat.numel() // 4096)
                    h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{bits}".encode())
                    h.update(flat[::step].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter or "", "fingerprint": self.fingerprint(),
                "architecture": type(_base(self.model)).__name__, "n_layers": self.n_layers,
                "d_model": self.d_model}


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _local_only(name_or_path: str) -> bool:
    return Path(name_or_path).exists()


def _check_local(name_or_path: str, what: str = "model") -> None:
    """A name that can only be a local path must exist (else the hub says "Repo id must be ...")."""
    name = str(name_or_path)
    if Path(name).exists():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not name:
        raise FileNotFoundError(f"{what} directory not found: {name} (give an existing local "
                                "directory or a hub name like org/model)")


def _generic_tokenizer(name_or_path: str) -> bool:
    cfg = Path(name_or_path) / "tokenizer_config.json"
    if not cfg.is_file() or not (Path(name_or_path) / "tokenizer.json").is_file():
        return False
    cls = json.loads(cfg.read_text()).get("tokenizer_class")
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name_or_path: str, local_files_only: bool | None = None) -> Any:
    """A fast tokenizer with a pad token (EOS reused when the model has none)."""
    from transformers import AutoTokenizer

    try:
        if _generic_tokenizer(name_or_path):
            # transformers 5 maps a generic tokenizer.json to the model type's class (e.g. a
            # word-level vocab re-read as Qwen2's BPE); load it as-is instead.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            local = _local_only(name_or_path) if local_files_only is None else local_files_only
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load tokenizer from {name_or_path!r}: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise SaediffError(f"{name_or_path}: saediff needs a fast tokenizer (offsets for role masks)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # left padding shifts positions in some wrappers
    return tok


def load_model(name_or_path: str | Path, adapter: str | Path | None = None, device: str = "cpu",
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a HF causal LM from a local directory or hub name, optionally with a PEFT adapter.

    `dtype` None keeps float32 on CPU and the checkpoint's dtype on GPU.
    """
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    if name.lower().endswith(".gguf"):
        # A GGUF file: dequantised once into a cached plain HF dir, then loaded like any other.
        from saediff.gguf import cached_import

        name = str(cached_import(name))
    _check_local(name)
    if _local_only(name) and not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"{name} is not a HF model directory (no config.json)")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else "auto"
    local = hub_local_only(name)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {name!r}: {exc}") from exc
    adapter_s = None
    if adapter is not None:
        from saediff.adapters import load_adapter

        adapter_s = str(adapter)
        _check_local(adapter_s, "adapter")
        with quiet_loading():
            model = load_adapter(model, adapter_s, name,
                                 local_files_only=hub_local_only(adapter_s, "adapter"))
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(name, local), name=name,
                       adapter=adapter_s)


def tokenizer_fingerprint(tok: Any) -> str:
    """Hash of vocabulary, special tokens and chat template: equal iff token ids mean the same."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_tokens))).encode())
    h.update(str(getattr(tok, "chat_template", "") or "").encode())
    return h.hexdigest()[:16]


def check_same_tokenizer(a: LoadedModel, b: LoadedModel) -> None:
    fa, fb = tokenizer_fingerprint(a.tokenizer), tokenizer_fingerprint(b.tokenizer)
    if fa != fb:
        va, vb = len(a.tokenizer), len(b.tokenizer)
        what = f"vocab sizes {va} vs {vb}" if va != vb else "vocabulary/special tokens/chat template"
        raise SaediffError(f"tokenizers differ between {a.name} and {b.name} ({what}); "
                           "the two models must share token ids")
    if a.d_model != b.d_model:
        raise SaediffError(f"d_model differs: {a.name} has {a.d_model}, {b.name} has {b.d_model}")
    if a.n_layers != b.n_layers:
        raise SaediffError(f"layer count differs: {a.name} has {a.n_layers}, "
                           f"{b.name} has {b.n_layers}")


# --- encoding text and chats into token ids + roles ----------------------------------------

def _roles_from_offsets(offsets: list[tuple[int, int]], special: list[int],
                        spans: list[tuple[int, int, int]], default: int) -> list[int]:
    roles = []
    for (s, e), is_special in zip(offsets, special):
        role = ROLE_SPECIAL
        if not is_special and e > s:
            mid = (s + e) / 2
            role = default
            for lo, hi, r in spans:
                if lo <= mid < hi:
                    role = r
                    break
        roles.append(role)
    return roles


def encode_text(tok: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text -> (ids, roles): every real token is `text`, BOS/EOS are `special`."""
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    roles = _roles_from_offsets(enc["offset_mapping"], enc["special_tokens_mask"], [], ROLE_TEXT)
    return list(enc["input_ids"]), roles


Turns = list[tuple[str, str]]
"""Earlier (user, assistant) exchanges of a conversation, oldest first."""


def render_chat(tok: Any, prompt: str, response: str | None = None,
                system: str | None = None, history: Turns | None = None) -> str:
    """The chat-template text of one exchange (generation prompt appended when no response),
    after the earlier turns `history` when given."""
    if not getattr(tok, "chat_template", None):
        past = "".join(f"{u}\n{a}\n" for u, a in history or ())
        return past + prompt + "\n" + (response if response is not None else "")
    msgs = ([{"role": "system", "content": system}] if system else [])
    for u, a in history or ():
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=response is None)


def encode_chat(tok: Any, prompt: str, response: str | None = None,
                system: str | None = None, prefix: str | None = None,
                history: Turns | None = None) -> tuple[list[int], list[int]]:
    """(prompt, response) through the chat template -> (ids, roles).

    Roles come from character offsets: tokens inside the user's text are `prompt`, inside
    the assistant's text `response`, and template scaffolding (incl. default system prompts)
    is `special`. `prefix` (e.g. few-shot examples) is put before the prompt inside the user
    turn and its tokens are `special` too; so are the tokens of `history`, earlier
    (user, assistant) turns rendered before this one (e.g. in-context examples as prior chat
    turns). Without a chat template the exchange is `prompt + "\\n" + response`.
    """
    user = (prefix or "") + prompt
    text = render_chat(tok, user, response, system, history)
    start = text.find(system) + len(system) if system else 0
    for part in (x for turn in history or () for x in turn):  # skip past the earlier turns
        at = text.find(part, start)
        if at < 0:
            raise SaediffError("the chat template altered an earlier turn's text; cannot locate it")
        start = at + len(part)
    u0 = text.find(user, start)
    if u0 < 0:
        raise SaediffError("the chat template altered the prompt text; cannot locate it")
    p0 = u0 + len(prefix or "")
    spans = [(u0, p0, ROLE_SPECIAL), (p0, p0 + len(prompt), ROLE_PROMPT)]
    if response:
        r0 = text.find(response, p0 + len(prompt))
        if r0 < 0:
            raise SaediffError("the chat template altered the response text; cannot locate it")
        spans.append((r0, r0 + len(response), ROLE_RESPONSE))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    roles = _roles_from_offsets(enc["offset_mapping"], enc["special_tokens_mask"], spans,
                                ROLE_SPECIAL)
    return list(enc["input_ids"]), roles


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# residual-stream capture lives in `saediff.residual`; importable from here as before
from saediff.residual import capture_residual, run_to_layer, run_to_layers  # noqa: E402,F401
