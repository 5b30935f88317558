"""Shared fixtures: the repository on sys.path, the real data folder (skip when absent), quiet progress bars."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.setdefault("RECSYS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small built-in synthetic dataset directory (300 users, 120 items), written once per test session."""
    from common.data import write_dataset
    from prepare_data import synthetic_catalogue

    sequences, item_meta = synthetic_catalogue(num_users=300, num_items=120, seed=0)
    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    write_dataset(out, sequences, item_meta)
    return out
