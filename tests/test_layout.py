"""The package's import graph: no cycles, no edge from an earlier stage to a later one, and
shared modules import no stage (the folder tree is the pipeline: cache < train < diff < steer,
then the optional compare < experiments, which may import every stage before them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "saediff"
STAGES = ["cache", "train", "diff", "steer", "compare", "experiments"]
REQUIRED = STAGES[:4]  # compare and experiments are later, optional stages
# top-level parts allowed to use every stage: the CLI, the demo, the organism's builders
DRIVERS = {"cli", "demo", "__main__", "organism"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every saediff module `name` imports, also inside functions, resolved to a module."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for m in found:
        while m and m not in mods:
            m = m.rpartition(".")[0]
        if m and m != name and m != "saediff":
            out.add(m)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items()}


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def find_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for a, deps in graph.items():
        for b in deps:
            sa, sb = _stage(a), _stage(b)
            if sa and sb and STAGES.index(sb) > STAGES.index(sa):
                problems.append(f"back-edge {a} -> {b}")
            top = a.split(".")[1] if "." in a else ""
            # `saediff/__init__` is the API facade: it binds every stage's entry point
            if sa is None and sb and top not in DRIVERS and a != "saediff":
                problems.append(f"shared module imports a stage: {a} -> {b}")
    # cycles: depth-first search with colours
    colour: dict[str, int] = {}

    def visit(v: str, stack: list[str]) -> None:
        colour[v] = 1
        for w in sorted(graph.get(v, ())):
            if colour.get(w) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(w):] + [v, w])
                                if w in stack else f"cycle through {v} -> {w}")
            elif w not in colour:
                visit(w, stack + [v])
        colour[v] = 2

    for v in sorted(graph):
        if v not in colour:
            visit(v, [])
    return problems


def test_every_stage_is_a_subpackage():
    assert all((ROOT / s / "__init__.py").is_file() for s in REQUIRED)


def test_import_graph_has_no_cycle_and_no_back_edge():
    graph = _graph()
    assert len(graph) > 30  # the walk really found the package
    assert find_problems(graph) == []


@pytest.mark.parametrize("graph, expected", [
    ({"saediff.cache.writer": {"saediff.steer.hooks"}, "saediff.steer.hooks": set()}, "back-edge"),
    ({"saediff.models": {"saediff.train.loop"}, "saediff.train.loop": set()}, "shared module"),
    ({"saediff.a": {"saediff.b"}, "saediff.b": {"saediff.a"}}, "cycle"),
    ({"saediff.steer.hooks": {"saediff.experiments.icl"}, "saediff.experiments.icl": set()},
     "back-edge"),
    ({"saediff.steer.sweep": {"saediff.compare.run"}, "saediff.compare.run": set()}, "back-edge"),
])
def test_the_checker_catches_each_kind_of_problem(graph, expected):
    assert any(p.startswith(expected) for p in find_problems(graph))


# --- one training loop, one judged-generation path, one writer module, short functions --------
# Grep-level checks over the AST of every module in saediff/ (issue 21's "Done when").

PKG = ROOT.parent
# the one judged-generation path (generate -> judge -> summarise), created by issue 21 item 2
JUDGED_PATH = "saediff/judged.py"
# modules that implement a trainer's step (one optimizer step per call, no loop of their own);
# the one loop over steps is train/loop.py's. The LoRA fine-tune of the organism is its own loop.
TRAINER_STEP_MODULES = {"saediff/train/trainer.py", "saediff/train/sparse.py",
                        "saediff/train/crosscoder_trainer.py"}
OWN_LOOPS = {"saediff/organism/finetune.py"}  # the organism's LoRA fine-tune (not a dictionary)
# answers generated for something other than an EM rate: the differ's sampled answers (its
# labeler is a per-answer label, not a summary) and the prompt module that defines the loop
GENERATES_UNJUDGED = {"saediff/prompts.py", "saediff/diff/data.py",
                      # sample_answers: unjudged samples for the real organism's probe and build
                      "saediff/organism/evaluate.py"}
FUNCTION_LINES, MODULE_LINES = 60, 400
# "path:function" entries, each with its reason (not among issue 21's functions to split)
# (empty: cache/writer.py build_cache 73 / _fill 66 and organism/build.py build 86 are open too)
LONG_FUNCTION_ALLOWLIST: set[str] = set()
LONG_MODULE_ALLOWLIST: set[str] = set()
# the cache commits its resumable NAME.h5.partial by one rename (docs/cache.md: the committed
# prefix survives a kill and resumes), a protocol of its own that saediff.io does not cover
WRITE_ALLOWLIST = {"saediff/cache/writer.py:os.replace"}


def _sources(root: Path = PKG) -> dict[str, ast.Module]:
    return {p.relative_to(root).as_posix(): ast.parse(p.read_text())
            for p in sorted((root / "saediff").rglob("*.py"))}


def _call_name(node: ast.Call) -> str:
    """`a.b.c(...)` -> "a.b.c"; `f(...)` -> "f"; other callees -> their attribute or ""."""
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    elif isinstance(f, ast.Call):
        parts.append(_call_name(f) + "()")
    return ".".join(reversed(parts))


def _calls_in(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def training_loop_problems(trees: dict[str, ast.Module]) -> list[str]:
    """`.backward()` / `optimizer.step()` only in trainer-step modules (and the organism's own
    fine-tune), and never inside a for/while body there: the loop over steps is train/loop.py's."""
    problems = []
    for path, tree in trees.items():
        if path in OWN_LOOPS:
            continue
        loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))]
        in_loop = {id(c) for lp in loops for c in _calls_in(lp)}
        for call in _calls_in(tree):
            name = _call_name(call)
            last = name.rsplit(".", 1)
            is_opt_step = len(last) == 2 and last[1] == "step" and "optim" in last[0].lower() \
                or name in ("opt.step", "self.opt.step")
            if not (name.endswith(".backward") or is_opt_step):
                continue
            if path not in TRAINER_STEP_MODULES:
                problems.append(f"{path}:{call.lineno}: {name}() outside a trainer step module")
            elif id(call) in in_loop:
                problems.append(f"{path}:{call.lineno}: {name}() inside a loop (a second "
                                "training loop; train/loop.py owns the loop over steps)")
    return problems


_JUDGE_CALLS = {"misaligned_given_coherent", "coherent_rate"}


def judged_generation_problems(trees: dict[str, ast.Module],
                               path_module: str = JUDGED_PATH) -> list[str]:
    """Answers are generated for an EM rate, and judged, only in the one path module."""
    problems = []
    for path, tree in trees.items():
        if path in (path_module, "saediff/judges.py"):
            continue
        for call in _calls_in(tree):
            name = _call_name(call)
            base, _, attr = name.rpartition(".")
            if attr == "generate_answers" or name == "generate_answers":
                if path not in GENERATES_UNJUDGED:
                    problems.append(f"{path}:{call.lineno}: generate_answers() outside "
                                    f"{path_module}")
            elif (attr or name) in _JUDGE_CALLS and not base.startswith(("self", "np", "torch")):
                problems.append(f"{path}:{call.lineno}: {name}() outside {path_module}")
            elif attr == "score" and "judge" in base.lower():
                problems.append(f"{path}:{call.lineno}: {name}() (a judge call) outside "
                                f"{path_module}")
        if any(isinstance(n, ast.FunctionDef) and n.name == "generate_answers"
               for n in ast.walk(tree)) and path != "saediff/prompts.py":
            problems.append(f"{path}: defines a second generate_answers")
    return problems


_WRITE_CALLS = {"os.replace", "os.rename", "shutil.move", "torch.save", "save_file",
                "safetensors.torch.save_file", "json.dump", "np.save", "numpy.save"}
_WRITE_METHODS = {"write_text", "write_bytes"}
_WRITE_MODES = ("w", "a", "x", "+")


def _opens_for_writing(call: ast.Call) -> bool:
    method = isinstance(call.func, ast.Attribute)  # Path(...).open(mode) vs open(file, mode)
    if _call_name(call).rpartition(".")[2] != "open" or _call_name(call) == "os.open":
        return False
    args = call.args if method else call.args[1:]
    mode = args[0] if args else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and \
        any(c in mode.value for c in _WRITE_MODES)


def _is_devnull(call: ast.Call) -> bool:
    return bool(call.args) and "devnull" in ast.unparse(call.args[0])


_IO_BLOCKS = ("atomic_path", "staged_outputs")


def _inside_io_blocks(tree: ast.AST) -> set[int]:
    """Calls lexically inside `with atomic_path(...) as tmp:` / `staged_outputs(...)`: they
    write into the temporary that saediff.io renames into place."""
    inside: set[int] = set()
    for w in ast.walk(tree):
        if isinstance(w, ast.With) and any(
                isinstance(i.context_expr, ast.Call)
                and _call_name(i.context_expr).rpartition(".")[2] in _IO_BLOCKS for i in w.items):
            inside |= {id(c) for part in [*w.body, *(i.context_expr for i in w.items)]
                       for c in _calls_in(part)}
    return inside


def write_problems(trees: dict[str, ast.Module]) -> list[str]:
    """Every file write goes through saediff.io: no rename, open-for-writing, write_text /
    write_bytes, torch.save, safetensors save_file or json.dump anywhere else, except into the
    temporary of an `io.atomic_path` / `io.staged_outputs` block."""
    problems = []
    for path, tree in trees.items():
        if path == "saediff/io.py":
            continue
        allowed = _inside_io_blocks(tree)
        for call in _calls_in(tree):
            if id(call) in allowed or f"{path}:{_call_name(call)}" in WRITE_ALLOWLIST:
                continue
            name = _call_name(call)
            base, _, attr = name.rpartition(".")
            method = bool(base) and base not in ("io", "saediff.io")  # not io.write_text
            if name in _WRITE_CALLS or method and attr in _WRITE_METHODS or attr == "save_file" \
                    or _opens_for_writing(call) and not _is_devnull(call):
                problems.append(f"{path}:{call.lineno}: {name}()")
    return problems


def long_functions(trees: dict[str, ast.Module], limit: int = FUNCTION_LINES) -> list[str]:
    out = []
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines > limit and f"{path}:{n.name}" not in LONG_FUNCTION_ALLOWLIST:
                    out.append(f"{path}:{n.lineno} {n.name} ({lines} lines)")
    return out


def long_modules(root: Path = PKG, limit: int = MODULE_LINES) -> list[str]:
    out = []
    for p in sorted((root / "saediff").rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        n = len(p.read_text().splitlines())
        if n > limit and rel not in LONG_MODULE_ALLOWLIST:
            out.append(f"{rel} ({n} lines)")
    return out


def test_one_training_loop():
    assert training_loop_problems(_sources()) == []


def test_one_judged_generation_path():
    assert judged_generation_problems(_sources()) == []


def test_every_write_goes_through_saediff_io():
    assert write_problems(_sources()) == []


def test_no_function_longer_than_60_lines():
    assert long_functions(_sources()) == []


def test_no_module_longer_than_400_lines():
    assert long_modules() == []


def _tree(src: str) -> dict[str, ast.Module]:
    return {"saediff/x.py": ast.parse(src)}


@pytest.mark.parametrize("check, src", [
    (training_loop_problems, "for b in data:\n    loss = f(b)\n    loss.backward()\n"),
    (training_loop_problems, "def fit(opt):\n    optimizer.step()\n"),
    (judged_generation_problems, "recs = generate_answers(lm, items, 3)\n"),
    (judged_generation_problems, "s = judge.score(q, a, t)\n"),
    (judged_generation_problems, "rate = misaligned_given_coherent(scores)\n"),
    (judged_generation_problems, "def generate_answers(lm, prompts):\n    pass\n"),
    (write_problems, "os.replace(tmp, path)\n"),
    (write_problems, "with open(p, 'w') as fh:\n    pass\n"),
    (write_problems, "with Path(p).open('ab') as fh:\n    pass\n"),
    (write_problems, "with (d / 'm.jsonl').open('a') as fh:\n    pass\n"),
    (write_problems, "fh = open(p, mode='x')\n"),
    (write_problems, "p.write_text('x')\n"),
    (write_problems, "torch.save(sd, p)\n"),
    (write_problems, "save_file(tensors, p)\n"),
    (write_problems, "json.dump(obj, fh)\n"),
    (long_functions, "def f():\n" + "    x = 1\n" * 60),
])
def test_each_layout_check_catches_its_case(check, src):
    assert check(_tree(src)) != []


@pytest.mark.parametrize("check, src", [
    (training_loop_problems, "def step(self, b):\n    loss.backward()\n    self.opt.step()\n"),
    (write_problems, "with open(p) as fh:\n    fh.read()\n"),
    (write_problems, "sys.stdout = open(os.devnull, 'w')\n"),
    (write_problems, "with p.open('r') as fh:\n    pass\n"),
    (write_problems, "write_text(p, 'x')\nio.write_json(p, {})\nio.write_text(p, 'y')\n"),
    (write_problems, "with io.atomic_path(p) as tmp:\n    save_file(t, tmp)\n"),
    (write_problems, "with atomic_path(p) as tmp, open(tmp, 'w') as fh:\n    json.dump(o, fh)\n"),
    (judged_generation_problems, "rows = load_prompt_items(p)\n"),
    (long_functions, "def f():\n" + "    x = 1\n" * 59),
])
def test_layout_checks_pass_what_is_allowed(check, src):
    trees = {"saediff/train/trainer.py": ast.parse(src)} if check is training_loop_problems \
        else _tree(src)
    assert check(trees) == []
