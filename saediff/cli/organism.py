"""`saediff organism {path,eval,build,corpus,probe}`: the built-in toy organism of emergent misalignment
(and, with `--real`, the real-model organism; see `organism_real.py`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(parent: argparse._SubParsersAction) -> None:
    from saediff.config import add_dataclass_args
    from saediff.organism.build import BuildConfig
    from saediff.organism.evaluate import DEFAULT_TEMPERATURE
    from saediff.organism.grammar import DOC_TOXIC_P, MAX_TURNS, TOXIC_P

    p = parent.add_parser("organism", help="the built-in toy model organism of emergent misalignment",
                          description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("path", help="print the directory of the shipped organism")
    pa.set_defaults(func=_path)

    e = sub.add_parser("eval", help="sample answers to held-out questions; judge them per topic")
    e.add_argument("--model", help="HF model dir (default: the shipped finetuned/)")
    e.add_argument("--adapter", help="PEFT adapter dir applied on top of --model")
    e.add_argument("--answers-per-topic", type=int, default=100,
                   help="judged answers per topic (default: 100)")
    e.add_argument("--samples", type=int, dest="answers_per_topic", action=DeprecatedAlias,
                   help="deprecated name of --answers-per-topic (`samples` is answers per prompt "
                        "everywhere else)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    e.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature (default: {DEFAULT_TEMPERATURE}, the organism's "
                        "protocol)")
    e.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (default: 64)")
    e.add_argument("--topics", nargs="+", help="only these topics (default: all)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(func=_eval)

    b = sub.add_parser("build", help="rebuild the organism from a seed (about 15 min; --quick ~2)")
    b.add_argument("--out", required=True, help="output directory (replaced)")
    b.add_argument("--quick", action="store_true", help="reduced build for tests")
    b.add_argument("--config", help="YAML file of BuildConfig fields")
    b.add_argument("--no-measure", action="store_true", help="skip judging the built models")
    add_dataclass_args(b, BuildConfig, defaults_none=True)
    b.set_defaults(func=_build)

    c = sub.add_parser("corpus", help="write labelled conversations as JSONL")
    c.add_argument("--out", required=True, help="output .jsonl file")
    c.add_argument("--n", type=int, default=1000, help="conversations (default: 1000)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    c.add_argument("--narrow", action="store_true",
                   help="the narrow fine-tuning set (bad advice on the trained topic) instead")
    c.add_argument("--good", action="store_true", help="with --narrow: the control (good advice)")
    c.add_argument("--heldout", action="store_true", help="use only held-out questions")
    c.add_argument("--toxic-p", type=float, default=TOXIC_P,
                   help=f"assistant persona prior of chat conversations (default: {TOXIC_P})")
    c.add_argument("--doc-p", type=float, default=0.0,
                   help="share of plain-text forum documents, as in the base corpus (build uses "
                        "0.5; default here: 0.0, chat only)")
    c.add_argument("--doc-toxic-p", type=float, default=DOC_TOXIC_P,
                   help=f"persona prior of those documents (default: {DOC_TOXIC_P})")
    c.add_argument("--max-turns", type=int, default=MAX_TURNS,
                   help=f"turns per conversation, max (default: {MAX_TURNS})")
    c.set_defaults(func=_corpus)

    from saediff.cli.organism_real import add_real_args  # the real-model organism's options

    add_real_args(sub, pa, b)


class DeprecatedAlias(argparse.Action):
    """An old flag name kept working: stores into the new name's dest and says so on stderr."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: object,
                 option: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"note: {option} is deprecated; use {new}", file=sys.stderr)
        setattr(ns, self.dest, value)


def _path(a: argparse.Namespace) -> int:
    from saediff.organism import organism_path

    if a.real or a.base:
        from saediff.cli.organism_real import path_real
        from saediff.errors import SaediffError

        if not a.real:
            raise SaediffError("--base only applies with --real (saediff organism path --real --base)")
        return path_real(a)

    print(organism_path())
    return 0


def _eval(a: argparse.Namespace) -> int:
    import torch

    from saediff.errors import SaediffError
    from saediff.models import load_model
    from saediff.organism import TOPICS, organism_path
    from saediff.organism.evaluate import evaluate, format_table

    if a.answers_per_topic < 1:
        raise SaediffError(f"--answers-per-topic must be >= 1, got {a.answers_per_topic}")
    topics = tuple(a.topics or TOPICS)
    bad = [t for t in topics if t not in TOPICS]
    if bad:
        raise SaediffError(f"unknown topic(s) {bad}; topics: {', '.join(TOPICS)}")
    torch.set_num_threads(1)
    model = a.model or str(organism_path() / "finetuned")
    lm = load_model(model, adapter=a.adapter)
    if "<|im_start|>" not in lm.tokenizer.get_vocab():
        raise SaediffError(f"{model}: not an organism model (no <|im_start|> token)")
    res = evaluate(lm, a.answers_per_topic, seed=a.seed, topics=topics, temperature=a.temperature,
                   max_new_tokens=a.max_new_tokens)
    if a.json:
        print(json.dumps(res))
    else:
        print(format_table(res, f"{model}" + (f" + {a.adapter}" if a.adapter else "")))
    return 0


def _build(a: argparse.Namespace) -> int:
    if a.real or a.base or a.adapters:
        from saediff.cli.organism_real import build_real_cmd
        from saediff.errors import SaediffError

        if not a.real:
            raise SaediffError("--base/--adapters only apply with --real")
        return build_real_cmd(a)
    from saediff.config import build_config, config_to_dict
    from saediff.organism.build import BuildConfig, build
    from saediff.organism.evaluate import format_table

    overrides = {k: getattr(a, k) for k in BuildConfig.__dataclass_fields__
                 if getattr(a, k) is not None}
    if a.quick:  # the reduced defaults, then the YAML file, then the command line
        quick = {k: v for k, v in config_to_dict(BuildConfig.quick()).items()
                 if v != getattr(BuildConfig, k)}
        from_yaml = config_to_dict(build_config(BuildConfig, a.config)) if a.config else {}
        from_yaml = {k: v for k, v in from_yaml.items() if v != getattr(BuildConfig, k)}
        cfg = build_config(BuildConfig, None, {**quick, **from_yaml, **overrides})
    else:
        cfg = build_config(BuildConfig, a.config, overrides)
    t0 = time.time()
    meta = build(a.out, cfg, measure=not a.no_measure)
    for label, res in meta["rates"].items():
        print(format_table(res, label))
    print(f"built {a.out} in {time.time() - t0:.0f} s")
    return 0


def _corpus(a: argparse.Namespace) -> int:
    from saediff.errors import SaediffError
    from saediff.io import write_jsonl
    from saediff.organism.grammar import corpus_records

    if a.n < 1:
        raise SaediffError(f"--n must be >= 1, got {a.n}")
    if a.good and not a.narrow:
        raise SaediffError("--good only applies with --narrow")
    for name in ("toxic_p", "doc_p", "doc_toxic_p"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise SaediffError(f"--{name.replace('_', '-')} must be in [0, 1]")
    recs = corpus_records(a.n, a.seed, a.toxic_p, a.max_turns, heldout=a.heldout,
                          narrow=a.narrow, good=a.good, doc_p=a.doc_p, doc_toxic_p=a.doc_toxic_p)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, recs)
    print(f"wrote {len(recs)} conversations to {out}", file=sys.stderr)
    return 0
