"""Shared test setup: the repository root on sys.path, one thread (tests run beside other work)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import torch
except ImportError:  # tests/comfy then skips, saying why, instead of failing to load this file
    pass
else:
    torch.set_num_threads(1)
