"""saediff.config: field docstrings as CLI help, YAML + overrides into a validated dataclass."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from saediff.config import add_dataclass_args, build_config, config_to_dict, field_docs, load_yaml
from saediff.errors import SaediffError


@dataclasses.dataclass
class ToyConfig:
    out: Path
    """Where the run goes."""
    lr: float = 1e-3
    """Learning rate."""
    steps: int = 10
    """Training steps."""
    kind: Literal["topk", "relu"] = "topk"
    """Which SAE."""
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """Layers to read."""
    shuffle: bool = True
    """Shuffle the buffer."""
    note: str | None = None
    """Free text."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_field_docs_are_the_cli_help():
    docs = field_docs(ToyConfig)
    assert docs["lr"] == "Learning rate." and docs["out"] == "Where the run goes."
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ToyConfig)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["lr"] == "Learning rate. (default: 0.001)"
    assert helps["layers"] == "Layers to read. (default: 1 2)"
    assert helps["shuffle"] == "Shuffle the buffer. (default: on)"
    assert helps["note"] == "Free text. (default: none)"
    assert helps["out"].endswith("(required: a flag or the YAML config)")


def test_cli_options_parse_to_the_field_types():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ToyConfig, defaults_none=True)
    ns = parser.parse_args(["--out", "x", "--lr", "3e-4", "--layers", "0", "3", "--no-shuffle",
                            "--kind", "relu"])
    assert (ns.lr, ns.layers, ns.shuffle, ns.kind, ns.steps) == (3e-4, [0, 3], False, "relu", None)
    with pytest.raises(SystemExit):  # not one of the Literal's choices
        parser.parse_args(["--kind", "gated"])


def test_yaml_then_overrides_into_a_validated_config(tmp_path):
    p = _yaml(tmp_path, "out: runs/a\nlr: 3e-4\nsteps: 20\nlayers: [4]\n")
    cfg = build_config(ToyConfig, p, {"steps": 5, "lr": None})  # None = not given on the CLI
    # PyYAML reads `3e-4` (no dot) as a string: it must arrive as the number
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 5 and cfg.layers == [4] and cfg.out == "runs/a"
    assert config_to_dict(build_config(ToyConfig, overrides={"out": Path("o")}))["out"] == "o"


@pytest.mark.parametrize("text, message", [
    ("out: o\nsteps: 2.5\n", r"cfg.yaml: steps must be an integer, got 2.5"),
    ("out: o\nsteps: null\n", r"steps is empty \(null\); give an integer or remove it"),
    ("out: o\nkind: gated\n", r"kind must be one of 'topk', 'relu', got 'gated'"),
    ("out: o\nshuffle: 'yes'\n", r"shuffle must be true or false"),
    ("out: o\nlrr: 0.1\n", r"unknown ToyConfig field\(s\): lrr \(did you mean lr\?\)"),
    ("lr: 0.1\n", r"missing required ToyConfig field\(s\): --out"),
    ("out: o\nsteps: 0\n", r"ToyConfig: steps must be >= 1, got 0"),
    ("- out\n", r"expected a mapping of config fields"),
])
def test_bad_yaml_values_give_one_line(tmp_path, text, message):
    with pytest.raises(SaediffError, match=message):
        build_config(ToyConfig, _yaml(tmp_path, text))


def test_duplicate_key_names_file_and_both_lines(tmp_path):
    p = _yaml(tmp_path, "out: o\nlr: 0.1\nsteps: 3\nlr: 0.2\n")
    with pytest.raises(SaediffError) as err:
        load_yaml(p)
    assert str(err.value) == (f"{p}:4: key 'lr' is given twice (first on line 2); "
                              "keep one of them")


def test_yaml_refuses_python_tags_and_bad_syntax_with_the_line(tmp_path):
    p = _yaml(tmp_path, "out: o\nlr: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SaediffError, match=rf"{p}:2: invalid YAML"):
        load_yaml(p)
    p = _yaml(tmp_path, "out: o\nlr: [1, 2\nsteps: 3\n")
    with pytest.raises(SaediffError, match=rf"{p}:\d+: invalid YAML"):
        load_yaml(p)
    (tmp_path / "latin1.yaml").write_bytes("note: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SaediffError, match="not UTF-8"):
        load_yaml(tmp_path / "latin1.yaml")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        build_config(ToyConfig, tmp_path / "missing.yaml")
    assert load_yaml(_yaml(tmp_path, "")) == {}
