"""Speed of train_sasrec.py at the paper's defaults (d=768, 2 blocks, 1 head, batch 128, max length 50).

Prints training sequences/s with the sampled BCE loss and with full cross-entropy, evaluation users/s (sampled-100 and
full ranking), peak memory (resident set size on CPU, allocated memory on CUDA) and the model FLOP/s achieved in
training, each with its ratio against the paper's code measured on the development machine (2 CPU cores, Amazon
Scientific: 72 seq/s BCE, 43 seq/s CE, 28 s per evaluation pass over 8,317 users, 2.0 GB / 3.9 GB peak RSS).

    python prepare_data.py lcrec --inter ../shared/data/scientific/Scientific.inter.json \\
        --items ../shared/data/scientific/Scientific.item.json --out data/scientific
    python benchmarks/bench_sasrec.py data/scientific --steps 20

FLOPs are counted by torch's FlopCounterMode on extra steps after the timed ones: they are the operations the code
really runs (padding skipped by length chunking is not counted), forward and backward.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_sasrec  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.evaluation import evaluate, sample_negatives  # noqa: E402
from common.run import autocast, resolve_device, seed_everything  # noqa: E402

PAPER_BCE_SEQ_PER_S = 72.0
PAPER_CE_SEQ_PER_S = 43.0
PAPER_EVAL_USERS_PER_S = 8317 / 28.0
PAPER_PEAK_GB = {"bce": 2.0, "ce": 3.9}


@dataclass
class Args:
    data: tyro.conf.Positional[Path]
    """Dataset directory (e.g. Amazon Scientific imported by prepare_data.py lcrec)."""
    device: str = "cpu"
    """Device to measure on ("cpu", "cuda", "auto")."""
    steps: int = 20
    """Timed training steps per loss."""
    warmup: int = 2
    """Untimed steps before timing (allocator, caches, compilation)."""
    flop_steps: int = 2
    """Extra steps run under the FLOP counter."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute precision (bfloat16 autocast on CUDA)."""
    compile: bool = False
    """Measure the torch.compile'd model."""
    chunk_rows: int = 16
    """Rows per length chunk (see train_sasrec.py)."""
    compare_padded: bool = True
    """Also measure whole (unchunked) batches in the same run, as a load-independent reference."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU (never decreases)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds taken by `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - started


def count_flops(step: Callable[[], None], steps: int) -> float:
    """Floating-point operations of `steps` calls of step()."""
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            step()
    return counter.get_total_flops()


def time_evaluation(scorer, data, args, sample_size: int, device: torch.device) -> float:
    """Users per second of one validation pass."""
    synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        result = evaluate(
            scorer,
            data,
            "val",
            max_len=args.max_len,
            sample_size=sample_size,
            device=device,
            batch_size=args.eval_batch_size,
        )
    synchronize(device)
    return result["users"] / (time.perf_counter() - started)


def report(name: str, value: float, unit: str, reference: float | None, higher_is_better: bool = True) -> None:
    if reference is None:
        print(f"  {name}: {value:.2f} {unit}")
        return
    ratio = value / reference if higher_is_better else reference / value
    print(
        f"  {name}: {value:.2f} {unit} (paper's code {reference:.2f}; "
        f"ours is x{ratio:.2f} {'faster' if higher_is_better else 'smaller'})"
    )


def measure(
    bench: Args, args: train_sasrec.Args, data, loss_name: str, device: torch.device
) -> tuple[float, float, float]:
    """(training sequences/s, training FLOP/s, evaluation users/s) of a fresh model with the `loss_name` loss."""
    seed_everything(0)
    users, inputs, targets = (t.to(device) for t in train_sasrec.next_item_pairs(data, args.max_len))
    history_keys = train_sasrec.training_history_keys(data).to(device)
    model = train_sasrec.SASRec(data.num_items, args).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    if args.compile:
        model = torch.compile(model, dynamic=True)
    batches = torch.randperm(len(users), device=device).split(args.batch_size)
    batch_number = iter(range(10**9))

    def step() -> None:
        batch = batches[next(batch_number) % len(batches)]
        with autocast(device, args.dtype):
            loss = train_sasrec.batch_loss(
                model, users[batch], inputs[batch], targets[batch], history_keys, loss_name, args
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sequences_per_second = bench.steps * args.batch_size / time_steps(step, bench.steps, bench.warmup, device)
    flops_per_sequence = count_flops(step, bench.flop_steps) / (bench.flop_steps * args.batch_size)
    model.eval()
    scorer = train_sasrec.make_scorer(model, args, device)
    users_per_second = time_evaluation(scorer, data, args, 100 if loss_name == "bce" else -1, device)
    return sequences_per_second, flops_per_sequence * sequences_per_second, users_per_second


def main(bench: Args) -> None:
    device = resolve_device(bench.device)
    data = load_dataset(bench.data)
    args = train_sasrec.Args(
        data=bench.data,
        hidden_size=768,
        device=str(device),
        dtype=bench.dtype,
        compile=bench.compile,
        chunk_rows=bench.chunk_rows,
    )
    # The same code with each batch run whole (trimmed only to its longest sequence), measured in the same run: a
    # reference that does not depend on how busy the machine is.
    padded = dataclasses.replace(args, chunk_rows=10**9)
    sample_negatives(data, 100)  # cached once per dataset; not part of an evaluation pass
    print(
        f"SASRec on {data.name} ({data.num_users} users, {data.num_items} items), device {device}, "
        f"d={args.hidden_size}, {args.num_blocks} blocks, batch {args.batch_size}, max_len {args.max_len}, "
        f"dtype {args.dtype}, compile {args.compile}, chunk_rows {args.chunk_rows}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for loss_name, paper_speed in (("bce", PAPER_BCE_SEQ_PER_S), ("ce", PAPER_CE_SEQ_PER_S)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        speed, flops, eval_speed = measure(bench, args, data, loss_name, device)
        label = "sampled-100" if loss_name == "bce" else "full ranking"
        print(f"{loss_name} loss (evaluation {label}):")
        report("training", speed, "sequences/s", paper_speed)
        report("training model FLOP/s", flops / 1e9, "GFLOP/s", None)
        report("evaluation", eval_speed, "users/s", PAPER_EVAL_USERS_PER_S)
        report(f"seconds per evaluation pass over {data.num_users} users", data.num_users / eval_speed, "s", None)
        memory = "peak allocated" if device.type == "cuda" else "peak RSS (process so far)"
        report(memory, peak_memory_gb(device), "GB", PAPER_PEAK_GB[loss_name], higher_is_better=False)
        if bench.compare_padded:
            padded_speed, _, padded_eval_speed = measure(bench, padded, data, loss_name, device)
            print(
                f"  same code, whole batches: training {padded_speed:.2f} sequences/s "
                f"(chunks x{speed / padded_speed:.2f}), "
                f"evaluation {padded_eval_speed:.2f} users/s (chunks x{eval_speed / padded_eval_speed:.2f})"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
