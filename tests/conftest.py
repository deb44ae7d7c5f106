"""Shared test setup: make the repo root importable however pytest is launched, and run torch on
one CPU thread. The test models are tiny, so extra threads buy nothing, and on a busy 2-core
machine two OpenMP threads per process spin-wait against each other (measured: 6 s instead of
0.07 s for the same generation)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)
