"""Shared fixtures: where `../shared` (test media, models, conformance data) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HELLOMEME_SHARED_DIR", PROJECT_ROOT.parent / "shared"))
CONFORMANCE_DIR = Path(os.environ.get("HELLOMEME_CONFORMANCE_DIR", SHARED / "conformance"))

# Two cores in CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def require(path: Path, what: str) -> Path:
    """Skip (with the reason) when test data from ../shared is absent, as in a user's fresh clone."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (it ships in ../shared beside the project root)")
    return path
