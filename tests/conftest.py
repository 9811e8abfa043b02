"""Shared pytest setup."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# The test machines have 2 cores; more intra-op threads only oversubscribe them.
if torch.get_num_threads() > 2:
    torch.set_num_threads(2)
