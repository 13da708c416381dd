"""Shared test set-up: the repo root on sys.path, a deterministic CPU torch."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
