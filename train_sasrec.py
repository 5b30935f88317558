"""SASRec (Kang & McAuley, 2018) whose item table can start from a language model's item vectors.

The last stage of the pipeline: `export_embeddings.py` writes <data>/embeddings/plm.safetensors, and
`--init-type plm` copies those vectors into the item table, which then trains with the rest of the model (as in the
paper). The model follows the paper's code: item table shared between input and output scoring, inputs scaled by
sqrt(d), learned positions, causal blocks where the layer-normed input is both the attention query and the residual
(Q = LN(x); x = Q + Attn(Q, x, x); x = LN(x); x = x + FFN(x)), padding zeroed after every block, a final LayerNorm,
and Xavier-normal initialisation of every matrix.

Loss coupling (kept from the paper's code): with `--loss auto` the model trains with binary cross-entropy and one
sampled negative per position when evaluation uses sampled negatives (`--sample-size` > 0), and with softmax
cross-entropy over all items when it ranks every item. `--loss bce` / `--loss ce` choose explicitly.

Not reproduced from the paper's code (its defects): its batch sampler's worker processes share one random state, so
an epoch repeats batches; here an epoch is one pass over the users in a fresh random order. Its full cross-entropy
also trains on padding targets and ranks item 0; here padding is never a target nor a candidate. Attention never looks
at padding and positions count from the newest item, so left padding does not change any output.

    python train_sasrec.py --data data/synthetic --init-type plm --sample-size 100
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from common.cli import Checked, Device, Dtype, NonNegative, OutputDir, Positive, Seed, between, parse
from common.data import PAD, DatasetError, SeqDataset, load_dataset
from common.embeddings import announce_item_table, plm_init, refuse_plm_flags_without_plm, run_tag
from common.evaluation import (
    Scorer,
    check_sample_size,
    evaluate,
    metric_names,
    metric_scalars,
    require_users,
    result_line,
)
from common.run import (
    EarlyStopping,
    InputError,
    Scalars,
    allocate,
    append_jsonl,
    autocast,
    check_run_dir,
    create_run_dir,
    ending_in_one_line,
    precision,
    progress,
    resolve_device,
    save_atomic,
    seed_everything,
    write_json_atomic,
)
from common.seqrec import attention_mask, hidden_at, last_hidden, right_aligned_positions

BEST_METRIC = "NDCG@10"  # validation metric that picks the best epoch (the paper's)


@dataclass
class Args(Checked):
    data: Path = Path("data/synthetic")
    """Dataset directory (written by prepare_data.py)."""
    out: Annotated[Path | None, OutputDir] = None
    """Run directory; default runs/sasrec/<dataset>-<none or plm-TRANSFORM>-<timestamp>/."""
    overwrite: bool = False
    """Empty a non-empty --out before the run (by default such an --out is refused, so no run mixes with another)."""
    init_type: Literal["none", "plm"] = "none"
    """Item table start: "none" = Xavier-normal random, "plm" = the vectors in --embeddings."""
    embeddings: Path | None = None
    """PLM item-embedding file (ours, or the paper's torch-saved tensor); default <data>/embeddings/plm.safetensors."""
    embeddings_smap: Path | None = None
    """smap.json ({item key: id}) whose numbering the rows of a bare-tensor --embeddings file (the paper's) follow;
    the rows are reordered to this dataset's ids. Not needed for datasets imported by prepare_data.py paper or
    recformer from that smap."""
    project: Literal["none", "pca"] = "none"
    """"pca" reduces PLM vectors wider than --hidden-size by PCA over the items; "none" requires equal sizes."""
    init_transform: Literal["none", "center", "whiten"] = "none"
    """PLM vectors as copied into the table: "none" as they are (the paper), "center" minus the mean item vector,
    "whiten" PCA-whitened; both rescaled to the std of the model's Xavier initialisation (after --project)."""
    freeze_embeddings: bool = False
    """Keep a PLM-initialised item table fixed (the paper trains it); ignored with --init-type none."""
    sample_size: int = 100
    """Negatives per user in evaluation (the paper uses 100 or -1; 100 in every stage); <= 0 ranks the target
    against every item."""
    loss: Literal["auto", "bce", "ce"] = "auto"
    """"bce": one sampled negative per position; "ce": softmax over all items; "auto": bce if --sample-size > 0."""
    epochs: Annotated[int, Positive] = 200
    """Maximum number of passes over the training users."""
    patience: Annotated[int, Positive] = 10
    """Stop after this many validations without a new best NDCG@10."""
    batch_size: Annotated[int, Positive] = 128
    """Training sequences per optimiser step."""
    lr: Annotated[float, NonNegative] = 1e-4
    """Adam learning rate (betas 0.9, 0.98 as in the paper)."""
    hidden_size: Annotated[int | None, Positive] = None
    """Width d of item vectors and of the transformer; default 768 (the paper), or with --init-type plm the
    embedding file's dimension (768 for the paper's Longformer)."""
    num_blocks: Annotated[int, Positive] = 2
    """Number of self-attention blocks."""
    num_heads: Annotated[int, Positive] = 1
    """Attention heads per block."""
    dropout: Annotated[float, between(0, 1, high_open=True)] = 0.5
    """Dropout on embeddings, attention weights and feed-forward layers."""
    max_len: Annotated[int, Positive] = 50
    """Most recent items a sequence keeps."""
    seed: Annotated[int, Seed] = 42
    """Seed for initialisation, batch order and negatives."""
    device: Annotated[str, Device] = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ..."""
    dtype: Dtype = "auto"
    """Autocast precision; "auto" is bfloat16 on CUDA with bf16 support, else float32. float16 uses loss scaling."""
    compile: bool = False
    """Compile the model with torch.compile."""
    chunk_rows: Annotated[int, Positive] = 16
    """Batches are sorted by sequence length and run in chunks of this many rows, each trimmed to its longest
    sequence, so padding costs (almost) no compute; a value >= the batch size runs one batch (trimmed)."""
    eval_batch_size: Annotated[int, Positive] = 1024
    """Users per evaluation batch."""
    log_every: Annotated[int, Positive] = 10
    """Optimizer steps between TensorBoard points of the training loss (the mean since the last point) and the
    progress bar's loss."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <out>/tensorboard/ (local event files; nothing is sent anywhere)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_plm_flags_without_plm(self)


class CausalBlock(nn.Module):
    """One SASRec block: Q = LN(x); x = Q + Attn(Q, x, x) (causal); x = LN(x); x = x + FFN(x)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        # One (3d, d) projection as in torch's MultiheadAttention (the paper's layer), so that Xavier initialisation
        # draws it at the paper's scale; queries read the normed input, keys and values the raw one.
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout)
        )
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, L, d), mask (B, 1, L, L) -> (B, L, d), or (B, 1, d) for the newest position only if last_only."""
        dim = x.shape[-1]
        query = self.attn_norm(x[:, -1:] if last_only else x)
        q_weight, kv_weight = self.in_proj.weight.split([dim, 2 * dim])
        q_bias, kv_bias = self.in_proj.bias.split([dim, 2 * dim])
        q = F.linear(query, q_weight, q_bias)
        k, v = F.linear(x, kv_weight, kv_bias).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b l (h e) -> b h l e", h=self.heads) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, :, -q.shape[2] :], dropout_p=self.dropout if self.training else 0.0
        )
        x = query + self.out_proj(rearrange(attended, "b h l e -> b l (h e)"))
        x = self.ff_norm(x)
        return x + self.ff(x)


class SASRec(nn.Module):
    def __init__(self, num_items: int, args: Args):
        super().__init__()
        self.max_len, self.num_items = args.max_len, num_items
        self.item_emb = nn.Embedding(num_items + 1, args.hidden_size, padding_idx=PAD)
        self.pos_emb = nn.Embedding(args.max_len, args.hidden_size)
        self.emb_dropout = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(args.hidden_size, args.num_heads, args.dropout) for _ in range(args.num_blocks)
        )
        self.final_norm = nn.LayerNorm(args.hidden_size, eps=1e-8)
        for parameter in self.parameters():
            if parameter.dim() >= 2:
                nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.item_emb.weight[PAD] = 0.0

    def forward(self, seqs: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """seqs (B, L) left-padded item ids -> hidden states (B, L, d); position t has seen items up to t.

        last_only: the last block computes the newest position only (B, 1, d), all evaluation needs.
        """
        real = (seqs != PAD).unsqueeze(-1)
        x = self.item_emb(seqs) * self.item_emb.embedding_dim**0.5
        x = x + self.pos_emb(right_aligned_positions(seqs.shape[1], self.max_len, seqs.device))
        x = self.emb_dropout(x) * real
        mask = attention_mask(seqs, causal=True)
        for i, block in enumerate(self.blocks):
            newest_only = last_only and i == len(self.blocks) - 1
            x = block(x, mask, newest_only)
            x = x * real[:, -x.shape[1] :]
        return self.final_norm(x)


def xavier_item_std(num_items: int, dim: int) -> float:
    """Element std of SASRec's random item table: Xavier normal of a (num_items + 1, dim) matrix."""
    return (2.0 / (num_items + 1 + dim)) ** 0.5


def next_item_pairs(data: SeqDataset, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, inputs, targets) for the users with at least two training items.

    inputs (U, max_len) are the last max_len training items before the final one, left-padded; targets (U, max_len)
    hold the item that follows each input position (PAD where the input is padding).
    """
    window = torch.from_numpy(data.train_matrix(max_len + 1))
    inputs, targets = window[:, :-1], window[:, 1:]
    targets = torch.where(inputs != PAD, targets, PAD)
    keep = (targets != PAD).any(dim=1)
    return torch.arange(data.num_users)[keep], inputs[keep], targets[keep]


def training_history_keys(data: SeqDataset) -> torch.Tensor:
    """Sorted keys row * (num_items + 1) + item of every (user row, training item) pair, for membership tests.

    A flat sorted array costs one integer per interaction (a users x items bitmap would not fit large catalogues).
    """
    keys = data.user_item_keys(data.train_len)
    distinct_per_row = np.bincount(keys // (data.num_items + 1), minlength=data.num_users)
    if (distinct_per_row >= data.num_items).any():
        user = data.user_keys[int(np.argmax(distinct_per_row >= data.num_items))]
        raise DatasetError(
            f"{data.path}: user {user!r} has every item in training, so no negative exists (use --loss ce)"
        )
    return torch.from_numpy(keys)


def draw_negatives(users: torch.Tensor, targets: torch.Tensor, history_keys: torch.Tensor, num_items: int):
    """(B, L) one item per target position, uniform over the items outside that user's training history; PAD elsewhere.

    Draws are redrawn where they hit the history (binary search in history_keys) until none does.
    """
    stride = num_items + 1
    needed = targets != PAD
    negatives = torch.randint(1, stride, targets.shape, device=targets.device)
    while True:
        keys = users[:, None] * stride + negatives
        found = history_keys[torch.searchsorted(history_keys, keys).clamp(max=len(history_keys) - 1)] == keys
        redraw = found & needed
        count = int(redraw.sum())
        if count == 0:
            return negatives.masked_fill(~needed, PAD)
        negatives[redraw] = torch.randint(1, stride, (count,), device=targets.device)


def bce_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor):
    """hidden (N, d); targets, negatives (N,): mean BCE of the positive logits plus that of the negative logits."""
    positive = (hidden * table[targets]).sum(-1)
    negative = (hidden * table[negatives]).sum(-1)
    ones, zeros = torch.ones_like(positive), torch.zeros_like(negative)
    return F.binary_cross_entropy_with_logits(positive, ones) + F.binary_cross_entropy_with_logits(negative, zeros)


def ce_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden (N, d); targets (N,): softmax cross-entropy over items 1..n (padding is not a class)."""
    return F.cross_entropy(hidden @ table[1:].T, targets - 1)


def batch_loss(
    model: SASRec,
    users: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    history_keys: torch.Tensor | None,
    loss_name: str,
    args: Args,
) -> torch.Tensor:
    """Loss of one batch: users (B,), inputs and targets (B, max_len); `model` may be its torch.compile wrapper."""
    hidden, index = hidden_at(model, inputs, targets != PAD, args.chunk_rows)  # (N, d), (N,)
    positives = targets.reshape(-1)[index]
    table = model.item_emb.weight
    if loss_name == "ce":
        return ce_loss(hidden, table, positives)
    negatives = draw_negatives(users, targets, history_keys, model.num_items)
    return bce_loss(hidden, table, positives, negatives.reshape(-1)[index])


def make_scorer(model: SASRec, args: Args, device: torch.device) -> Scorer:
    """The evaluation view of the model (or of its torch.compile wrapper): the newest position's output dotted with
    the item table."""

    def scorer(histories: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """histories (B, L) -> scores (B, C) of candidates (B, C), or (B, num_items + 1) of every item."""
        with autocast(device, args.dtype):
            hidden = last_hidden(model, histories, args.chunk_rows).float()  # (B, d)
        table = model.item_emb.weight
        if candidates is None:
            return hidden @ table.T
        return torch.einsum("bd,bcd->bc", hidden, table[candidates])

    return scorer


def evaluate_split(
    model: SASRec,
    data: SeqDataset,
    split: str,
    args: Args,
    device: torch.device,
) -> dict[str, float]:
    """Metrics of `split` ("val" or "test"; see common.evaluation.evaluate), in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return evaluate(
            make_scorer(model, args, device),
            data,
            split,
            max_len=args.max_len,
            sample_size=args.sample_size,
            device=device,
            batch_size=args.eval_batch_size,
        )


def main(args: Args) -> dict[str, float]:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    loss_name = args.loss if args.loss != "auto" else ("bce" if args.sample_size > 0 else "ce")
    check_run_dir(args.out, args.overwrite, args)
    data = load_dataset(args.data)
    require_users(data, "val", "test")
    check_sample_size(data, args.sample_size)
    users, inputs, targets = next_item_pairs(data, args.max_len)
    history_keys = training_history_keys(data).to(device) if loss_name == "bce" else None
    table, width = plm_init(data, args, lambda dim: xavier_item_std(data.num_items, dim))
    item_table = announce_item_table(data, args)
    args = dataclasses.replace(args, hidden_size=width)
    if args.hidden_size % args.num_heads:
        raise InputError(f"--num-heads: hidden size {args.hidden_size} is not divisible by {args.num_heads} heads")
    model = allocate(lambda: SASRec(data.num_items, args), "--hidden-size", args.hidden_size)
    if table is not None:
        model.item_emb.weight.data.copy_(table)
        model.item_emb.weight.requires_grad_(not args.freeze_embeddings)
    if len(users) == 0:
        raise DatasetError(f"{args.data}: no user has two training items to learn from")
    model.to(device)
    users, inputs, targets = users.to(device), inputs.to(device), targets.to(device)
    # As nanoGPT does it: with --compile `model` becomes torch.compile's wrapper, which runs the forward passes and
    # reads through to the same parameters and attributes; `raw_model` is what the optimiser and checkpoints use.
    raw_model = model
    if args.compile:
        model = torch.compile(model, dynamic=True)
    optimizer = torch.optim.Adam([p for p in raw_model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler(device.type, enabled=precision(args.dtype, device) == torch.float16)
    run_dir = create_run_dir(
        args.out, "sasrec", args.data, run_tag(item_table), args, overwrite=args.overwrite, item_table=item_table
    )
    print(f"{data.name}: {len(users)} training sequences, {data.num_items} items, loss {loss_name}, run {run_dir}")
    # TensorBoard curves, all at x = optimizer steps so far: train/loss and train/lr every --log-every steps,
    # train/sequences_per_s and val/* at the end of each epoch, test/* at the end of the tested (best) epoch; the
    # flags as hyperparameters.
    scalars = Scalars(run_dir, args.tensorboard)
    scalars.hyperparameters(args, [f"test/{name}" for name in metric_names()])
    checkpoint = run_dir / "best.pt"

    # The paper's schedule: validate after every epoch, keep the best model by validation NDCG@10, stop after
    # --patience epochs without a new best, then test the best model once.
    stopper, best_epoch, best_step, step = EarlyStopping(args.patience), 0, 0, 0
    loss_since_point = torch.zeros((), device=device)  # summed on the device: read only every --log-every steps
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        batches = torch.randperm(len(users), device=device).split(args.batch_size)
        epoch_loss = torch.zeros((), device=device)
        bar = progress(batches, desc=f"epoch {epoch}", leave=False)
        for epoch_step, batch in enumerate(bar, start=1):
            with autocast(device, args.dtype):
                loss = batch_loss(
                    model, users[batch], inputs[batch], targets[batch], history_keys, loss_name, args
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            epoch_loss += loss.detach()
            loss_since_point += loss.detach()
            step += 1
            if step % args.log_every == 0:  # reading the loss waits for the device, so not every step
                epoch_sum, point_sum = torch.stack([epoch_loss, loss_since_point]).tolist()
                bar.set_postfix(loss=f"{epoch_sum / epoch_step:.4f}")
                lr = optimizer.param_groups[0]["lr"]
                scalars.add(step, **{"train/loss": point_sum / args.log_every, "train/lr": lr})
                loss_since_point.zero_()
        train_loss = float(epoch_loss) / len(batches)
        seconds = time.perf_counter() - started

        val = evaluate_split(model, data, "val", args, device)
        record = {"epoch": epoch, "train_loss": train_loss, "train_seconds": seconds, **val}
        append_jsonl(run_dir / "metrics.jsonl", record)
        scalars.add(step, **{"train/sequences_per_s": len(users) / seconds})
        scalars.add(step, **metric_scalars("val", val))
        print(f"epoch {epoch}: loss {train_loss:.4f}, val ({val['protocol']}) {BEST_METRIC} {val[BEST_METRIC]:.4f}, "
              f"HR@10 {val['HR@10']:.4f}")
        if stopper.update(val[BEST_METRIC]):
            best_epoch, best_step = epoch, step
            state = {"model": raw_model.state_dict(), "epoch": epoch}
            save_atomic(checkpoint, lambda tmp: torch.save(state, tmp))
        if stopper.should_stop:
            break

    raw_model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["model"])
    began = time.perf_counter()
    test = evaluate_split(model, data, "test", args, device)
    record = {**test, "best_epoch": best_epoch, f"val_{BEST_METRIC}": stopper.best,
              "test_seconds": time.perf_counter() - began}  # fmt: skip
    write_json_atomic(run_dir / "test_metrics.json", record)
    scalars.add(best_step, **metric_scalars("test", test))
    scalars.close()
    print(result_line("test", test))
    return test


if __name__ == "__main__":
    with ending_in_one_line("best.pt"):
        main(parse(Args))
