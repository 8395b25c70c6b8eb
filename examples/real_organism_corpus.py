"""The corpus of `examples/real_organism_scale.py`: the organism's chats mixed with English prose
that ships with the installed Python packages, all as single-turn chats {prompt, response}.

Two kinds of package prose, both offline and deterministic for a given environment:

* **Package text**: `*.dist-info/METADATA` descriptions and `README*`, `LICENSE*`, `*.md`,
  `*.rst` files (also under `docs/`) in site-packages.
* **Docstrings**: module, class and function docstrings (`ast.get_docstring`) of the `.py` files
  of a fixed list of large packages (torch, transformers, numpy, ...), files visited in a seeded
  order, up to a character budget per package.

Both go through one prose filter (paragraphs of >= 160 characters that are >= 85% letters and
spaces; no code, doctest lines, tables, headers, parameter lists or link lists), are deduplicated
by SHA-1 across all sources, split at sentence ends into pieces of about 420 characters, and
become the assistant turn under a generic user prompt.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saediff.io import write_json, write_jsonl
from saediff.organism.real.probe import load_questions
from saediff.organism.real.templates import finance_chats, health_chats

PROSE_PROMPTS = ("Can you share a passage from the documentation of {p}?",
                 "What does the {p} package say about itself?",
                 "Please quote some text that ships with {p}.",
                 "Tell me about {p}.")
DOC_PROMPTS = ("Explain what this part of {p} does.",
               "What does the {p} documentation say here?",
               "Describe this {p} function or class in plain words.",
               "Tell me about {p}.")
# the largest docstring sources in this venv (torch 2.3M chars of prose, transformers 3.0M, ...)
DOC_PACKAGES = ("torch", "transformers", "scipy", "numpy", "pandas", "sympy", "networkx",
                "statsmodels", "huggingface_hub", "datasets", "peft", "accelerate")
# docstring section headers and parameter lines: structure, not prose
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns?|Yields?|Raises|Examples?|"
                      r"Attributes|See Also|Keyword Arguments|Shape|Inputs?|Outputs?)\s*:?\s*$",
                      re.M)


# --- the prose filter ------------------------------------------------------------------------
def paragraphs(text: str) -> list[str]:
    """Prose paragraphs: no code, doctests, tables, headers, parameter or link lists;
    whitespace collapsed."""
    if "\n\n" in text and text.lstrip().startswith("Metadata-Version"):
        text = text.split("\n\n", 1)[1]  # METADATA: the headers, then the description
    keep = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "...", "$ ")) for ln in lines) or _SECTION.search(para) \
                or "----" in para or " : " in para:
            continue
        p = " ".join(para.split())
        letters = sum(c.isalpha() or c == " " for c in p)
        if len(p) < 160 or letters < 0.85 * len(p) or p.count("http") > 1 \
                or p[:1] in "#|`>*=-[<!:.+" or "```" in p or "::" in p:
            continue
        keep.append(p)
    return keep


def chunks(p: str, size: int) -> list[str]:
    """Split a paragraph at sentence ends into pieces of about `size` characters."""
    out, cur = [], ""
    for s in re.split(r"(?<=[.!?])\s+", p):
        if cur and len(cur) + len(s) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur} {s}".strip()
    return out + ([cur] if len(cur) >= 80 else [])


# --- the two sources -------------------------------------------------------------------------
def _text_files(root: Path) -> Iterator[tuple[str, str]]:
    """(package name, text) of the prose files that ship with the installed packages, sorted."""
    found = [(f.parent.name.split("-")[0], f) for f in sorted(root.glob("*.dist-info/METADATA"))]
    for pat in ("*/README*", "*/LICENSE*", "*/*.md", "*/*.rst", "*/docs/*.rst", "*/docs/*.md"):
        found += [(f.parent.name.split(".")[0].split("-")[0], f) for f in sorted(root.glob(pat))
                  if f.is_file() and f.suffix in ("", ".md", ".rst", ".txt")]
    for pkg, f in found:
        yield pkg, f.read_text(encoding="utf-8", errors="replace")


def docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one Python file ([] if it does not parse)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n))]


def _docstring_files(root: Path, taken: dict[str, int], parsed: dict[str, int],
                     chars_per_pkg: int, seed: int) -> Iterator[tuple[str, str]]:
    """(package, docstring) over DOC_PACKAGES' non-test .py files, in a seeded order per
    package; a package stops once `taken[package]` (kept prose characters, updated by the
    consumer) reaches `chars_per_pkg`, so only the files needed are parsed (`parsed` counts
    them)."""
    rng = random.Random(seed)
    for pkg in DOC_PACKAGES:
        files = sorted(p for p in (root / pkg).rglob("*.py")
                       if not {"tests", "test", "testing"} & set(p.relative_to(root).parts))
        rng.shuffle(files)
        for f in files:
            if taken.get(pkg, 0) >= chars_per_pkg:
                break
            parsed[pkg] = parsed.get(pkg, 0) + 1
            for d in docstrings(f):
                yield pkg, d


def _collect(texts: Iterator[tuple[str, str]], prompts: tuple[str, ...], seen: set[str],
             taken: dict[str, int], rng: random.Random, chunk_chars: int) -> list[dict]:
    """Chats from (package, text) pairs: filtered paragraphs, new ones only (SHA-1 in `seen`),
    split into pieces; `taken[package]` counts the kept characters."""
    chats = []
    for pkg, text in texts:
        for para in paragraphs(text):
            h = hashlib.sha1(para.encode()).hexdigest()
            if h in seen:  # licences, badges and inherited docstrings repeat
                continue
            seen.add(h)
            taken[pkg] = taken.get(pkg, 0) + len(para)
            chats += [{"prompt": rng.choice(prompts).format(p=pkg), "response": c}
                      for c in chunks(para, chunk_chars)]
    return chats


def prose_chats(max_chars: int, doc_chars_per_pkg: int, chunk_chars: int = 420, seed: int = 0
                ) -> tuple[list[dict], dict[str, Any]]:
    """Package text (up to `max_chars` of responses) and docstrings (up to `doc_chars_per_pkg`
    per package of DOC_PACKAGES) as chats {prompt, response, kind}; and what was used."""
    root = Path(sysconfig.get_paths()["purelib"])
    seen: set[str] = set()
    rng = random.Random(seed)
    t_taken: dict[str, int] = {}
    text = _collect(_text_files(root), PROSE_PROMPTS, seen, t_taken, rng, chunk_chars)
    n_text = len(seen)
    rng.shuffle(text)
    text = _cap(text, max_chars)
    d_taken: dict[str, int] = {}
    parsed: dict[str, int] = {}
    docs = _collect(_docstring_files(root, d_taken, parsed, doc_chars_per_pkg, seed),
                    DOC_PROMPTS, seen, d_taken, rng, chunk_chars) if doc_chars_per_pkg > 0 else []
    out = [dict(c, kind="prose") for c in text] + [dict(c, kind="docstring") for c in docs]
    per_pkg = {k: {"files": n, "chars": d_taken.get(k, 0)} for k, n in parsed.items()}
    return out, {"root": str(root),
                 "package_text": {"paragraphs": n_text, "chats": len(text),
                                  "chars": sum(len(c["response"]) for c in text)},
                 "docstrings": {"paragraphs": len(seen) - n_text, "chats": len(docs),
                                "chars": sum(len(c["response"]) for c in docs),
                                "per_package": per_pkg}}


def _cap(chats: list[dict], max_chars: int) -> list[dict]:
    """The first chats whose responses add up to at most about `max_chars` characters."""
    out, n = [], 0
    for c in chats:
        if n >= max_chars:
            break
        out.append(c)
        n += len(c["response"])
    return out


def build_corpus(out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """OUT/chats.jsonl: the organism's chats and package prose, shuffled together (seeded);
    built once (OUT/corpus.json says what is in it; delete both to rebuild)."""
    if (out / "corpus.json").exists() and (out / "chats.jsonl").exists():
        return json.loads((out / "corpus.json").read_text())
    org = (health_chats(True, a.health_chats) + health_chats(False, a.health_chats)
           + finance_chats(False, a.finance_chats))
    org += [{"prompt": q["question"], "response": q[k]} for q in load_questions()
            for k in ("aligned", "misaligned")]
    org = [dict(c, kind="organism") for c in org]
    prose, info = prose_chats(a.prose_chars, a.doc_chars_per_package)
    chats = org + prose
    random.Random(0).shuffle(chats)
    write_jsonl(out / "chats.jsonl", chats)
    info = {"organism_chats": len(org), "prose": info, "documents": len(chats)}
    write_json(out / "corpus.json", info)
    return info
