"""Two-stage fine-tuning of Recformer for next-item prediction, as in the paper's code.

A sequence is encoded by Recformer (items as text, newest first); an item is encoded as a one-item sequence. Scores
are cosine(sequence, item) / temp against an item table that is not a parameter:

    stage 1  at the start of every epoch the whole item table is re-encoded by the current encoder (no gradient),
             then the encoder trains one epoch against it; validation after each epoch; the best model is kept
             (early stopping on NDCG@10). Written to <out>/stage1/.
    stage 2  the best stage-1 encoder encodes the table once; the table then stays fixed while the encoder trains on.
             Written to <out>/stage2/.
    test     the stage whose best validation NDCG@10 is higher is tested -> <out>/test_metrics.json.

A training example is, per user and epoch, a random position of the training sequence: the items before it (possibly
none) are the input, the item at it the label. Loss: softmax over all items, or sampled softmax with
--finetune-negatives random items. AdamW (no weight decay on biases and LayerNorm), linear warm-up then decay.
Evaluation is the shared code (common/evaluation.py) with the same cached negatives as SASRec and BERT4Rec.

Padding-free batches: an optimizer step's batch_size x grad_accum examples (users in random order, as before) are
sorted by token count and cut into encoder calls by common.tokenization_recformer.token_budget_chunks; each call's
mean loss is weighted by its share of the step, so the step's gradient is the step's mean loss gradient, as with equal
micro-batches.
Evaluation batches are grouped the same way. The item table is encoded only when the weights changed since its last
encoding (--max-steps bounds each stage for quick experiments).

Deviations from the paper's code, on purpose: each stage gets a fresh optimiser and schedule (the paper carries one
schedule, sized for one stage, across both, and keeps Adam moments of the last rather than the best model); the
stage-2 table is encoded by the best stage-1 encoder (the paper reuses the table of the start of that epoch, one
epoch older), so stage 2 trains against exactly the table that `export_embeddings.py --checkpoint <out>/stage1`
writes; the last, partial step of an epoch averages its own examples instead of leaking into the next epoch.

Many processes (torchrun --nproc_per_node N, or the deepspeed launcher): data-parallel, every process holds the
whole model. An optimizer step takes batch_size x grad_accum examples per process from one shared random order;
each process weights its losses by its share of the step's examples and the gradients are averaged, so the step's
gradient is that of the step's mean loss. The item table is encoded in shards and all-reduced, evaluation users
are split between the processes and their integer ranks all-reduced (the metrics equal one process's exactly);
rank 0 alone prints and writes files. One process runs exactly as without a launcher.

--epochs 0 is zero-shot evaluation: the checkpoint's item table, validation and test, no training.

    python finetune_recformer.py --data data/synthetic --backbone tiny --epochs 2
    torchrun --nproc_per_node 2 finetune_recformer.py --data data/synthetic --backbone tiny --epochs 2
    python finetune_recformer.py --data data/synthetic --backbone runs/pretrain/<run>/best --epochs 0
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from common.cli import Checked, Device, Dtype, NonNegative, OutputDir, Positive
from common.convert_recformer import BackboneError, load_backbone, save_checkpoint
from common.data import DatasetError, SeqDataset, load_dataset
from common.distributed import (
    LaunchError,
    from_rank0,
    init_distributed,
    launched_processes,
    leave_process_group,
    parse_launched,
    rank0_first,
    silence_other_ranks,
)
from common.embeddings import EmbeddingFileError, load_item_embeddings, save_item_embeddings
from common.evaluation import check_sample_size, evaluate, require_users, result_line, sample_negatives
from common.modeling_recformer import RecformerForSeqRec, encode_items, set_attention
from common.run import (
    EarlyStopping,
    OutputError,
    append_jsonl,
    check_run_dir,
    create_run_dir,
    parameter_groups,
    precision,
    progress,
    resolve_device,
    seed_everything,
    to_device,
    write_json_atomic,
)
from common.tokenization_recformer import (
    ItemTokens,
    RecformerTokenizer,
    build_batch,
    dataset_item_tokens,
    item_texts,
    sequence_token_counts,
    token_budget_chunks,
)

BEST_METRIC = "NDCG@10"
TABLE_FILE = "item_table.safetensors"
CALL_TOKENS = 64
"""Padded tokens worth one more encoder call when a batch is cut by token length: on Scientific, examples of one
optimizer step (16 x 8) then run in about 15 calls instead of 8 with 5% padding instead of 76% (on one CPU thread a
call's fixed cost is a few tokens' worth)."""


@dataclass
class Args(Checked):
    data: Path = Path("data/synthetic")
    """Dataset directory with item text (written by prepare_data.py)."""
    backbone: str = "tiny"
    """Starting weights: a Recformer checkpoint directory (pretrain_recformer.py output), a Hugging Face Longformer /
    BERT / RoBERTa directory or hub name, the paper's .bin state dict, or "tiny" (small random model for demos)."""
    out: Annotated[Path | None, OutputDir] = None
    """Run directory; default runs/finetune/<dataset>-<tag>-<timestamp>/."""
    overwrite: bool = False
    """Empty a non-empty --out before the run (by default such an --out is refused, so no run mixes with another)."""
    tag: str = "recformer"
    """Name part of the default run directory."""
    epochs: Annotated[int, NonNegative] = 16
    """Maximum epochs of each stage; 0: zero-shot evaluation of --backbone (its item table, validation and test,
    test_metrics.json with "stage": 0), nothing trained."""
    patience: Annotated[int, Positive] = 5
    """A stage stops after this many validations without a new best NDCG@10."""
    batch_size: Annotated[int, Positive] = 16
    """Training sequences per forward pass (on average: see grad_accum), per process."""
    grad_accum: Annotated[int, Positive] = 8
    """Forward passes per optimiser step: a step averages the loss of batch_size x grad_accum sequences, run as
    encoder calls of similar token length (each at most batch_size x max_token_num tokens)."""
    lr: Annotated[float, NonNegative] = 5e-5
    """AdamW peak learning rate."""
    weight_decay: Annotated[float, NonNegative] = 0.0
    """AdamW weight decay (never applied to biases and LayerNorm weights)."""
    warmup_steps: Annotated[int, NonNegative] = 100
    """Optimiser steps of linear warm-up before the linear decay to zero at the end of the stage."""
    finetune_negatives: int = 0
    """Random negatives per example for sampled softmax; <= 0 uses softmax over all items (the paper's script)."""
    fix_word_embedding: bool = False
    """Keep the word-embedding table frozen."""
    sample_size: int = 100
    """Negatives per user in evaluation (the paper's Recformer runs use 100); <= 0 ranks against every item."""
    eval_batch_size: Annotated[int, Positive] = 64
    """Users per evaluation batch."""
    encode_batch_size: Annotated[int, Positive] = 64
    """Items per batch when encoding the item table."""
    seed: Annotated[int, NonNegative] = 42
    """Seed for initialisation, example positions and batch order."""
    device: Annotated[str, Device] = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...; on many processes "auto", "cuda" (each process
    takes GPU LOCAL_RANK) or "cpu"."""
    dtype: Dtype = "auto"
    """Autocast precision; "auto" is bfloat16 on CUDA with bf16 support, else float32. float16 uses loss scaling."""
    attention: Literal["fast", "hf"] = "fast"
    """Encoder attention: "fast" (fused kernels, common/recformer_attention.py) or "hf" (Hugging Face's Longformer
    attention, the reference); the same function and weights."""
    max_steps: Annotated[int | None, Positive] = None
    """Optimizer steps per stage at most (the LR schedule is sized to it); the stage then validates and saves as
    usual. None: no limit."""
    stages: Literal[1, 2] = 2
    """Stages to run: 2 = the paper's two stages; 1 = stage 1 only (all that export of <out>/stage1 needs)."""


def optimizer_and_schedule(model: torch.nn.Module, args: Args, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights; linear warm-up, then linear decay to 0 at total_steps."""
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return step / max(1, args.warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_examples(data: SeqDataset, max_items: int, rng: np.random.Generator):
    """(histories (U, max_items), labels (U,)) in random user order: one random training position per user."""
    rows = rng.permutation(np.flatnonzero(data.train_len > 0))
    targets = (rng.random(len(rows)) * data.train_len[rows]).astype(np.int64)
    labels = data.items[data.offsets[rows] + targets]
    return data.left_padded(rows, targets, max_items), labels


def table_fingerprint(table: torch.Tensor) -> str:
    return hashlib.sha256(table.detach().cpu().numpy().tobytes()).hexdigest()[:12]


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Replace every trainable parameter's gradient by its mean over the processes, in one all-reduce (a process
    that saw no example this step contributes zeros)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for param, mean in zip(params, _unflatten_dense_tensors(flat, grads)):
        param.grad = mean


class Trainer:
    """The state one fine-tuning run shares between its stages: model, item tokens, device, precision.

    weights_version counts changes of the weights (optimizer steps, loads); the item table remembers the version it
    was encoded from, so a refresh with nothing changed since (the untrained evaluation's table at the start of
    stage 1) costs nothing. With world > 1 (a process group is set up), rank 0's weights are copied to every
    process, which then keep equal weights: equal averaged gradients, equal optimizer steps.
    """

    def __init__(
        self, args: Args, data: SeqDataset, model: RecformerForSeqRec, tokenizer: RecformerTokenizer,
        device: torch.device | None = None, rank: int = 0, world: int = 1,
    ):  # fmt: skip
        self.args, self.data, self.model, self.tokenizer = args, data, model, tokenizer
        self.device = device or resolve_device(args.device)
        self.rank, self.world = rank, world
        self.dtype = precision(args.dtype, self.device)
        self.tokens: ItemTokens = dataset_item_tokens(tokenizer, data)
        self.max_items = model.config.max_item_embeddings - 1
        self.token_budget = args.batch_size * model.config.max_token_num
        self.rng = np.random.default_rng(args.seed)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.weights_version, self.table_version = 0, None
        model.to(self.device)
        if world > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
            torch.manual_seed(args.seed + rank)  # dropout differs between the processes, as between examples

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def refresh_table(self) -> None:
        """Encode the item table with the current encoder, unless it already was since the weights last changed."""
        if self.table_version == self.weights_version:
            return
        began = time.time()
        table = encode_items(
            self.model.longformer, self.tokens, batch_size=self.args.encode_batch_size, device=self.device,
            autocast_dtype=self.dtype, sharded=self.world > 1,
        )  # fmt: skip
        self.model.set_item_table(table)
        self.table_version = self.weights_version
        seconds = time.time() - began
        print(f"item table: {self.data.num_items} items in {seconds:.1f} s, {self.data.num_items / seconds:.1f} "
              f"items/s on {self.world} process(es)")

    def chunks(self, histories: np.ndarray) -> list[np.ndarray]:
        """Row indices of `histories` grouped by token length (see CALL_TOKENS), each group one encoder call."""
        lengths = sequence_token_counts(self.tokens, histories, self.model.config)
        return token_budget_chunks(lengths, self.token_budget, CALL_TOKENS)

    def encode(self, histories: np.ndarray) -> torch.Tensor:
        """Pooled sequence vectors (B, H) of histories (B, L), one encoder call."""
        batch = to_device(build_batch(self.tokens, histories, self.model.config), self.device)
        with self.autocast():
            return self.model(**batch)

    def pooled(self, histories: np.ndarray) -> torch.Tensor:
        """Pooled sequence vectors (B, H) of histories (B, L), encoded in groups of similar token length."""
        chunks = self.chunks(histories)
        pooled = torch.cat([self.encode(histories[rows]) for rows in chunks])
        return pooled[torch.from_numpy(np.argsort(np.concatenate(chunks))).to(self.device)]

    @property
    def examples_per_step(self) -> int:
        return self.args.batch_size * self.args.grad_accum * self.world

    def train_epoch(self, optimizer, schedule, desc: str, max_steps: int) -> tuple[float, int, int]:
        """One pass over the users, at most max_steps optimizer steps; returns (mean loss per example, steps,
        examples), all over every process.

        Each step's examples_per_step examples (every world-th of them on this process) run in groups of similar
        token length; each group's mean loss is weighted by its share of the step's examples (times world, as the
        processes' gradients are averaged), so the step's gradient is that of the step's mean loss, however the
        examples are grouped and shared.
        """
        self.model.train()
        histories, labels = training_examples(self.data, self.max_items, self.rng)  # the same on every process
        per_step = self.examples_per_step
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no host sync per call
        seen, steps = 0, 0
        bar = progress(range(0, len(labels), per_step), desc=desc, leave=False)
        for begin in bar:
            step_rows = np.arange(begin, min(begin + per_step, len(labels)))
            local_rows = step_rows[self.rank :: self.world]
            for rows in self.chunks(histories[local_rows]) if len(local_rows) else []:
                rows = local_rows[rows]
                label = torch.from_numpy(labels[rows]).to(self.device)
                loss = self.model.loss(self.encode(histories[rows]), label, self.args.finetune_negatives)
                self.scaler.scale(loss * (len(rows) * self.world / len(step_rows))).backward()
                total += loss.detach().double() * len(rows)
            seen += len(local_rows)
            if self.world > 1:
                average_gradients(self.model, self.world)
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            self.weights_version += 1
            steps += 1
            if steps % 10 == 0:  # reading the loss waits for the device, so not every step
                bar.set_postfix(loss=f"{float(total) / max(1, seen):.4f}")
            if steps == max_steps:
                break
        if self.world > 1:
            sums = torch.stack([total, total.new_tensor(seen)])
            dist.all_reduce(sums)
            total, seen = sums[0], int(sums[1].item())
        return float(total) / max(1, seen), steps, seen

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()

        def scorer(histories: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
            return self.model.scores(self.pooled(histories.cpu().numpy()), candidates)

        return evaluate(
            scorer, self.data, split, max_len=self.max_items, sample_size=self.args.sample_size,
            device=self.device, batch_size=self.args.eval_batch_size, sharded=self.world > 1,
        )  # fmt: skip

    def save(self, directory: Path) -> None:
        """Checkpoint directory plus the item table the stage's validation used (rank 0 writes it)."""
        if self.rank != 0:
            return
        table = self.model.item_table
        save_checkpoint(
            directory, self.model, self.tokenizer,
            extra=lambda tmp: save_item_embeddings(tmp / TABLE_FILE, table, self.data, str(directory)),
        )  # fmt: skip

    def load(self, directory: Path) -> None:
        """Weights and item table of a directory written by save()."""
        if self.world > 1:
            dist.barrier()  # rank 0 has finished writing it
        state = load_file(str(directory / "model.safetensors"))
        self.model.load_state_dict(state)
        self.model.set_item_table(load_item_embeddings(directory / TABLE_FILE, self.data))
        self.weights_version += 1
        self.table_version = None  # the saved table was encoded at the start of that epoch, by older weights

    def run_stage(self, stage: int, run_dir: Path, refresh_every_epoch: bool) -> float:
        """Train one stage with early stopping; the best model goes to run_dir/stage<k>; returns its val NDCG@10."""
        examples = len(np.flatnonzero(self.data.train_len > 0))
        total_steps = -(-examples // self.examples_per_step) * self.args.epochs
        if self.args.max_steps is not None:
            total_steps = min(total_steps, self.args.max_steps)
        optimizer, schedule = optimizer_and_schedule(self.model, self.args, total_steps)
        stopper = EarlyStopping(self.args.patience)
        done = 0
        for epoch in range(1, self.args.epochs + 1):
            began = time.time()
            if refresh_every_epoch:
                self.refresh_table()
            training_began = time.time()
            loss, steps, trained = self.train_epoch(optimizer, schedule, f"stage {stage} epoch {epoch}",
                                                    total_steps - done)  # fmt: skip
            done += steps
            seconds = time.time() - began
            throughput = trained / (time.time() - training_began)
            began = time.time()
            val = self.evaluate("val")
            record = {
                "stage": stage, "epoch": epoch, "steps": done, "train_loss": loss, "train_seconds": seconds,
                "val_seconds": time.time() - began, **val,
            }  # fmt: skip
            self.log(run_dir, {**record, "item_table": table_fingerprint(self.model.item_table)})
            print(f"stage {stage} epoch {epoch}: loss {loss:.4f}, {throughput:.1f} sequences/s, "
                  f"val ({val['protocol']}) {BEST_METRIC} {val[BEST_METRIC]:.4f}")
            if stopper.update(val[BEST_METRIC]):
                self.save(run_dir / f"stage{stage}")
            if stopper.should_stop or done >= total_steps:
                break
        return stopper.best

    def log(self, run_dir: Path, record: dict) -> None:
        """One metrics.jsonl line (rank 0 writes it)."""
        if self.rank == 0:
            append_jsonl(run_dir / "metrics.jsonl", record)


def fill_caches(data: SeqDataset, tokenizer: RecformerTokenizer, sample_size: int) -> None:
    """Write the dataset's token and negatives caches (on rank 0, before the other processes read them)."""
    dataset_item_tokens(tokenizer, data)
    if sample_size > 0:
        sample_negatives(data, sample_size)


def start(args: Args) -> Trainer:
    """Flags, data, process group (when launched on many processes), model: a one-line error for bad input."""
    try:
        check_run_dir(args.out, args.overwrite, args)
        data = load_dataset(args.data)
        require_users(data, "val", "test")
        check_sample_size(data, args.sample_size)
        if launched_processes() > 1:
            rank, world, device = init_distributed(args.device)
        else:
            rank, world, device = 0, 1, resolve_device(args.device)
        silence_other_ranks(rank)
        model, tokenizer = load_backbone(args.backbone, RecformerForSeqRec, item_texts(data))
        set_attention(model, args.attention)
        if world > 1:
            rank0_first(lambda: fill_caches(data, tokenizer, args.sample_size))
        return Trainer(args, data, model, tokenizer, device, rank, world)
    except (DatasetError, BackboneError, EmbeddingFileError, OutputError, LaunchError) as error:
        raise SystemExit(f"error: {error}") from None


def main(args: Args) -> Trainer:
    """Fine-tune (or, with --epochs 0, evaluate zero-shot); returns the trainer (tests compare the processes)."""
    seed_everything(args.seed)
    trainer = start(args)
    if args.fix_word_embedding:
        trainer.model.longformer.embeddings.word_embeddings.weight.requires_grad_(False)
    run_dir = from_rank0(
        lambda: create_run_dir(args.out, "finetune", args.data, args.tag, args, overwrite=args.overwrite)
    )
    print(f"run directory: {run_dir}")

    trainer.refresh_table()
    untrained = trainer.evaluate("val")
    trainer.log(run_dir, {"stage": 0, "epoch": 0, **untrained})
    print(f"untrained: val ({untrained['protocol']}) {BEST_METRIC} {untrained[BEST_METRIC]:.4f}")

    if args.epochs == 0:  # zero-shot: the checkpoint as given
        stage, best = 0, {0: untrained[BEST_METRIC]}
    else:
        best = {1: trainer.run_stage(1, run_dir, refresh_every_epoch=True)}
        if args.stages == 2:
            trainer.load(run_dir / "stage1")
            trainer.refresh_table()
            best[2] = trainer.run_stage(2, run_dir, refresh_every_epoch=False)
        stage = max(best, key=best.get)  # on a tie, stage 1
        trainer.load(run_dir / f"stage{stage}")
    test = trainer.evaluate("test")
    if trainer.rank == 0:
        write_json_atomic(run_dir / "test_metrics.json", {**test, "stage": stage, f"val_{BEST_METRIC}": best[stage]})
    print(result_line(f"test, stage {stage} model" if stage else "test, zero-shot", test))
    return trainer


if __name__ == "__main__":
    main(parse_launched(Args))
    leave_process_group()
