"""saediff train --live: rows equal the cache's, training equals a cache replay, SIGKILL resume,
bad input before any forward, in-RAM evals, crosscoder, the mixing buffer's bounds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from saediff.cache.live import LiveStore, is_eval_document
from saediff.errors import SaediffError
from saediff.models import ROLES
from saediff.train.loop import TrainConfig, train

import tiny

ROOT = Path(__file__).resolve().parents[2]
LAYER = 1


@pytest.fixture(scope="module")
def docs(tmp_path_factory, tiny_qwen, tiny_qwen_ft):
    """A chat dataset, the live config's model options, and the float32 cache of it."""
    from saediff.cache.writer import CacheConfig, build_cache

    d = tmp_path_factory.mktemp("live")
    tiny.write_chat_jsonl(d / "chat.jsonl")
    src = dict(base=str(tiny_qwen), finetuned=str(tiny_qwen_ft), layer=LAYER,
               dataset=str(d / "chat.jsonl"), prompt_field="p", response_field="r")
    cache = build_cache(CacheConfig(**src, out=str(d / "c.h5"), dtype="float32",
                                    max_tokens=100_000, batch_size=16))
    return d, src, cache


def _live_cfg(src: dict, out: Path, **kw) -> TrainConfig:
    base = dict(live=True, out=str(out), d_sae=64, k=4, total_tokens=30 * 128, batch_size=128,
                buffer_tokens=600, checkpoint_every=10, log_every=5, eval_sequences=0,
                eval_rows=500, norm_batches=2, dead_feature_window=10, threads=1, lr=3e-3)
    base.update(src)
    base.update(kw)
    return TrainConfig(**base)


class CacheRows:
    """The training rows of a cache in document order, shaped like `ModelRows`'s output
    (activations mode, equal weights: per sequence the base rows, then the fine-tuned rows)."""

    def __init__(self, path: Path, eval_fraction: float, mode: str = "activations"):
        from saediff.cache.format import open_cache

        self.c = open_cache(path)
        self.d_model, self.layers, self.mode = self.c.d_model, [LAYER], mode
        codes = [v for v in ROLES.values() if v != 0]
        self.seqs = []
        for s in self.c.sequences():
            if is_eval_document(s["doc_id"], eval_fraction):
                continue
            keep = torch.from_numpy(np.isin(s["roles"], codes))
            a, b = s["row"], s["row"] + len(s["ids"])
            x = torch.stack([self.c.activations(k, a, b)[keep] for k in ("base", "finetuned")], 1)
            self.seqs.append(x)

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pair":
            return x[:, None]
        return torch.cat([x[:, 0], x[:, 1]])[:, None]

    def iterate(self, epoch: int = 0, seq: int = 0):
        for e in range(epoch, 10_000):
            for i in range(seq if e == epoch else 0, len(self.seqs)):
                yield e, i, self.rows_of(self.seqs[i])


# --- same rows, same SAE -------------------------------------------------------------------------

def test_live_rows_are_the_caches_rows(docs):
    """One pass of the live stream yields exactly the cache's training rows, in order."""
    from saediff.cache.source import load_source_models
    from saediff.train.data import live_rows

    _, src, cache = docs
    cfg = _live_cfg(src, Path("unused"), architecture="crosscoder")
    models = load_source_models(cfg)
    rows = live_rows(cfg, models)
    ref = CacheRows(cache, cfg.eval_fraction, mode="pair")
    it = rows.iterate()
    got = [next(it) for _ in range(len(ref.seqs))]
    assert [g[:2] for g in got] == [(0, i) for i in range(len(ref.seqs))]
    live = torch.cat([g[2] for g in got])
    want = torch.cat([ref.rows_of(x) for x in ref.seqs])
    assert live.shape == want.shape == (len(want), 1, 2, 32) and len(want) > 1500
    assert torch.allclose(live, want, atol=1e-5), (live - want).abs().max()
    assert next(it)[:2] == (1, 0)  # the next epoch starts over
    diff = live_rows(_live_cfg(src, Path("unused"), input="difference"), models).iterate()
    d = torch.cat([next(diff)[2] for _ in range(len(ref.seqs))])
    assert torch.allclose(d, want[:, :, 1] - want[:, :, 0], atol=1e-5)  # --input difference
    held = [i for i in range(120) if is_eval_document(i, cfg.eval_fraction)]
    assert 4 <= len(held) <= 8  # ~5% of the 120 documents, never trained on


def test_live_training_equals_training_on_the_cache_rows(docs, tmp_path):
    """The SAE of a live run = the SAE trained on the cache's rows through the same buffer."""
    _, src, cache = docs
    cfg = _live_cfg(src, tmp_path / "live")
    (live,) = train(cfg, evals=False)
    replay = LiveStore(CacheRows(cache, cfg.eval_fraction), cfg.batch_size, cfg.buffer_tokens,
                       cfg.seed)
    (rep,) = train(_live_cfg(src, tmp_path / "replay"), evals=False, store=replay)
    a, b = load_file(live / "sae_weights.safetensors"), load_file(rep / "sae_weights.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    la = [json.loads(x) for x in (live / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (rep / "metrics.jsonl").read_text().splitlines()]
    assert [r["mse_loss"] for r in la] == pytest.approx([r["mse_loss"] for r in lb], rel=1e-4)
    assert la[0]["mse_loss"] > 1.2 * la[-1]["mse_loss"]  # it learned: equality is not trivial


def test_live_sweep_reads_each_batch_once(docs, tmp_path):
    _, src, _ = docs
    runs = train(_live_cfg(src, tmp_path / "sw", total_tokens=10 * 128, sweep={"k": [2, 4]}),
                 evals=False)
    assert [r.name for r in runs] == ["k2", "k4"]
    st = json.loads((tmp_path / "sw/checkpoints/step_00000010/state.json").read_text())
    assert st["store"]["batches"] == 10 and st["n_saes"] == 2  # one model pass, both SAEs


# --- the buffer ----------------------------------------------------------------------------------

def _toy_rows(n_seq: int = 50, seq_len: int = 7):
    class Rows:
        d_model, layers = 1, [0]

        def iterate(self, epoch=0, seq=0):
            for e in range(epoch, 1000):
                for i in range(seq if e == epoch else 0, n_seq):
                    ids = torch.arange(seq_len) + i * seq_len + e * n_seq * seq_len
                    yield e, i, ids.float()[:, None, None]
    return Rows()


def test_buffer_serves_each_row_once_within_a_bounded_window():
    store = LiveStore(_toy_rows(), batch_size=10, buffer_rows=60, seed=1)
    seen = torch.cat([next(store).flatten() for _ in range(70)])  # two passes over 350 rows
    first = seen[:350]
    assert sorted(first.tolist()) != first.tolist()  # shuffled
    pos = torch.arange(len(seen)).float()
    # chunks of 40 rows: after 7.5 chunks' worth of batches, chunks 0..6 were served whole,
    # each row once, and nothing past chunk 7; no row is served further than one buffer
    # (60 rows) from its place in the stream
    head = seen[:300]
    assert len(set(head.tolist())) == 300 and head.max() < 320
    assert torch.equal(torch.sort(head).values[:280], torch.arange(280).float())
    assert (seen - pos).abs().max() <= 60
    assert store.chunk == 40 and store._leftover is not None and len(store._served) <= 40


def _resident_rows(store: LiveStore) -> int:
    """Rows held by the store's own tensors (distinct storages: a view counts its base)."""
    held = [store._served, store._leftover, store._pending and store._pending[1]]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in held if isinstance(t, torch.Tensor)}
    return sum(storages.values()) // 4  # float32 rows of width 1


def test_buffer_memory_stays_bounded_over_many_generations():
    """What bounds a long live run's memory (bench_live (2)): over 195 generations the store
    never holds more than buffer_rows + one sequence's rows, and no more live tensors at the
    end than at generation 20."""
    import gc

    store = LiveStore(_toy_rows(), batch_size=10, buffer_rows=60, seed=1)

    def tensors() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    # 140 batches = 1,400 rows = 4 passes over the 350 rows = 35 chunks: batch 80 and batch
    # 780 find the store in the same phase (chunk, sequence and epoch boundaries alike)
    resident = []
    for i in range(1, 781):
        next(store)
        resident.append(_resident_rows(store))
        if i == 80:
            early = tensors()
    assert store._gen >= 195
    assert max(resident) <= 60 + 7  # the buffer + one pending sequence, at every batch
    assert tensors() <= early


def test_buffer_state_resumes_exactly_anywhere():
    a = LiveStore(_toy_rows(), batch_size=9, buffer_rows=50, seed=2)
    want = [next(a) for _ in range(80)]
    for cut in (0, 1, 5, 17, 38, 79):
        b = LiveStore(_toy_rows(), batch_size=9, buffer_rows=50, seed=2)
        for _ in range(cut):
            next(b)
        st = json.loads(json.dumps(b.state_dict()))
        c = LiveStore(_toy_rows(), batch_size=9, buffer_rows=50, seed=2)
        c.load_state_dict(st)
        assert all(torch.equal(next(c), w) for w in want[cut:]), cut
    with pytest.raises(SaediffError, match="same --buffer-tokens"):
        LiveStore(_toy_rows(), batch_size=9, buffer_rows=80, seed=2).load_state_dict(st)


# --- resume after SIGKILL --------------------------------------------------------------------------

def test_live_resume_after_sigkill_is_bitwise_identical(docs, tmp_path):
    _, src, _ = docs
    cfg = {**src, "live": True, "d_sae": 64, "k": 4, "total_tokens": 100 * 64, "batch_size": 64,
           "buffer_tokens": 500, "checkpoint_every": 10, "eval_sequences": 0, "norm_batches": 2,
           "dead_feature_window": 20, "threads": 1}
    # a loaded machine: model load + first chunk can take minutes
    killed, rerun = tiny.kill_train_mid_run(cfg, tmp_path, "sae_weights.safetensors", 30,
                                            timeout=600)
    latest = killed / "checkpoints" / "latest.json"
    st = json.loads((killed / "checkpoints" / json.loads(latest.read_text())["dir"]
                     / "state.json").read_text())["store"]
    assert st["gen"] >= 2 and st["from"] != [0, 0, 0]  # resumes mid-stream, not from 0
    # a checkpoint holds the SAE, its optimizer and a few integers of store state: no buffer
    ck = killed / "checkpoints" / json.loads(latest.read_text())["dir"]
    assert sorted(p.name for p in ck.iterdir()) == ["rng.safetensors", "sae0.json",
                                                    "sae0.safetensors", "state.json"]
    assert (ck / "state.json").stat().st_size < 3000
    assert rerun() == 0
    whole = tmp_path / "whole"
    train(TrainConfig(**cfg, out=str(whole)), evals=False)
    a = load_file(killed / "sae_weights.safetensors")
    b = load_file(whole / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


# --- bad input: one line, exit 2, before any model runs a batch -------------------------------

def test_bad_live_input_is_refused_before_any_forward(docs, tmp_path, monkeypatch, capsys):
    from saediff.cache import live
    from saediff.cli import main

    d, src, cache = docs

    def no_forward(*a, **k):
        raise AssertionError("a model ran a batch")

    monkeypatch.setattr(live, "run_to_layers", no_forward)
    other = tiny.build_model(tmp_path / "other", "qwen2", extra_words=("zebra",))
    flags = ["train", "--live", "--base", src["base"], "--dataset", src["dataset"],
             "--prompt-field", "p", "--response-field", "r", "--out", str(tmp_path / "o"),
             "--sources", "base=1", "--no-evals"]
    cases = {
        "layer 9 out of range": ["--layer", "9"],
        "has no field 'nope'": ["--layer", "1", "--prompt-field", "nope"],
        "tokenizers differ": ["--layer", "1", "--finetuned", str(other)],
        "--buffer-tokens 100 is smaller than one batch": ["--layer", "1", "--buffer-tokens",
                                                          "100", "--batch-size", "256"],
        "drop --cache": ["--layer", "1", "--cache", str(cache)],
        "missing required TrainConfig --live field(s): --layer": [],
        "dataset file not found": ["--layer", "1", "--dataset", str(tmp_path / "no.jsonl")],
    }
    for msg, extra in cases.items():
        argv = list(flags)
        if "--prompt-field" in extra:  # replace, not repeat, the chat fields
            i = argv.index("--prompt-field")
            del argv[i: i + 4]
        assert main(argv + extra) == 2, msg
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("saediff train: error: "), (msg, err)
        assert msg in err[0], (msg, err)
    assert not list(tmp_path.glob("o/*"))
    with pytest.raises(SaediffError, match="add --live"):
        TrainConfig(base="x", layer=1, dataset="d")


# --- evals and crosscoder from the live source ---------------------------------------------------

def test_live_cli_writes_evals_and_live_crosscoder_trains(docs, tmp_path):
    from saediff.cli import main
    from saediff.sae.crosscoder import Crosscoder

    d, src, _ = docs
    flags = ["train", "--live", "--base", src["base"], "--finetuned", src["finetuned"],
             "--layer", "1", "--dataset", src["dataset"], "--prompt-field", "p",
             "--response-field", "r", "--total-tokens", "2560", "--batch-size", "128",
             "--d-sae", "64", "--k", "4", "--buffer-tokens", "600", "--norm-batches", "2",
             "--threads", "1"]
    yml = tmp_path / "cfg.yaml"  # a cache config: --live on the command line replaces cache:
    yml.write_text(yaml.safe_dump({"cache": [str(tmp_path / "absent.h5")], "seed": 1}))
    assert main(flags + ["--out", str(tmp_path / "sae"), "--eval-sequences", "4",
                         "--config", str(yml)]) == 0
    assert json.loads((tmp_path / "sae" / "train_config.json").read_text())["seed"] == 1
    ev = json.loads((tmp_path / "sae" / "evals.json").read_text())
    assert set(ev) == {"base", "finetuned"}
    for r in ev.values():
        assert np.isfinite(r["fvu"]) and r["n_rows"] > 50 and r["n_lm_tokens"] > 0
        assert r["kl"] >= 0
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["saediff_live"] is True and meta["layer"] == 1
    assert main(flags + ["--out", str(tmp_path / "cc"), "--architecture", "crosscoder"]) == 0
    cc = Crosscoder.load(tmp_path / "cc")
    ev = json.loads((tmp_path / "cc" / "evals.json").read_text())
    assert cc.W_dec.shape == (2, 64, 32) and ev["base"]["tokens"] > 50
    assert np.isfinite(ev["base"]["fvu"]) and np.isfinite(ev["finetuned"]["fvu"])


# --- bfloat16: a massive activation survives, float16 refuses it in one line ---------------------

@pytest.fixture(scope="module")
def massive(tiny_qwen):
    """The tiny model with one residual entry of 1e5 on every `bank` token (float16 max 65504)."""
    from saediff.models import load_model

    lm = load_model(tiny_qwen)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[lm.tokenizer.convert_tokens_to_ids("bank"), 3] = 1e5
    return lm


def test_bfloat16_cache_keeps_a_massive_activation(docs, massive, tmp_path):
    import warnings

    from saediff.cache.format import open_cache, verify_cache
    from saediff.cache.store import ActivationStore
    from saediff.cache.writer import CacheConfig, build_cache

    _, src, _ = docs
    kw = dict(base=src["base"], layer=LAYER, dataset=src["dataset"], prompt_field="p",
              response_field="r", max_tokens=600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SaediffError, match=r"values beyond float16 range \(use --dtype "
                                               r"bfloat16 or float32\) at document \d+"):
            build_cache(CacheConfig(**kw, out=str(tmp_path / "f16.h5")), models={"base": massive})
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    f32 = build_cache(CacheConfig(**kw, out=str(tmp_path / "f32.h5"), dtype="float32"),
                      models={"base": massive})
    bf = build_cache(CacheConfig(**kw, out=str(tmp_path / "bf.h5"), dtype="bfloat16"),
                     models={"base": massive})
    with open_cache(f32) as a, open_cache(bf) as b:
        x, y = a.activations("base"), b.activations("base")
        assert b._f["acts/base"].dtype == np.uint16
        assert b._f["acts/base"].attrs["saediff_dtype"] == "bfloat16" and b.dtype == "bfloat16"
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        assert x.abs().max() > 9e4 and y.abs().max() > 9e4  # the planted value is there
        assert ((y - x).abs() <= x.abs() * 2 ** -8 + 1e-30).all()  # bf16 rounding, no more
        assert torch.equal(y, x.to(torch.bfloat16).float())     # exactly round-to-nearest
        assert (y != x).any()
    assert verify_cache(bf) == []
    st = ActivationStore(bf, sources=["base"], roles=["prompt", "response"], batch_size=64)
    batches = torch.cat([next(st) for _ in range(8)])
    assert batches.dtype == torch.float32 and batches.abs().max() > 9e4
    st.close()


def test_bfloat16_live_buffer_rounds_like_the_cache(docs, massive):
    from saediff.train.data import live_rows

    _, src, _ = docs
    rows = {}
    for dt in ("float32", "bfloat16"):
        cfg = _live_cfg(src, Path("unused"), dtype=dt, sources={"base": 1.0})
        rows[dt] = torch.cat([r for _, _, r in
                              (x for x, _ in zip(live_rows(cfg, {"base": massive}).iterate(),
                                                 range(20)))])
    assert rows["bfloat16"].dtype == torch.bfloat16 and rows["float32"].abs().max() > 9e4
    assert torch.equal(rows["bfloat16"].float(), rows["float32"].to(torch.bfloat16).float())
    store = LiveStore(live_rows(_live_cfg(src, Path("unused"), dtype="bfloat16",
                                          sources={"base": 1.0}), {"base": massive}),
                      batch_size=64, buffer_rows=300, seed=0)
    b = next(store)
    assert b.dtype == torch.float32 and store._served.dtype == torch.bfloat16


# --- torchrun: 2 ranks, each running the model on its own documents ------------------------------

class _Concat:
    """1-rank reference: batch i = rank 0's local batch i, then rank 1's."""

    def __init__(self, stores):
        self.stores, self.d_model = stores, stores[0].d_model

    def __iter__(self):
        return self

    def __next__(self):
        return torch.cat([next(s) for s in self.stores])

    def peek_batches(self, n):
        return [torch.cat(bs) for bs in zip(*(s.peek_batches(n) for s in self.stores))]

    def state_dict(self):
        return [s.state_dict() for s in self.stores]


def test_two_live_ranks_equal_one_rank_fed_both_shares(docs, tmp_path):
    from saediff.cache.source import load_source_models
    from saediff.train.data import live_rows

    from test_train_dist import _assert_same, _torchrun

    _, src, _ = docs
    cfg = {**src, "live": True, "d_sae": 64, "k": 4, "total_tokens": 16 * 256,
           "batch_size": 256, "lr": 2e-2, "buffer_tokens": 400, "checkpoint_every": 4,
           "log_every": 2, "eval_sequences": 0, "norm_batches": 2, "dead_feature_window": 3,
           "threads": 1, "seed": 3}
    yml = tmp_path / "cfg.yaml"
    yml.write_text(yaml.safe_dump(cfg))
    two = tmp_path / "two"  # stopped after step 6 (checkpoint at 4), then resumed
    stop = tmp_path / "stop.py"
    stop.write_text("import yaml\nfrom saediff.train.loop import TrainConfig, train\n"
                    f"cfg = TrainConfig(**yaml.safe_load(open({str(yml)!r})), out={str(two)!r})\n"
                    "train(cfg, evals=False, stop_after=6)\n")
    _torchrun([str(stop)], tmp_path)
    st = json.loads((two / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert len(st["store"]["ranks"]) == 2 and st["store"]["ranks"][0]["gen"] >= 1
    assert not (two / "sae_weights.safetensors").exists()
    _torchrun(["-m", "saediff", "train", "--config", str(yml), "--out", str(two),
               "--no-evals"], tmp_path)
    one_cfg = TrainConfig(**cfg, out=str(tmp_path / "one"))
    models = load_source_models(one_cfg)
    ref = _Concat([LiveStore(live_rows(one_cfg, models, shard=(r, 2)), 128, 400, 3)
                   for r in range(2)])
    (one,) = train(one_cfg, evals=False, store=ref)
    _assert_same(one, two)
    meta = json.loads((two / "cfg.json").read_text())["metadata"]
    assert meta["saediff_world_size"] == 2


# --- several layers from one forward pass (--live --layers) --------------------------------------

def test_live_layers_equal_single_layer_runs_from_one_forward(docs, tmp_path, monkeypatch):
    """--live --layers 0,2: per layer the SAE of a live --layer run (same seed, buffer), from
    one model forward per LM batch; loadable, own hook; resumes from OUT/checkpoints."""
    from saediff import load_sae
    from saediff.cache import live

    _, src, _ = docs
    calls: list[list[int]] = []
    real = live.run_to_layers

    def counted(model, ids, mask, layers):
        calls.append(list(layers))
        return real(model, ids, mask, layers)

    monkeypatch.setattr(live, "run_to_layers", counted)
    one = {**src, "layer": None}
    runs = train(_live_cfg(one, tmp_path / "multi", layers="0,2"), evals=False)
    multi_calls = list(calls)
    assert [r.relative_to(tmp_path / "multi").as_posix() for r in runs] == ["layer_0", "layer_2"]
    assert multi_calls and all(c == [0, 2] for c in multi_calls)  # every forward: both layers
    for layer, run in zip((0, 2), runs):
        calls.clear()
        (single,) = train(_live_cfg(src, tmp_path / f"single{layer}", layer=layer), evals=False)
        assert len(calls) == len(multi_calls)  # a single-layer run needs as many forwards
        a, b = load_file(run / "sae_weights.safetensors"), load_file(single / "sae_weights.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (layer, k, (a[k] - b[k]).abs().max())
        sae = load_sae(run)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.layer == layer
        assert json.loads((run / "train_config.json").read_text())["layer"] == layer
    w0, w2 = (load_file(r / "sae_weights.safetensors")["W_dec"] for r in runs)
    assert not torch.allclose(w0, w2, atol=1e-3)  # the layers differ: equality is not trivial
    st = json.loads((tmp_path / "multi/checkpoints/step_00000030/state.json").read_text())
    assert st["n_saes"] == 2 and len(st["scale"]) == 2 and st["scale"][0] != st["scale"][1]
    # interrupted at step 10, resumed from the one root: the same SAEs
    train(_live_cfg(one, tmp_path / "res", layers="0,2"), evals=False, stop_after=12)
    resumed = train(_live_cfg(one, tmp_path / "res", layers="0,2"), evals=False)
    for a, b in zip(runs, resumed):
        wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_live_bad_layers_one_line_before_any_model_runs(docs, tmp_path, monkeypatch, capsys):
    from saediff.cache import live
    from saediff.cli import main

    _, src, _ = docs

    def no_forward(*a, **k):
        raise AssertionError("a model ran a batch")

    monkeypatch.setattr(live, "run_to_layers", no_forward)
    flags = ["train", "--live", "--base", src["base"], "--dataset", src["dataset"],
             "--prompt-field", "p", "--response-field", "r", "--out", str(tmp_path / "o"),
             "--sources", "base=1", "--no-evals"]
    cases = {"--layers: layer 9 out of range": ["--layers", "0,9"],
             "give --layer or --layers, not both": ["--layers", "0,2", "--layer", "1"],
             "cannot read 'x'": ["--layers", "0,x"]}
    for msg, extra in cases.items():
        assert main(flags + extra) == 2, msg
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("saediff train: error: "), (msg, err)
        assert msg in err[0], (msg, err)
    assert not list(tmp_path.glob("o/*"))
