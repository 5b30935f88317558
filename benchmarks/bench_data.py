"""Dataset loading at the scale of the paper's Office dataset (101k users, 28k items, ~0.8M interactions).

Generates random sequences of that shape, then prints the seconds to write, load and draw the cached 100 negatives.
    python benchmarks/bench_data.py [--users 101000 --items 28000]
"""

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import load_dataset  # noqa: E402
from common.evaluation import sample_negatives  # noqa: E402
from prepare_data import write_dataset  # noqa: E402


@dataclass
class Args:
    users: int = 101_000
    """Number of users (Office: 101k)."""
    items: int = 28_000
    """Number of items (Office: 28k)."""
    seed: int = 0
    """Seed of the random sequences."""


def main(args: Args) -> None:
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(5, 12, size=args.users)  # mean 8 interactions per user, ~0.8M in total at Office scale
    sequences = {f"u{u}": [f"i{j}" for j in rng.integers(0, args.items, size=n)] for u, n in enumerate(lengths)}
    meta = {f"i{j}": {"title": f"item {j}"} for j in range(args.items)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "office_like"
        start = time.perf_counter()
        write_dataset(out, sequences, meta)
        written = time.perf_counter()
        data = load_dataset(out)
        loaded = time.perf_counter()
        sample_negatives(data, 100)
        sampled = time.perf_counter()
    print(f"{data.num_users} users, {data.num_items} items, {data.num_interactions} interactions")
    print(f"write {written - start:.2f} s | load {loaded - written:.2f} s | "
          f"100 negatives per user {sampled - loaded:.2f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
