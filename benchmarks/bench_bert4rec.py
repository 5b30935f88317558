"""Speed of train_bert4rec.py at the paper's defaults (d=768, 2 blocks, 4 heads, batch 256, max length 50).

Prints training sequences/s (ratio against the paper's code on the development machine, 2 CPU cores, Amazon
Scientific: 25 sequences/s), sampled-100 evaluation users/s, peak memory and the model FLOP/s achieved in training.
Timing, FLOP counting and memory helpers are bench_sasrec.py's.

    python benchmarks/bench_bert4rec.py data/scientific --steps 20
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sasrec import count_flops, peak_memory_gb, report, time_evaluation, time_steps  # noqa: E402

import train_bert4rec  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.evaluation import sample_negatives  # noqa: E402
from common.run import autocast, resolve_device, seed_everything  # noqa: E402

PAPER_SEQ_PER_S = 25.0


@dataclass
class Args:
    data: tyro.conf.Positional[Path]
    """Dataset directory (e.g. Amazon Scientific imported by prepare_data.py lcrec)."""
    device: str = "cpu"
    """Device to measure on ("cpu", "cuda", "auto")."""
    steps: int = 20
    """Timed training steps."""
    warmup: int = 2
    """Untimed steps before timing (allocator, caches, compilation)."""
    flop_steps: int = 2
    """Extra steps run under the FLOP counter."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute precision (bfloat16 autocast on CUDA)."""
    compile: bool = False
    """Measure the torch.compile'd model."""
    chunk_rows: int = 16
    """Rows per length chunk (see train_bert4rec.py)."""
    compare_padded: bool = True
    """Also measure whole (unchunked) batches in the same run, as a load-independent reference."""


def measure(bench: Args, args: train_bert4rec.Args, data, device: torch.device) -> tuple[float, float, float]:
    """(training sequences/s, training FLOP/s, sampled-100 evaluation users/s) of a fresh model."""
    seed_everything(0)
    sequences = torch.from_numpy(data.train_matrix(args.max_len)).to(device)
    model = train_bert4rec.BERT4Rec(data.num_items, args).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if args.compile:
        model = torch.compile(model, dynamic=True)
    batches = torch.randperm(len(sequences), device=device).split(args.batch_size)
    batch_number = iter(range(10**9))

    def step() -> None:
        batch = batches[next(batch_number) % len(batches)]
        with autocast(device, args.dtype):
            loss = train_bert4rec.batch_loss(model, sequences[batch], args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sequences_per_second = bench.steps * args.batch_size / time_steps(step, bench.steps, bench.warmup, device)
    flops_per_sequence = count_flops(step, bench.flop_steps) / (bench.flop_steps * args.batch_size)
    model.eval()
    scorer = train_bert4rec.make_scorer(model, args, device)
    # evaluate() hands the scorer max_len - 1 history items; it appends the mask token.
    users_per_second = time_evaluation(scorer, data, dataclasses.replace(args, max_len=args.max_len - 1), 100, device)
    return sequences_per_second, flops_per_sequence * sequences_per_second, users_per_second


def main(bench: Args) -> None:
    device = resolve_device(bench.device)
    data = load_dataset(bench.data)
    args = train_bert4rec.Args(
        data=bench.data,
        hidden_size=768,
        device=str(device),
        dtype=bench.dtype,
        compile=bench.compile,
        chunk_rows=bench.chunk_rows,
    )
    sample_negatives(data, 100)  # cached once per dataset; not part of an evaluation pass
    print(
        f"BERT4Rec on {data.name} ({data.num_users} users, {data.num_items} items), device {device}, "
        f"d={args.hidden_size}, {args.num_blocks} blocks, {args.num_heads} heads, batch {args.batch_size}, "
        f"max_len {args.max_len}, dtype {args.dtype}, compile {args.compile}, chunk_rows {args.chunk_rows}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    speed, flops, eval_speed = measure(bench, args, data, device)
    report("training", speed, "sequences/s", PAPER_SEQ_PER_S)
    report("training model FLOP/s", flops / 1e9, "GFLOP/s", None)
    report("evaluation (sampled-100)", eval_speed, "users/s", None)
    report(f"seconds per evaluation pass over {data.num_users} users", data.num_users / eval_speed, "s", None)
    report("peak allocated" if device.type == "cuda" else "peak RSS", peak_memory_gb(device), "GB", None)
    if bench.compare_padded:
        padded_speed, _, padded_eval_speed = measure(bench, dataclasses.replace(args, chunk_rows=10**9), data, device)
        print(
            f"  same code, whole batches: training {padded_speed:.2f} sequences/s "
            f"(chunks x{speed / padded_speed:.2f}), "
            f"evaluation {padded_eval_speed:.2f} users/s (chunks x{eval_speed / padded_eval_speed:.2f})"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
