import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
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
