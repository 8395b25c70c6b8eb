"""`saediff cache ...`, `saediff cache info FILE`, `saediff cache verify FILE`."""
from __future__ import annotations

import argparse
import json

from saediff.config import add_dataclass_args, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.cache.writer import CacheConfig

    p = sub.add_parser(
        "cache", help="stream one or more layers' activations of one or two models to HDF5",
        description="Stream the residual-stream activations of one layer (--layer) or several "
                    "(--layers 6,12,18 / 0-29: one forward pass, one file) of one or two models "
                    "into an HDF5 cache. Subcommands: `saediff cache info FILE [--json]`, "
                    "`saediff cache verify FILE`.")
    p.add_argument("--config", help="YAML file with CacheConfig fields (flags override it)")
    add_dataclass_args(p, CacheConfig, defaults_none=True)
    p.set_defaults(func=run)
    inspect = p.add_subparsers(dest="cache_cmd", metavar="{info,verify}")
    info = inspect.add_parser("info", help="what a cache holds")
    info.add_argument("file", help="cache file (.h5)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_inspect)
    verify = inspect.add_parser("verify", help="check a cache's integrity")
    verify.add_argument("file", help="cache file (.h5)")
    verify.set_defaults(func=_inspect)


def run(args: argparse.Namespace) -> int:
    from saediff.cache.shards import build_cache_distributed
    from saediff.cache.writer import CacheConfig

    cfg = config_from_args(CacheConfig, args)
    out = build_cache_distributed(cfg)  # build_cache itself without torchrun
    print(f"wrote {out}")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from saediff.cache.format import open_cache, verify_cache

    if ns.cache_cmd == "verify":
        problems = verify_cache(ns.file)
        for msg in problems:
            print(f"PROBLEM: {msg}")
        with open_cache(ns.file, allow_partial=True) as c:
            state = "complete" if c.complete else "INCOMPLETE (interrupted writer; rerun to resume)"
            print(f"{c.path}: {c.rows} rows, {c.n_sequences} sequences, {state}: "
                  f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    with open_cache(ns.file, allow_partial=True) as c:
        info = c.info()
    if ns.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"{info['path']}  ({'complete' if info['complete'] else 'INCOMPLETE'})")
    print(f"  rows {info['rows']}  sequences {info['sequences']}  d_model {info['d_model']}  "
          + (f"layer {info['layer']} ({info['hook_name']})" if len(info["layers"]) == 1 else
             f"layers {','.join(map(str, info['layers']))} (one forward pass)")
          + f"  dtype {info['dtype']}  "
          f"ctx_len {info['ctx_len']}")
    print(f"  roles {info['role_counts']}")
    for src, m in info["models"].items():
        adapter = f" + adapter {m['adapter']}" if m.get("adapter") else ""
        print(f"  source {src}: {m['name']}{adapter} [{m['architecture']}, "
              f"weights {m['fingerprint']}]")
    print(f"  dataset {json.dumps(info['dataset'])}")
    print(f"  tokenizer {info['tokenizer_fingerprint']}  saediff {info['saediff_version']}")
    return 0
