"""Cells per hour of reproduce.py --jobs 2 against --jobs 1 on the same small grid, back to back in one call.

A synthetic dataset (--users users), the tiny backbone, SASRec and BERT4Rec from random and raw-copy tables, two
seeds: 8 cells of about half a minute each. --jobs 1 runs them one by one in this process with every core's
threads; --jobs 2 runs two worker processes of cores // 2 threads. Prints the wall time of each and the ratio of
their cells per hour (the target on 2 cores: >= 1.8x), and how far their test NDCG@10 lie apart (the thread counts
differ, so the float sums do; equal results at equal thread counts are tested in tests/test_reproduce.py).

A third grid, --jobs 1 at one thread, splits the ratio into its two factors: what the second thread gives one
process (--jobs 1 at all threads against one thread) and how close --jobs N comes to N independent one-thread
processes (its cells per hour against N times those of one thread: 1.0 is a scheduler that loses nothing).

    python benchmarks/bench_grid.py [--users 3000 --epochs 20]
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reproduce  # noqa: E402
from prepare_data import synthetic_catalogue, write_dataset  # noqa: E402


@dataclass
class Args:
    users: int = 3000
    """Synthetic users (items: users // 10)."""
    epochs: int = 20
    """Epochs of every cell (patience as many, so every cell runs all of them)."""
    jobs: int = 2
    """The parallel setting compared with --jobs 1."""


def timed_grid(grid: reproduce.Args) -> tuple[float, dict]:
    began = time.perf_counter()
    reproduce.main(grid)
    seconds = time.perf_counter() - began
    return seconds, json.loads((grid.out / "results.json").read_text())


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        sequences, meta = synthetic_catalogue(num_users=args.users, num_items=args.users // 10, seed=0)
        write_dataset(data, sequences, meta)
        grid = reproduce.Args(
            data=data, backbone="tiny", out=Path(tmp) / "jobs1", finetune_epochs=0, transforms=("center",),
            seeds=(42, 43), sample_sizes=(100,), epochs=args.epochs, patience=args.epochs, sasrec_lr=1e-3,
            bert4rec_lr=1e-3, device="cpu",
        )  # fmt: skip
        cells = len(reproduce.cells(grid, ["random", "longformer"]))
        serial, serial_results = timed_grid(grid)
        parallel, parallel_results = timed_grid(replace(grid, out=Path(tmp) / f"jobs{args.jobs}", jobs=args.jobs))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one_thread, _ = timed_grid(replace(grid, out=Path(tmp) / "jobs1-thread1"))
        torch.set_num_threads(threads)
    gap = max(abs(a["test"]["NDCG@10"] - b["test"]["NDCG@10"]) for a, b in zip(serial_results["runs"],
                                                                                parallel_results["runs"]))  # fmt: skip
    print(f"{cells} cells (+ 1 export), {args.users} users, {args.epochs} epochs each")
    print(f"--jobs 1: {serial:.1f} s, {3600 * cells / serial:.0f} cells/hour")
    print(f"--jobs {args.jobs}: {parallel:.1f} s, {3600 * cells / parallel:.0f} cells/hour")
    print(f"--jobs 1 at 1 thread: {one_thread:.1f} s, {3600 * cells / one_thread:.0f} cells/hour")
    print(f"ratio: {serial / parallel:.2f}x cells per hour (target >= 1.8x on 2 cores); test NDCG@10 of a cell "
          f"differs by at most {gap:.4f} between the two")
    print(f"of which: {threads} threads in one process run {one_thread / serial:.2f}x one thread; --jobs {args.jobs} "
          f"reaches {one_thread / (args.jobs * parallel):.2f} of {args.jobs} one-thread processes")


if __name__ == "__main__":
    main(tyro.cli(Args))
