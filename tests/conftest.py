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
    from prepare_data import synthetic_catalogue, write_dataset

    sequences, item_meta = synthetic_catalogue(num_users=300, num_items=120, seed=0)
    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    write_dataset(out, sequences, item_meta)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: a second OpenMP thread mostly adds spin-waiting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def scientific(shared_data, tmp_path_factory) -> Path:
    """Amazon Scientific (LC-Rec processing) as an ID-only dataset directory, imported once per session."""
    from prepare_data import Lcrec, build_lcrec, write_dataset

    source = shared_data / "scientific"
    sequences, _ = build_lcrec(Lcrec(source / "Scientific.inter.json", source / "Scientific.item.json", None))
    out = tmp_path_factory.mktemp("scientific") / "scientific"
    write_dataset(out, sequences, None)
    return out


@pytest.fixture
def read_scalars():
    """read_scalars(run_dir) -> {tag: [(step, value), ...]}: the TensorBoard event files under run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    return read
