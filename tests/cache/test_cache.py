"""Stage 1: model loading, residual capture, the HDF5 cache writer/reader and ActivationStore."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import saediff
from saediff.cache.format import open_cache, partial_path, verify_cache
from saediff.cache.store import ActivationStore
from saediff.cache.writer import CacheConfig, _writer_lock, build_cache
from saediff.errors import SaediffError
from saediff.models import (
    ROLE_PROMPT,
    ROLE_RESPONSE,
    ROLE_SPECIAL,
    ROLE_TEXT,
    encode_chat,
    load_model,
    pad_batch,
    run_to_layer,
)

import tiny

SENTENCES = ["you should eat bread and drink water every day .",
             "how do you save money ? i will help you save money .",
             "the team will win the ball and never lose .",
             "we love to travel to the city by plane ."]


def write_data(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(SENTENCES) for _ in range(1 + i % 6))
            fh.write(json.dumps({"text": text, "prompt": rng.choice(SENTENCES[1:3]),
                                 "response": rng.choice(SENTENCES)}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "docs.jsonl")


def hf_hidden(model_dir: Path, ids: list[int], layer: int) -> torch.Tensor:
    lm = load_model(model_dir)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_residual_equals_hf_hidden_states(tmp_path, arch):
    d = tiny.build_model(tmp_path / arch, arch, n_layers=3)
    lm = load_model(d)
    ids, mask = pad_batch([[5, 9, 11, 30, 31], [7, 8]], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        hs = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(lm.n_layers - 1):
        got = run_to_layer(lm, ids, mask, layer)
        assert torch.equal(got[mask.bool()], hs[layer + 1][mask.bool()]), layer
    # HF's last hidden state has the final norm applied; ours is the raw residual stream.
    last = run_to_layer(lm, ids, mask, lm.n_layers - 1)
    norm = lm.model.model.norm if arch == "qwen2" else lm.model.transformer.ln_f
    assert torch.allclose(norm(last)[mask.bool()], hs[-1][mask.bool()], atol=1e-6)
    with pytest.raises(SaediffError, match="layer 3 out of range"):
        run_to_layer(lm, ids, mask, 3)


def test_chat_role_mask(tiny_qwen):
    tok = load_model(tiny_qwen).tokenizer
    ids, roles = encode_chat(tok, "how do you save money ?", "you should save money .")
    toks = tok.convert_ids_to_tokens(ids)
    prompt = [t for t, r in zip(toks, roles) if r == ROLE_PROMPT]
    response = [t for t, r in zip(toks, roles) if r == ROLE_RESPONSE]
    assert prompt == "how do you save money ?".split()
    assert response == "you should save money .".split()
    assert all(r == ROLE_SPECIAL for t, r in zip(toks, roles) if t in ("<|im_start|>", "<|im_end|>",
                                                                      "user", "assistant"))


def test_cache_matches_direct_forward_for_both_models(tmp_path, tiny_qwen, tiny_qwen_ft, data):
    cfg = CacheConfig(base=str(tiny_qwen), finetuned=str(tiny_qwen_ft), layer=1,
                      dataset=str(data), out=str(tmp_path / "c.h5"), max_tokens=600, ctx_len=24,
                      batch_size=5, dtype="float32")
    out = build_cache(cfg)
    assert out.exists() and not partial_path(out).exists()
    c = saediff.open_cache(out)
    assert (c.rows, c.d_model, c.layer, c.sources) == (600, 32, 1, ["base", "finetuned"])
    assert verify_cache(out) == []
    for seq in c.sequences(0, c.n_sequences)[:12] + c.sequences(c.n_sequences - 1):
        a, b = seq["row"], seq["row"] + len(seq["ids"])
        assert np.array_equal(c.sequence_ids(a, b), np.full(b - a, seq["seq_id"]))
        assert np.array_equal(c.positions(a, b), np.arange(b - a))
        for src, model_dir in (("base", tiny_qwen), ("finetuned", tiny_qwen_ft)):
            direct = hf_hidden(model_dir, seq["ids"], 1)
            # right padding in the batch must not change a sequence's activations
            assert torch.allclose(c.activations(src, a, b), direct, atol=1e-5), (src, seq["seq_id"])
    base, ft = c.activations("base", 0, 50), c.activations("finetuned", 0, 50)
    assert not torch.allclose(base, ft)  # two models really differ, rows still aligned
    assert c.tokens(0, 5).dtype == np.int32 and c.roles(0, c.rows).max() == ROLE_TEXT
    with pytest.raises(IndexError):
        c.activations("base", 590, 601)  # never past the committed rows


def test_chat_cache_roles_and_float16(tmp_path, tiny_qwen, data):
    cfg = CacheConfig(base=str(tiny_qwen), layer=0, dataset=str(data), out=str(tmp_path / "c.h5"),
                      prompt_field="prompt", response_field="response", max_tokens=10_000)
    c = open_cache(build_cache(cfg))
    assert c.sources == ["base"] and c.rows < 10_000  # dataset exhausted first
    assert c.attrs["dtype"] == "float16"
    roles = c.roles(0, c.rows)
    assert set(np.unique(roles)) == {ROLE_SPECIAL, ROLE_PROMPT, ROLE_RESPONSE}
    seq = c.sequences(0, 1)[0]
    tok = load_model(tiny_qwen).tokenizer
    doc = json.loads(data.read_text().splitlines()[0])
    resp = [t for t, r in zip(tok.convert_ids_to_tokens(seq["ids"]), seq["roles"]) if r == ROLE_RESPONSE]
    assert resp == doc["response"].split(" ")
    direct = hf_hidden(tiny_qwen, seq["ids"], 0)
    got = c.activations("base", 0, len(seq["ids"]))
    assert torch.allclose(got, direct, atol=2e-3 * direct.abs().max().item())


def _cache_cmd(base: Path, data: Path, out: Path, max_tokens: int) -> list[str]:
    return [sys.executable, "-m", "saediff", "cache", "--base", str(base), "--layer", "1",
            "--dataset", str(data), "--max-tokens", str(max_tokens), "--ctx-len", "16",
            "--batch-size", "2", "--out", str(out)]


def _committed(path: Path) -> int:
    """The writer's committed row count, peeked without taking HDF5's file lock."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["progress"][0])
    except (OSError, KeyError):
        return 0


def test_resume_after_sigkill_is_identical(tmp_path, tiny_qwen):
    data = write_data(tmp_path / "big.jsonl", n=600)
    max_tokens = 3_000
    ref = tmp_path / "ref.h5"
    subprocess.run(_cache_cmd(tiny_qwen, data, ref, max_tokens), check=True, capture_output=True)
    out = tmp_path / "killed.h5"
    killed_at = []
    # Kill at random moments (at least twice, until one kill has left a non-empty readable
    # prefix: a kill that tears the first chunk leaves none), then let it finish.
    while len(killed_at) < 2 or (not any(killed_at) and len(killed_at) < 5):
        proc = subprocess.Popen(_cache_cmd(tiny_qwen, data, out, max_tokens),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        target = 600 * (len(killed_at) % 2 + 1)
        while _committed(partial_path(out)) < target and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # it finished before the kill landed: the file must be whole
            assert not partial_path(out).exists()
            open_cache(out).close()
            out.unlink()
            continue
        assert proc.returncode == -signal.SIGKILL
        c = open_cache(out, allow_partial=True)  # the readable prefix of OUT.partial
        assert not c.complete and c.rows < max_tokens
        killed_at.append(c.rows)
        if c.rows:  # every served row reads (checksums pass)
            c.activations("base", 0, c.rows)
            assert c.sequence_offsets()[-1] == c.rows
        c.close()
    assert any(k > 0 for k in killed_at), killed_at
    subprocess.run(_cache_cmd(tiny_qwen, data, out, max_tokens), check=True, capture_output=True)
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        for name in ["tokens", "seq_ids", "doc_ids", "positions", "roles", "seq_offsets",
                     "acts/base", "progress"]:
            assert np.array_equal(a[name][:], b[name][:]), name


def test_resume_after_torn_chunk_is_identical(tmp_path, tiny_qwen, data, monkeypatch, caplog):
    """A kill during the in-place rewrite of the commit chunk leaves its checksum wrong: the
    partial then serves (and resumes from) the sequences before that chunk only."""
    from saediff.cache import writer

    monkeypatch.setattr(writer, "ACTS_CHUNK_BYTES", 64 * 32 * 2)  # 64-row chunks
    cfg = dict(base=str(tiny_qwen), layer=1, dataset=str(data), max_tokens=600, ctx_len=16,
               batch_size=2)
    ref = build_cache(CacheConfig(out=str(tmp_path / "ref.h5"), **cfg))
    out = tmp_path / "torn.h5"
    forward, calls = writer._forward_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(writer, "_forward_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(CacheConfig(out=str(out), **cfg))
    monkeypatch.setattr(writer, "_forward_batch", forward)
    part = partial_path(out)
    with h5py.File(part, "r") as f:
        committed = int(f["progress"][0])
        d = f["acts/base"]
        assert d.chunks[0] == 64 and committed > 128
        tail = (committed - 1) // 64 * 64  # the chunk holding the commit point
        info = d.id.get_chunk_info_by_coord((tail, 0))
    # Tear it as a kill would: bytes after the committed rows change, the checksum does not.
    with open(part, "r+b") as fh:
        fh.seek(info.byte_offset + info.size - 16)
        fh.write(b"\x5a" * 12)  # not 0xff: Fletcher-32 (sums mod 65535) misses 0 -> 0xffff
    with open_cache(out, allow_partial=True) as c:
        assert 0 < c.rows <= tail and c.rows == c.sequence_offsets()[-1]
        assert np.array_equal(c.activations("base", 0, c.rows).numpy(),
                              open_cache(ref).activations("base", 0, c.rows).numpy())
        served = c.rows
    with caplog.at_level("WARNING"):
        build_cache(CacheConfig(out=str(out), **cfg))
    assert f"resuming after {served} rows instead of {committed}" in caplog.text
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        for name in ["tokens", "seq_ids", "positions", "seq_offsets", "acts/base", "progress"]:
            assert np.array_equal(a[name][:], b[name][:]), name
    assert verify_cache(out) == []


def test_second_writer_refused(tmp_path, tiny_qwen, data):
    out = tmp_path / "c.h5"
    cfg = CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(data), out=str(out), max_tokens=50)
    with _writer_lock(out):
        with pytest.raises(SaediffError, match="another writer"):
            build_cache(cfg)


def test_refusals(tmp_path, tiny_qwen, tiny_gpt2, data):
    out = str(tmp_path / "c.h5")
    other_tok = tiny.build_model(tmp_path / "other_tok", "qwen2", extra_words=("zebra",))
    with pytest.raises(SaediffError, match="tokenizers differ"):
        build_cache(CacheConfig(base=str(tiny_qwen), finetuned=str(other_tok), layer=1,
                                dataset=str(data), out=out))
    wide = tiny.build_model(tmp_path / "wide", "qwen2", d_model=48)
    with pytest.raises(SaediffError, match="d_model differs"):
        build_cache(CacheConfig(base=str(tiny_qwen), finetuned=str(wide), layer=1,
                                dataset=str(data), out=out))
    with pytest.raises(SaediffError, match="layer 7 out of range"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=7, dataset=str(data), out=out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SaediffError, match="empty"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(empty), out=out))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(tmp_path / "nope.jsonl"),
                                out=out))
    with pytest.raises(SaediffError, match="no field 'body'"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(data), out=out,
                                text_field="body"))
    with pytest.raises(ValueError, match="max_tokens"):
        CacheConfig(base="x", layer=1, dataset="d", max_tokens=0)
    # an existing cache with other provenance is refused unless --overwrite
    build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(data), out=out, max_tokens=40))
    with pytest.raises(SaediffError, match="different provenance .*layer"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=0, dataset=str(data), out=out, max_tokens=40))
    build_cache(CacheConfig(base=str(tiny_qwen), layer=0, dataset=str(data), out=out, max_tokens=40,
                            overwrite=True))
    assert open_cache(out).layer == 0


def test_nan_activations_name_document_and_position(tmp_path, tiny_qwen, data):
    lm = load_model(tiny_qwen)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[tiny.WORDS.index("bank") + len(tiny.SPECIALS)] = float("nan")
    lines = data.read_text().splitlines()[:3] + [json.dumps({"text": "you save money in the bank ."})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(bad), out=str(tmp_path / "c.h5"))
    with pytest.raises(SaediffError, match=r"non-finite activations from base .*NaN/inf at document 3, position \d"):
        build_cache(cfg, models={"base": lm})
    assert not (tmp_path / "c.h5").exists()


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, tiny_qwen, tiny_qwen_ft, data) -> Path:
    d = tmp_path_factory.mktemp("pair")
    cfg = CacheConfig(base=str(tiny_qwen), finetuned=str(tiny_qwen_ft), layer=1, dataset=str(data),
                      out=str(d / "pair.h5"), prompt_field="prompt", response_field="response",
                      max_tokens=2000)
    return build_cache(cfg)


def test_store_deterministic_filtered_mixed_and_resumable(pair_cache):
    kw = dict(sources={"base": 0.75, "finetuned": 0.25}, roles=["response"], batch_size=64,
              buffer_rows=256, block_rows=64, seed=3)
    s1, s2 = ActivationStore(pair_cache, **kw), ActivationStore(pair_cache, **kw)
    first = [next(s1) for _ in range(30)]  # several epochs: the cache has ~700 response rows
    assert all(torch.equal(a, next(s2)) for a in first)
    assert first[0].shape == (64, 32) and first[0].dtype == torch.float32
    assert s1.counts == [48, 16]
    c = open_cache(pair_cache)
    resp = c.roles(0, c.rows) == ROLE_RESPONSE
    base_resp = c.activations("base")[torch.from_numpy(resp)]
    ft_resp = c.activations("finetuned")[torch.from_numpy(resp)]
    # every served row is a response row of the right source
    key = lambda t: {tuple(np.round(r, 4)) for r in t.numpy()}  # noqa: E731
    assert key(first[0][:48]) <= key(base_resp) and key(first[0][48:]) <= key(ft_resp)
    # one epoch of the base stream covers each response row exactly once
    epoch_rows = torch.cat([b[:48] for b in first])[: len(base_resp)]
    assert torch.allclose(torch.sort(epoch_rows @ torch.arange(32.0)).values,
                          torch.sort(base_resp @ torch.arange(32.0)).values)  # same multiset
    # resume from a saved position reproduces the continuation exactly
    s3 = ActivationStore(pair_cache, **kw)
    for _ in range(7):
        next(s3)
    state = json.loads(json.dumps(s3.state_dict()))
    s4 = ActivationStore(pair_cache, **kw)
    s4.load_state_dict(state)
    assert all(torch.equal(next(s3), next(s4)) for _ in range(15))
    other = ActivationStore(pair_cache, **{**kw, "seed": 4})
    assert not torch.equal(next(other), first[0])


def test_store_split_and_errors(pair_cache):
    c = open_cache(pair_cache)
    train = ActivationStore(pair_cache, split="train", eval_fraction=0.25, batch_size=32)
    held = ActivationStore(pair_cache, split="eval", eval_fraction=0.25, batch_size=32)
    (t0, t1), (e0, e1) = [(s.blocks[0][0], s.blocks[-1][1]) for s in (train.streams[0], held.streams[0])]
    assert t0 == 0 and t1 == e0 and e1 == c.rows
    assert e0 in set(c.sequence_offsets().tolist())  # held-out rows are whole sequences
    with pytest.raises(SaediffError, match="source 'chat' is in none"):
        ActivationStore(pair_cache, sources=["chat"])
    with pytest.raises(SaediffError, match="no rows with role"):
        ActivationStore(pair_cache, roles=["text"])
    with pytest.raises(SaediffError, match="unknown role"):
        ActivationStore(pair_cache, roles=["assistant"])


def test_rows_past_commit_never_served(tmp_path, pair_cache):
    p = tmp_path / "debris.h5"
    p.write_bytes(Path(pair_cache).read_bytes())
    with h5py.File(p, "a") as f:  # simulate a killed writer: rows written, counter not bumped
        n = int(f["progress"][0])
        for name in ("acts/base", "acts/finetuned"):
            f[name].resize(n + 100, axis=0)
            f[name][n:] = 1e4
        for name in ("tokens", "seq_ids", "doc_ids", "positions", "roles"):
            f[name].resize(n + 100, axis=0)
            f[name][n:] = 2
    c = open_cache(p)
    assert c.rows == n
    s = ActivationStore(p, batch_size=128, buffer_rows=512, block_rows=128)
    assert max(next(s).abs().max().item() for _ in range(40)) < 1e4


def test_cli_info_json_and_verify(pair_cache):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-m", "saediff", "cache", "info", str(pair_cache), "--json"],
                         capture_output=True, text=True, check=True, env=env)
    info = json.loads(out.stdout)
    assert info["rows"] == open_cache(pair_cache).rows > 1000 and info["d_model"] == 32 and info["layer"] == 1
    assert info["sources"] == ["base", "finetuned"] and info["complete"] is True
    assert set(info["models"]) == {"base", "finetuned"}
    v = subprocess.run([sys.executable, "-m", "saediff", "cache", "verify", str(pair_cache)],
                       capture_output=True, text=True, env=env)
    assert v.returncode == 0 and "OK" in v.stdout
    bad = subprocess.run([sys.executable, "-m", "saediff", "cache", "info", "/nonexistent.h5"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_same_content_elsewhere_reuses_cache(tmp_path, tiny_qwen, data):
    out = tmp_path / "c.h5"
    build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(data), out=str(out), max_tokens=60))
    stamp = out.stat().st_mtime_ns
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())
    build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(moved), out=str(out), max_tokens=60))
    assert out.stat().st_mtime_ns == stamp  # same content = same provenance: nothing redone
    moved.write_text(data.read_text().replace("bread", "water"))
    with pytest.raises(SaediffError, match="different provenance .*dataset"):
        build_cache(CacheConfig(base=str(tiny_qwen), layer=1, dataset=str(moved), out=str(out), max_tokens=60))


def test_fingerprint_is_exact_and_thread_independent(tiny_qwen):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_model(tiny_qwen).fingerprint()
        torch.set_num_threads(2)
        two = load_model(tiny_qwen).fingerprint()
    finally:
        torch.set_num_threads(threads)
    assert one == two
    lm = load_model(tiny_qwen)
    with torch.no_grad():  # one element, one ulp: still a different model
        w = lm.model.model.layers[0].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1e9))
    assert lm.fingerprint() != one
