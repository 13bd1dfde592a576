import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import SHARED, STORIES  # noqa: E402

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # tests alternate NumPy BLAS and Numba calls: a short spin (ops/cpu.py)


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"../shared not found at {SHARED}")
        for item in items:
            if "shared" in item.fixturenames or "stories_dir" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared():
    return SHARED


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory):
    """stories260K converted from llama2.c to a Hugging Face directory by tinyserve itself."""
    from tinyserve.convert.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("models") / "stories260K"
    return convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.model", out)
