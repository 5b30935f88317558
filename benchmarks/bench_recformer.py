"""Recformer speed: encoder throughput, fine-tuning step and export, and the share of each spent in the encoder.

Random weights at the paper's size by default (hidden 768, 12 layers, window 64, 1024-token sequences of 50 items)
and a random item catalogue (token counts like Amazon items: 10-40 per item). Prints:

    encoder fwd+bwd tokens/s     a (batch, 1024) batch through RecformerModel, forward and backward
    fine-tuning step             batch assembly (build_batch + copy) + encoder + scoring/loss; share in the encoder
    export items/s               encode_items over the catalogue; share of its time inside the encoder's forward
    peak memory                  CUDA max allocated, or the process's max resident set on CPU

The target (issue 4): at least 80% of a fine-tuning step and of export inside the encoder, since item tokens are
cached arrays and batches are assembled by numpy ops (the paper's loops re-tokenize and pad in Python per batch).

    python benchmarks/bench_recformer.py                      # paper size (slow on CPU: use --batch-size 1)
    python benchmarks/bench_recformer.py --hidden-size 256 --layers 4 --export-items 512
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.recformer import (  # noqa: E402
    ItemTokens,
    RecformerConfig,
    RecformerForSeqRec,
    build_batch,
    encode_items,
    to_device,
)
from common.run import resolve_device, seed_everything  # noqa: E402


@dataclass
class Args:
    hidden_size: int = 768
    """Model width (the paper: 768)."""
    layers: int = 12
    """Transformer layers (the paper: 12)."""
    window: int = 64
    """Sliding attention window (the paper: 64)."""
    tokens: int = 1024
    """max_token_num: tokens per sequence (the paper: 1024)."""
    batch_size: int = 2
    """Sequences per fine-tuning step and per encoder fwd+bwd measurement."""
    repeats: int = 3
    """Timed repetitions (after one warm-up); the median is printed."""
    num_items: int = 5000
    """Items in the random catalogue (the full-softmax loss scores all of them)."""
    export_items: int = 1024
    """Items encoded by the export measurement."""
    export_batch_size: int = 64
    """Items per export batch."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda"."""
    seed: int = 0
    """Seed of the random weights and catalogue."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def random_catalogue(num_items: int, vocab: int, rng: np.random.Generator) -> ItemTokens:
    lengths = np.concatenate([[0], rng.integers(10, 41, size=num_items)])
    total = int(lengths.sum())
    return ItemTokens(
        input_ids=rng.integers(5, vocab, size=total),
        token_types=rng.integers(1, 3, size=total),
        word_starts=rng.random(total) < 0.7,
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
    )


class EncoderClock:
    """Accumulates wall time spent inside a module's forward (hooks, synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self.began = device, 0.0, 0.0
        module.register_forward_pre_hook(self.start)
        module.register_forward_hook(self.stop)

    def start(self, *_):
        synchronize(self.device)
        self.began = time.perf_counter()

    def stop(self, *_):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.began


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max resident set)"


def main(args: Args) -> None:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    config = RecformerConfig(
        vocab_size=50265, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64), intermediate_size=4 * args.hidden_size,
        attention_window=args.window, max_token_num=args.tokens, max_position_embeddings=args.tokens + 2,
        pad_token_id=1, bos_token_id=0,
    )  # fmt: skip
    model = RecformerForSeqRec(config).to(device)
    tokens = random_catalogue(args.num_items, config.vocab_size, rng)
    model.set_item_table(torch.randn(args.num_items + 1, args.hidden_size, device=device))
    histories = rng.integers(1, args.num_items + 1, size=(args.batch_size, config.max_item_embeddings - 1))
    labels = torch.from_numpy(rng.integers(1, args.num_items + 1, size=args.batch_size)).to(device)
    print(f"device {device}, hidden {args.hidden_size}, layers {args.layers}, window {args.window}, "
          f"tokens {args.tokens}, batch {args.batch_size}, torch {torch.__version__}")  # fmt: skip

    def assemble():
        return to_device(build_batch(tokens, histories, config), device)

    batch = assemble()
    width = batch["input_ids"].shape[1]
    model.train()

    def encoder_step():
        model.longformer(**batch)[1].float().sum().backward()

    def head_step():
        pooled = torch.randn(args.batch_size, args.hidden_size, device=device, requires_grad=True)
        model.loss(pooled, labels, 0).backward()

    def full_step():
        model.loss(model(**assemble()), labels, 0).backward()

    encoder_seconds = timed(encoder_step, device, args.repeats)
    print(f"encoder fwd+bwd: {args.batch_size * width / encoder_seconds:,.0f} tokens/s "
          f"({encoder_seconds:.3f} s per batch of {args.batch_size} x {width})")  # fmt: skip
    assemble_seconds = timed(assemble, device, args.repeats)
    head_seconds = timed(head_step, device, args.repeats)
    step_seconds = timed(full_step, device, args.repeats)
    share = 1.0 - (assemble_seconds + head_seconds) / step_seconds
    print(f"fine-tuning step: {step_seconds:.3f} s; batch assembly {assemble_seconds * 1e3:.1f} ms, "
          f"scoring+loss {head_seconds * 1e3:.1f} ms; share inside the encoder {share:.1%} "
          "(target >= 80%)")  # fmt: skip
    model.zero_grad(set_to_none=True)

    export_tokens = ItemTokens(
        tokens.input_ids, tokens.token_types, tokens.word_starts, tokens.offsets[: args.export_items + 2]
    )
    clock = EncoderClock(model.longformer, device)
    synchronize(device)
    began = time.perf_counter()
    encode_items(model.longformer, export_tokens, batch_size=args.export_batch_size, device=device)
    synchronize(device)
    export_seconds = time.perf_counter() - began
    print(f"export: {args.export_items:,} items in {export_seconds:.2f} s = "
          f"{args.export_items / export_seconds:,.0f} items/s; share inside the encoder "
          f"{clock.seconds / export_seconds:.1%} (target >= 80%)")  # fmt: skip
    print(f"peak memory: {peak_memory(device)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
