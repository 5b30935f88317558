"""Recformer pre-training under DeepSpeed: item-item contrastive learning plus whole-word masked LM.

Reads a corpus in the paper's layout (`train.json`, `dev.json`: lists of item-key sequences in time order;
`meta_data.json`: {item key: {attribute: text}}), e.g. one built by `prepare_data.py pretrain-corpus`. Each sequence
gives one pair per epoch: a target position drawn uniformly from [(len-1)//2, len-1]; side a = the items before it,
side b = the target item alone. Loss = cross-entropy of cosine(pooled a, pooled b) / temp over the whole global batch
(embeddings all-gathered across ranks) + mlm_weight * whole-word masked-LM loss on each side.

Launch any of these ways (CPU: gloo; GPU: nccl):
    python pretrain_recformer.py --data data/corpus --backbone tiny --out runs/pretrain/demo
    torchrun --nproc_per_node 2 pretrain_recformer.py --data data/corpus --zero-stage 2
    deepspeed pretrain_recformer.py --zero-stage 2 --data data/corpus
Outputs under --out: `deepspeed/` (DeepSpeed's own checkpoints, for --resume), `best/` (the checkpoint with the best
dev accuracy so far) and `final/` (the last weights): consolidated fp32 Recformer checkpoint directories that
`finetune_recformer.py --backbone` and `export_embeddings.py --checkpoint` read as is; `metrics.jsonl` (losses,
learning rate, train accuracy, encoder tokens/s and peak memory every --log-every steps; dev accuracy and loss) and
the same curves, but peak memory, as TensorBoard scalars in `tensorboard/` (unless --no-tensorboard).
A run is deterministic for a given seed and number of processes: data order, pairs, masks and dropout are drawn from
seeds derived from (seed, epoch or step, rank), so --resume reproduces the uninterrupted run.
"""

import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.utils import safe_get_full_fp32_param
from torch._utils import _unflatten_dense_tensors

from common.cli import Checked, Dtype, NonNegative, OutputDir, Positive, Seed, between
from common.data import DatasetError, Sequences, item_attributes, read_json
from common.distributed import (
    from_rank0,
    init_distributed,
    leave_process_group,
    parse_launched,
    rank0_first,
    silence_other_ranks,
)
from common.recformer_data import build_batch, cached_item_tokens
from common.run import (
    InputError,
    Scalars,
    append_jsonl,
    check_run_dir,
    check_same_run,
    create_run_dir,
    ending_in_one_line,
    parameter_groups,
    precision,
    progress,
    save_atomic,
    to_device,
)
from recformer.convert_recformer import load_backbone, save_checkpoint
from recformer.modeling_recformer import IGNORE_INDEX, RecformerForPretraining, set_attention
from recformer.tokenization_recformer import NAME_TYPE, VALUE_TYPE, ItemTokens


@dataclass
class Args(Checked):
    data: Path = Path("data/corpus")
    """corpus directory with train.json, dev.json and meta_data.json (`prepare_data.py pretrain-corpus` builds one)"""
    backbone: str = "tiny"
    """model to start from: any form `recformer/convert_recformer.py` loads (Longformer MLM, BERT/RoBERTa encoder,
    Recformer checkpoint directory, the paper's .bin files, `tiny`, or `minilm`)"""
    out: Annotated[Path | None, OutputDir] = None
    """run directory (default runs/pretrain/<corpus>-<backbone>-<timestamp>)"""
    overwrite: bool = False
    """empty a non-empty --out first (by default it is refused, so no run mixes with another; see --resume)"""
    resume: bool = False
    """continue the run in --out from its latest DeepSpeed checkpoint, exactly where it stopped"""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also the parameters"""
    dtype: Dtype = "auto"
    """training precision: "auto" is bfloat16 on CUDA with bf16 support, else float32; bfloat16 and float16 (CUDA
    only, dynamic loss scaling) run DeepSpeed's mixed precision with fp32 master weights"""
    batch_size: Annotated[int, Positive] = 16
    """sequences per micro-batch on each process"""
    grad_accum: Annotated[int, Positive] = 8
    """micro-batches per optimizer step"""
    lr: Annotated[float, NonNegative] = 5e-5
    """peak learning rate of AdamW"""
    weight_decay: Annotated[float, NonNegative] = 0.0
    """AdamW weight decay (never on biases and LayerNorm weights)"""
    warmup_steps: Annotated[int, NonNegative] = 100
    """optimizer steps of linear warm-up from 0 to --lr; linear decay to 0 follows"""
    clip_grad: Annotated[float, NonNegative] = 1.0
    """gradient clipping: maximum global gradient norm"""
    offload_optimizer: bool = False
    """keep optimizer states in CPU memory (ZeRO stages 1-3)"""
    fix_word_embedding: bool = False
    """freeze the word-embedding table, as the paper does"""
    epochs: Annotated[int, Positive] = 32
    """passes over train.json"""
    max_steps: Annotated[int, NonNegative] = 0
    """stop after this many optimizer steps (0: run all epochs); the schedule still spans all epochs, so a stopped
    run resumes exactly"""
    eval_every: Annotated[int, Positive] = 250
    """optimizer steps between dev evaluations (also evaluated at the end)"""
    save_every: Annotated[int, Positive] = 250
    """optimizer steps between DeepSpeed checkpoints (also saved at the end)"""
    keep_checkpoints: Annotated[int, Positive] = 2
    """DeepSpeed checkpoints kept in <out>/deepspeed (older ones are deleted)"""
    mlm_probability: Annotated[float, between(0, 1, low_open=True, high_open=True)] = 0.15
    """share of each side's text tokens chosen for masked LM, as whole words"""
    seed: Annotated[int, Seed] = 42
    """seeds the weights of new layers, the data order, the pairs, the masks and dropout"""
    log_every: Annotated[int, Positive] = 10
    """optimizer steps between lines in metrics.jsonl"""
    tensorboard: bool = True
    """Write TensorBoard scalars to <out>/tensorboard/ (local event files; nothing is sent anywhere)"""
    attention: Literal["fast", "hf"] = "fast"
    """encoder attention: "fast" (fused kernels, recformer/attention_recformer.py) or "hf" (Hugging Face's Longformer
    attention, the reference); the same function and weights"""


# ---------------------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    path: Path
    item_keys: list[str]  # item_keys[i] = key of item id i; [0] = "" (padding)
    item_text: list[dict[str, str]]  # item_text[i] = attributes of item id i; [0] = {}
    train: Sequences
    dev: Sequences


def read_sequences(path: Path, item_id: dict[str, int]) -> Sequences:
    """A list of item-key lists -> Sequences; every key must be in meta_data.json, every sequence hold 2+ items."""
    raw = read_json(path, list)
    for number, sequence in enumerate(raw):
        if not isinstance(sequence, list) or len(sequence) < 2:
            raise DatasetError(f"{path}: sequence {number} is not a list of at least 2 item keys")
    try:
        return Sequences.from_lengths(map(len, raw), (item_id[key] for sequence in raw for key in sequence))
    except (KeyError, TypeError) as error:
        raise DatasetError(f"{path}: item {error} has no entry in meta_data.json") from None


def load_corpus(path: Path) -> Corpus:
    """The paper's pre-training layout in `path`; item ids follow meta_data.json's order, from 1."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            f"{path}: corpus directory not found; prepare_data.py builds one "
            f"(python prepare_data.py pretrain-corpus --from <dataset dirs> --out {path})"
        )
    meta = read_json(path / "meta_data.json", dict)
    item_keys = ["", *meta]
    item_text = [{}, *(item_attributes(path / "meta_data.json", key, meta[key]) for key in meta)]
    item_id = {key: i for i, key in enumerate(item_keys) if i}
    train, dev = (read_sequences(path / name, item_id) for name in ("train.json", "dev.json"))
    return Corpus(path, item_keys, item_text, train, dev)


def sample_pairs(
    sequences: Sequences, rows: np.ndarray, draws: np.ndarray, history: int
) -> tuple[np.ndarray, np.ndarray]:
    """(side a (B, history) left-padded item ids, side b (B, 1)) for sequences `rows`.

    The target position is uniform in [(len-1)//2, len-1], picked by draws[rows] (uniform in [0, 1)); side a is the
    `history` items before it (fewer, PAD on the left, when the sequence is shorter), side b the target.
    """
    lengths = sequences.lengths[rows]
    first = (lengths - 1) // 2
    position = first + np.floor(draws[rows] * (lengths - first)).astype(np.int64)
    targets = sequences.items[sequences.offsets[rows] + position]
    return sequences.left_padded(rows, position, history), targets[:, None]


# ---------------------------------------------------------------------------------------------- whole-word masking


# Words come from a per-token word-start flag (computed once from the fast tokenizer's word ids when items are
# tokenized), so the same code serves byte-level BPE and WordPiece vocabularies. Everything is tensor ops over the
# whole batch: no per-token Python.


def word_ids(word_start: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """(B, L) index of the word each maskable token belongs to, counted from 0 per row; -1 on other tokens.

    A maskable token opens a new word when it is flagged as a word start or when the token before it is not
    maskable (a word never spans a special token, an item boundary's leading token or padding).
    """
    previous_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
    opens_word = maskable & (word_start | ~previous_maskable)
    ids = torch.cumsum(opens_word.long(), dim=1) - 1
    return torch.where(maskable, ids, torch.full_like(ids, -1))


def choose_words(word_of_token: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, L) bool: tokens of whole words picked in random order until about `probability` of the row is covered.

    As in BERT's whole-word masking, each row has a budget of round(probability * maskable tokens) predictions (at
    least one when it has any maskable token) and takes whole words in a random order; the selection ends at the word
    boundary nearest to the budget (a word is taken while its midpoint lies within the budget), so the masked share
    is `probability` on average, and the first word is always taken.
    """
    batch, length = word_of_token.shape
    maskable = word_of_token >= 0
    slot = word_of_token.clamp(min=0)
    word_length = torch.zeros(batch, length, dtype=torch.long).scatter_add_(1, slot, maskable.long())  # (B, W=L)
    exists = word_length > 0
    keys = torch.rand(batch, length, generator=generator).masked_fill(~exists, float("inf"))
    order = torch.argsort(keys, dim=1)  # existing words first, in random order
    sorted_length = torch.gather(word_length, 1, order)
    before = torch.cumsum(sorted_length, dim=1) - sorted_length  # tokens of the words ahead in the order
    budget = torch.clamp(torch.round(maskable.sum(1) * probability), min=1).long().unsqueeze(1)  # (B, 1)
    first = torch.arange(length).unsqueeze(0) == 0
    within = 2 * before + sorted_length <= 2 * budget  # midpoint of the word within the budget
    take_sorted = torch.gather(exists, 1, order) & (within | first)
    take_word = torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
    return maskable & torch.gather(take_word, 1, slot)


def whole_word_mask(
    input_ids: torch.Tensor,
    word_start: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole words of a (B, L) batch for masked-LM training.

    Args:
        input_ids: (B, L) int64 token ids.
        word_start: (B, L) bool, True on the first token of each word.
        maskable: (B, L) bool, False on special tokens and padding, which are never chosen.
    Returns:
        (mlm_input_ids, labels), both (B, L) int64: of the chosen tokens 80% become `mask_token_id`, 10% a random
        token, 10% stay; labels hold the original id on chosen tokens and IGNORE_INDEX elsewhere.
    """
    chosen = choose_words(word_ids(word_start.bool(), maskable.bool()), probability, generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, masked)
    return masked, labels


# ------------------------------------------------------------------------------------------------------ objective


def gather_keep_local_grad(local: torch.Tensor) -> torch.Tensor:
    """(world * B, H): every rank's rows in rank order; only this rank's own slice carries gradient."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def contrastive_loss(pooled_a: torch.Tensor, pooled_b: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, correct): cross-entropy of cosine / temp between each global a and every global b, labels diagonal.

    pooled_a, pooled_b: (B, H) of this rank. Every other rank's pairs act as extra negatives. Each rank sees the
    same loss value but differentiates only through its own rows; the data-parallel gradient average then divides
    that gradient by the world size, which the caller undoes (see `train_step`).
    """
    a = F.normalize(gather_keep_local_grad(pooled_a).float(), dim=-1)
    b = F.normalize(gather_keep_local_grad(pooled_b).float(), dim=-1)
    scores = a @ b.T / temp  # (N, N)
    labels = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels), (scores.argmax(1) == labels).sum()


class PretrainingPasses(torch.nn.Module):
    """What the DeepSpeed engine runs: the paper's four encoder passes per step.

    Clean sides a and b give the pooled vectors of the contrastive loss; their masked copies give the masked-LM
    losses. One module call, so ZeRO-3 gathers each layer's parameters once per pass.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, side_a: dict, side_b: dict, masked_a: dict | None = None, masked_b: dict | None = None):
        """(pooled a (B, H), pooled b (B, H), masked-LM loss of a + of b, or None without masked inputs)."""
        pooled_a = self.model.longformer(**side_a)[1]
        pooled_b = self.model.longformer(**side_b)[1]
        if masked_a is None:
            return pooled_a, pooled_b, None
        mlm = self.model(**masked_a).mlm_loss + self.model(**masked_b).mlm_loss
        return pooled_a, pooled_b, mlm


def side_inputs(tokens: ItemTokens, ids: np.ndarray, config, device) -> dict[str, torch.Tensor]:
    """Model tensors of one side: ids (B, L) left-padded item ids."""
    return to_device(build_batch(tokens, ids, config), device)


def masked_side_inputs(
    tokens: ItemTokens, ids: np.ndarray, config, mask_token_id: int, probability: float, generator, device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(clean model tensors, whole-word-masked copy with `mlm_labels`) of one side."""
    clean = build_batch(tokens, ids, config, with_word_starts=True)
    word_starts = clean.pop("word_starts")
    text = (clean["token_type_ids"] == NAME_TYPE) | (clean["token_type_ids"] == VALUE_TYPE)  # never leading/padding
    mlm_ids, labels = whole_word_mask(
        clean["input_ids"], word_starts, text, mask_token_id=mask_token_id, vocab_size=config.vocab_size,
        probability=probability, generator=generator,
    )  # fmt: skip
    return to_device(clean, device), to_device(dict(clean, input_ids=mlm_ids, mlm_labels=labels), device)


def train_step(engine, inputs: tuple, temp: float, mlm_weight: float, world: int) -> torch.Tensor:
    """One micro-batch forward and backward (DeepSpeed steps the optimizer at accumulation boundaries).

    Returns (contrastive loss, mlm loss, correct pairs) as one tensor on the device: reading them on the host every
    micro-batch would stall the device queue."""
    pooled_a, pooled_b, mlm = engine(*inputs)
    contrastive, correct = contrastive_loss(pooled_a, pooled_b, temp)
    # Scaled by the world size so that N processes step exactly as one process on the whole global batch: each
    # rank's gradient reaches only its own rows, and DeepSpeed averages (not sums) gradients across ranks.
    engine.backward(world * contrastive + mlm_weight * mlm)
    engine.step()
    return torch.stack([contrastive.detach(), mlm.detach(), correct]).double()


# ---------------------------------------------------------------------------------------------------- checkpoints


def zero0_fp32_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(module parameter): its fp32 master} of DeepSpeed's ZeRO-0 mixed-precision optimizers ({} otherwise).

    With bf16 or fp16 and ZeRO 0 (DeepSpeed 0.19), the engine wraps the optimizer in FP16_UnfusedOptimizer (torch's
    AdamW: `fp32_groups`, one master per parameter) or FP16_Optimizer (fused Adam: `fp32_groups_flat`, one flat
    master per group); `fp16_groups` lists the low-precision module parameters in the same order either way.
    DeepSpeed has no public route to these (safe_get_full_fp32_param and zero_to_fp32 cover ZeRO 1-3 only), hence
    its optimizers' attributes here.
    """
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        per_group = optimizer.fp32_groups
    elif isinstance(optimizer, FP16_Optimizer):
        per_group = [_unflatten_dense_tensors(flat, group)
                     for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups)]  # fmt: skip
    else:
        return {}
    return {
        id(param): master
        for group, masters in zip(optimizer.fp16_groups, per_group)
        for param, master in zip(group, masters)
    }


def consolidated_fp32_state(engine, frozen: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The Recformer's full fp32 weights on rank 0 ({} elsewhere). Collective: every rank must call it.

    DeepSpeed's fp32 master copy is partitioned (ZeRO 1-3) or held by its mixed-precision optimizer (ZeRO 0), and
    the module may hold bf16/fp16 copies; frozen tensors have no master copy, so their fp32 values were kept aside
    before training. Never falls back to a low-precision module tensor: that would save rounded weights as fp32.
    """
    state, full_of = {}, {}
    zero0_masters = zero0_fp32_masters(engine.optimizer)
    for name, param in engine.module.model.named_parameters(remove_duplicate=False):
        if id(param) not in full_of:
            full = frozen.get(name)
            if full is None:
                full = safe_get_full_fp32_param(param)  # gathers across ranks under ZeRO 1-3
            if full is None:
                full = zero0_masters.get(id(param))
            if full is None:
                if param.dtype != torch.float32:
                    raise RuntimeError(f"{name}: no fp32 master copy found for this {param.dtype} parameter")
                full = param.detach()  # ZeRO 0 without mixed precision: the parameter is its own master copy
            full_of[id(param)] = full.float().cpu().clone() if rank == 0 else None
        if rank == 0:
            state[name] = full_of[id(param)]
    return state


def save_recformer(directory: Path, engine, frozen, config, tokenizer, rank: int) -> None:
    """A Recformer checkpoint directory (C's format) of the current fp32 weights, written atomically by rank 0."""
    state = consolidated_fp32_state(engine, frozen, rank)
    if rank == 0:
        with torch.device("meta"):  # no second random initialisation: the tensors come from `state`
            model = RecformerForPretraining(config)
        model.load_state_dict(state, strict=True, assign=True)
        save_checkpoint(directory, model, tokenizer)
    dist.barrier()


def save_deepspeed(engine, directory: Path, step: int, client_state: dict, keep: int, rank: int) -> None:
    """DeepSpeed's checkpoint of everything (model, optimizer, scheduler; every rank writes its shards) plus ours,
    under tag step<N>; then `latest` names it and the --keep-checkpoints newest steps stay.

    DeepSpeed's own `latest` is written by rank 0 once rank 0's files are saved, before the other ranks' shards may
    be, and in place: a kill there leaves it naming a half-written step. So it is written here instead, atomically,
    after save_checkpoint's closing barrier: a step `latest` names is complete, and a step cut by a kill is never
    named (--resume continues from the one before, and the next save replaces it).
    """
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    if rank == 0:
        save_atomic(directory / "latest", lambda tmp: tmp.write_text(tag))
        steps = sorted(p.name for p in directory.glob("step*") if p.is_dir())
        stale = [name for name in steps if name > tag] + [name for name in steps if name <= tag][:-keep]
        for name in stale:  # cut saves of a run resumed from an earlier step, and the oldest complete ones
            shutil.rmtree(directory / name)
    dist.barrier()


MODEL_STATES = "mp_rank_00_model_states.pt"  # the first file of a step that DeepSpeed's load_checkpoint reads


def resume_tag(directory: Path) -> str:
    """The step --resume continues from: the one `latest` names (see save_deepspeed); InputError when there is none."""
    latest = directory / "latest"
    if not latest.is_file():
        raise InputError(f"{directory}: no checkpoint to resume from (no `latest`: no step was saved completely)")
    tag = latest.read_text(encoding="utf-8").strip()
    if not (directory / tag).is_dir():
        raise InputError(f"{directory}: no checkpoint to resume from (`latest` names {tag}, which is missing)")
    if not (directory / tag / MODEL_STATES).is_file():  # lost after the save: DeepSpeed would fail with a traceback
        raise InputError(f"{directory}: no checkpoint to resume from ({tag} has no {MODEL_STATES})")
    return tag


# ----------------------------------------------------------------------------------------------------------- setup

DEV_STREAM, MASK_STREAM = 1_000_003, 1_000_033  # keys that keep the dev and masking random streams apart


def step_seed(*keys: int) -> int:
    """A seed determined by `keys` alone, so a step's random draws depend only on where it is (exact resume)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def epoch_plan(seed: int, epoch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(order of the training sequences, one uniform draw per sequence for its target position) of one epoch.

    Independent of the number of processes: the global batches, and so the losses, are the same for any split.
    """
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(size), rng.random(size)


def fused_adam_builds() -> bool:
    """Whether DeepSpeed's fused Adam can be compiled here (it needs CUDA and a compiler)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import FusedAdamBuilder

    return get_accelerator().device_name() == "cuda" and FusedAdamBuilder().is_compatible(verbose=False)


def deepspeed_config(args: Args, world: int, total_steps: int, dtype: torch.dtype | None) -> dict:
    """DeepSpeed's configuration; dtype is the training precision (None: float32)."""
    torch_adam = not fused_adam_builds()
    zero: dict = {"stage": args.zero_stage}
    if args.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": args.batch_size * args.grad_accum * world,
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": args.clip_grad,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "torch_adam": torch_adam}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": min(args.warmup_steps, total_steps),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": args.lr,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        # DeepSpeed's CPU Adam is a compiled op; torch's AdamW runs on offloaded states as well.
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,
    }


def item_tokens(tokenizer, corpus: Corpus) -> ItemTokens:
    """Every corpus item tokenized once and cached as arrays in <corpus>/recformer_tokens/ (rank 0 writes it)."""
    return rank0_first(lambda: cached_item_tokens(tokenizer, corpus.item_text, corpus.path / "recformer_tokens"))


def shared_run_dir(args: Args) -> Path:
    """The run directory, chosen and created by rank 0 and told to the others (a default name holds a timestamp)."""
    tag = Path(args.backbone).name
    return Path(from_rank0(lambda: create_run_dir(
        args.out, "pretrain", args.data, tag, args, overwrite=args.overwrite, resume=args.resume
    )))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ train


@dataclass
class PretrainingSetup:
    """Everything the training loop reads, fixed once set up."""

    args: Args
    corpus: Corpus
    tokens: ItemTokens
    tokenizer: object  # recformer.tokenization_recformer.RecformerTokenizer
    config: object  # recformer.configuration_recformer.RecformerConfig
    frozen: dict  # fp32 values of frozen parameters, by name
    out: Path
    rank: int
    world: int
    device: torch.device
    micro_per_epoch: int  # micro-batches per epoch (global batches: every rank takes one slice of each)
    stop_step: int
    scalars: Scalars  # TensorBoard curves; does nothing on ranks > 0 and under --no-tensorboard

    @property
    def global_batch(self) -> int:
        return self.args.batch_size * self.world


def micro_batch_inputs(run: PretrainingSetup, micro: int, plan: tuple[np.ndarray, np.ndarray]) -> tuple[dict, ...]:
    """(clean a, clean b, masked a, masked b) model tensors of this rank's slice of global micro-batch `micro`."""
    args = run.args
    order, draws = plan
    index = micro % run.micro_per_epoch
    rows = order[index * run.global_batch + run.rank * args.batch_size :][: args.batch_size]
    generator = torch.Generator().manual_seed(step_seed(args.seed, MASK_STREAM, run.rank, micro))
    sides = sample_pairs(run.corpus.train, rows, draws, run.config.max_item_embeddings - 1)
    (clean_a, masked_a), (clean_b, masked_b) = (
        masked_side_inputs(run.tokens, side, run.config, run.tokenizer.mask_token_id, args.mlm_probability,
                           generator, run.device)
        for side in sides
    )  # fmt: skip
    return clean_a, clean_b, masked_a, masked_b


@torch.no_grad()
def evaluate(run: PretrainingSetup, engine) -> dict:
    """Contrastive loss and accuracy on dev.json, in global batches like training (fixed pairs, no masking)."""
    engine.eval()
    draws = np.random.default_rng([run.args.seed, DEV_STREAM]).random(len(run.corpus.dev))
    batches = len(run.corpus.dev) // run.global_batch
    loss, correct = 0.0, 0
    for i in progress(range(batches), desc="dev", leave=False):
        rows = i * run.global_batch + run.rank * run.args.batch_size + np.arange(run.args.batch_size)
        sides = sample_pairs(run.corpus.dev, rows, draws, run.config.max_item_embeddings - 1)
        pooled_a, pooled_b, _ = engine(*(side_inputs(run.tokens, side, run.config, run.device) for side in sides))
        batch_loss, batch_correct = contrastive_loss(pooled_a, pooled_b, run.config.temp)
        loss += batch_loss.item()
        correct += int(batch_correct)
    engine.train()
    return {"dev_loss": loss / batches, "dev_accuracy": correct / (batches * run.global_batch)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: accelerator memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


# metrics.jsonl name -> TensorBoard tag of the values that get a curve
TENSORBOARD_TAGS = {"loss": "train/loss", "contrastive_loss": "train/contrastive_loss", "mlm_loss": "train/mlm_loss",
                    "train_accuracy": "train/accuracy", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
                    "dev_accuracy": "dev/accuracy", "dev_loss": "dev/loss"}  # fmt: skip


def record_metrics(run: PretrainingSetup, step: int, metrics: dict) -> None:
    """Rank 0: one metrics.jsonl line, and the same values as TensorBoard points at x = optimizer step."""
    if run.rank == 0:
        append_jsonl(run.out / "metrics.jsonl", {"step": step, **metrics})
        run.scalars.add(step, **{TENSORBOARD_TAGS[name]: value for name, value in metrics.items()
                                 if name in TENSORBOARD_TAGS})  # fmt: skip


def log_training(
    run: PretrainingSetup, engine, step: int, micro_step: int, since_log: torch.Tensor, seconds: float
) -> None:
    """Record the training metrics of the steps since the last log; `since_log` is summed over ranks here."""
    dist.all_reduce(since_log)
    # The contrastive terms are the same on every rank; mlm (side a + side b, as in the loss) is averaged over ranks.
    contrastive, mlm, correct, micros = (since_log[:4] / run.world).tolist()
    tokens = since_log[4].item()  # encoder input tokens (without padding) of all four passes on all ranks
    metrics = {
        "epoch": micro_step / run.micro_per_epoch, "lr": engine.get_lr()[0],
        "contrastive_loss": contrastive / micros, "mlm_loss": mlm / micros,
        "loss": (contrastive + run.config.mlm_weight * mlm) / micros,
        "train_accuracy": correct / (micros * run.global_batch),
        "tokens_per_s": tokens / seconds, "peak_memory_mb": peak_memory_mb(run.device),
    }  # fmt: skip
    record_metrics(run, step, metrics)
    if run.rank == 0 and not sys.stderr.isatty():  # no progress bar is drawn into a file or pipe: a line instead
        print(f"step {step}/{run.stop_step}: loss {metrics['loss']:.4f}, train accuracy {metrics['train_accuracy']:.4f}"
              f", lr {metrics['lr']:.2e}, {metrics['tokens_per_s']:.0f} tokens/s", flush=True)


# Flags a resumed run may change: they bound, log or save the run, but do not change what each step computes.
RESUME_MAY_CHANGE = {"out", "overwrite", "resume", "max_steps", "eval_every", "save_every", "keep_checkpoints",
                     "log_every", "attention", "tensorboard"}  # fmt: skip


def main(args: Args) -> tuple[Path, deepspeed.DeepSpeedEngine]:
    """Set up, train; returns the run directory and the engine (tests read each rank's weights from it)."""
    if args.dtype == "float16" and not torch.cuda.is_available():
        raise InputError("--dtype float16: DeepSpeed's float16 training needs CUDA; use bfloat16 on the CPU")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if args.resume and (args.out is None or not (args.out / "deepspeed").is_dir()):
        raise InputError(f"{args.out}: --resume needs --out, a run directory holding deepspeed/")
    if args.resume:
        check_same_run(args.out, args, RESUME_MAY_CHANGE)
    tag = resume_tag(args.out / "deepspeed") if args.resume else None
    if not args.resume:
        check_run_dir(args.out, args.overwrite, args)
    corpus = load_corpus(args.data)  # before any process group: a bad corpus fails fast
    rank, world, device = init_distributed()
    silence_other_ranks(rank)
    torch.manual_seed(args.seed)  # new layers of the backbone start the same on every rank
    model, tokenizer = load_backbone(args.backbone, RecformerForPretraining, texts=corpus.item_text)
    set_attention(model, args.attention)
    tokens = item_tokens(tokenizer, corpus)

    global_batch = args.batch_size * world
    micro_per_epoch = len(corpus.train) // global_batch
    total_steps = args.epochs * micro_per_epoch // args.grad_accum
    if total_steps == 0 or len(corpus.dev) < global_batch:
        raise InputError(
            f"{corpus.path}: {len(corpus.train)} train / {len(corpus.dev)} dev sequences are too few for one "
            f"optimizer step of {global_batch} x {args.grad_accum} sequences and one dev batch of {global_batch}"
        )
    out = shared_run_dir(args)
    print(f"{len(corpus.train)} train / {len(corpus.dev)} dev sequences, {len(corpus.item_keys) - 1} items, "
          f"{world} process(es), {total_steps} optimizer steps of {global_batch * args.grad_accum} sequences")

    if args.fix_word_embedding:
        model.longformer.embeddings.word_embeddings.weight.requires_grad_(False)
    frozen = {name: p.detach().float().clone() for name, p in model.named_parameters() if not p.requires_grad}
    engine, *_ = deepspeed.initialize(
        model=PretrainingPasses(model),
        model_parameters=parameter_groups(model, args.weight_decay),
        config=deepspeed_config(args, world, total_steps, precision(args.dtype, device)),
    )
    state = {"micro_step": 0, "best_accuracy": -1.0}
    if args.resume:
        _, client_state = engine.load_checkpoint(str(out / "deepspeed"), tag=tag)
        state.update({key: client_state[key] for key in state})
        print(f"resumed from step {state['micro_step'] // args.grad_accum}")
    stop_step = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps
    scalars = Scalars(out, enabled=args.tensorboard and rank == 0)  # a resumed run adds to the same directory
    run = PretrainingSetup(args, corpus, tokens, tokenizer, model.config, frozen, out, rank, world, device,
                           micro_per_epoch, stop_step, scalars)  # fmt: skip
    # The loop: optimizer steps from where `state` stands to stop_step; log, evaluate and keep the best, checkpoint.
    # since_log sums, since the last log, contrastive, mlm, correct pairs, micro-batches, tokens; on the device, so
    # no micro-batch waits for a host read and the all-reduce in log_training works under NCCL too.
    since_log = torch.zeros(5, dtype=torch.float64, device=device)
    planned_epoch, plan = -1, None
    began = time.perf_counter()
    first_step = state["micro_step"] // args.grad_accum + 1
    for step in progress(range(first_step, stop_step + 1), desc="pretrain", initial=first_step - 1,
                         total=stop_step):  # fmt: skip
        for _ in range(args.grad_accum):
            micro = state["micro_step"]
            epoch = micro // micro_per_epoch
            if epoch != planned_epoch:
                plan, planned_epoch = epoch_plan(args.seed, epoch, len(corpus.train)), epoch
            inputs = micro_batch_inputs(run, micro, plan)
            torch.manual_seed(step_seed(args.seed, rank, micro))  # dropout
            since_log[:3] += train_step(engine, inputs, model.config.temp, model.config.mlm_weight, world)
            since_log[3] += 1
            since_log[4] += sum(side["attention_mask"].sum() for side in inputs)
            state["micro_step"] += 1
        if step % args.log_every == 0 or step == stop_step:
            log_training(run, engine, step, state["micro_step"], since_log, time.perf_counter() - began)
            since_log.zero_()
            began = time.perf_counter()
        if step % args.eval_every == 0 or step == stop_step:
            scores = evaluate(run, engine)
            record_metrics(run, step, scores)
            if rank == 0:
                print(f"step {step}: dev accuracy {scores['dev_accuracy']:.4f}, dev loss {scores['dev_loss']:.4f}")
            if scores["dev_accuracy"] > state["best_accuracy"]:
                state["best_accuracy"] = scores["dev_accuracy"]
                save_recformer(out / "best", engine, frozen, model.config, tokenizer, rank)
            began = time.perf_counter()  # throughput counts training only
        if step % args.save_every == 0 or step == stop_step:
            save_deepspeed(engine, out / "deepspeed", step, dict(state), args.keep_checkpoints, rank)
            began = time.perf_counter()
    scalars.close()
    save_recformer(out / "final", engine, frozen, model.config, tokenizer, rank)
    print(f"wrote {out / 'final'} (best dev accuracy {state['best_accuracy']:.4f} in {out / 'best'})")
    return out, engine


if __name__ == "__main__":
    with ending_in_one_line("best", "deepspeed", resumable=True):
        main(parse_launched(Args))
    leave_process_group()
