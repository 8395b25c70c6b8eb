import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# tests mirror the package (tests/cache/, tests/train/, ...) and import helpers from each other
# (`from test_cache import write_data`): every test folder is importable by module name
for _d in sorted(p for p in HERE.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    sys.path.insert(0, str(_d))
sys.path.insert(0, str(HERE))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("qwen"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_ft(tmp_path_factory, tiny_qwen) -> Path:
    return tiny.perturb(tiny_qwen, tmp_path_factory.mktemp("qwen_ft"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=0)
