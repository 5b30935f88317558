"""BERT4Rec (Sun et al., 2019) whose item table can start from a language model's item vectors.

The last stage of the pipeline, beside train_sasrec.py: `--init-type plm` copies <data>/embeddings/plm.safetensors
into the token table. As in the paper's code that table is then frozen, with a zero vector for the mask token
(`--no-freeze-embeddings` trains it instead). The model follows the paper's code: vocabulary of items + 2 (0 padding,
items + 1 the mask token), learned positions, bidirectional transformer blocks that never attend to padding, GELU
feed-forward of width 4d, and a separate output layer over the items.

Blocks are post-LayerNorm (x = LN(x + Dropout(Attn(x))); x = LN(x + Dropout(FFN(x))); then dropout), which is what
the paper's code runs: its pre-LN variant is present only as a commented-out line.

Cloze training as in the paper's code: each item is chosen with probability --mask-prob (then 80% mask token, 10% a
random item, 10% kept) and predicted; with probability 0.09 a sequence instead has only its newest item masked.
Evaluation appends the mask token to the history and scores the items at that last position.

Not reproduced from the paper's code (its defects): its gradient accumulation dropped the last partial batch of each
epoch and its metrics averaged per-batch means; here every batch takes a step and metrics are per-user means. Padding
is never a target nor a candidate, and positions count from the newest item, so left padding changes no output.

    python train_bert4rec.py --data data/synthetic --init-type plm --sample-size 100
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from common.cli import Checked, Device, Dtype, NonNegative, OutputDir, Positive, Seed, at_least, between, parse
from common.data import PAD, SeqDataset, load_dataset
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
LAST_ONLY_PROB = 0.09  # the paper's code masks only the newest item of this share of training sequences
RANDOM_TOKEN_STD = 1.0  # the token table keeps nn.Embedding's initialisation, N(0, 1), as the paper's code does


@dataclass
class Args(Checked):
    data: Path = Path("data/synthetic")
    """Dataset directory (written by prepare_data.py)."""
    out: Annotated[Path | None, OutputDir] = None
    """Run directory; default runs/bert4rec/<dataset>-<none or plm-TRANSFORM>-<timestamp>/."""
    overwrite: bool = False
    """Empty a non-empty --out before the run (by default such an --out is refused, so no run mixes with another)."""
    init_type: Literal["none", "plm"] = "none"
    """Token table start: "none" = random (torch's default, as the paper), "plm" = the vectors in --embeddings."""
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
    "whiten" PCA-whitened; both rescaled to the std of the model's random initialisation, N(0, 1) (after --project)."""
    freeze_embeddings: bool = True
    """Keep a PLM-initialised token table fixed, as the paper does; ignored with --init-type none."""
    sample_size: int = 100
    """Negatives per user in evaluation (the paper uses 100); <= 0 ranks the target against every item."""
    mask_prob: Annotated[float, between(0, 1, low_open=True)] = 0.15
    """Probability that a training position is chosen for prediction."""
    epochs: Annotated[int, Positive] = 200
    """Maximum number of passes over the training users."""
    patience: Annotated[int, Positive] = 10
    """Stop after this many validations without a new best NDCG@10."""
    batch_size: Annotated[int, Positive] = 256
    """Training sequences per optimiser step."""
    lr: Annotated[float, NonNegative] = 1e-4
    """Adam learning rate."""
    hidden_size: Annotated[int | None, Positive] = None
    """Width d of item vectors and of the transformer; default 768 (the paper), or with --init-type plm the
    embedding file's dimension (768 for the paper's Longformer)."""
    num_blocks: Annotated[int, Positive] = 2
    """Number of transformer blocks."""
    num_heads: Annotated[int, Positive] = 4
    """Attention heads per block."""
    dropout: Annotated[float, between(0, 1, high_open=True)] = 0.1
    """Dropout on embeddings, attention weights, sublayer outputs and block outputs."""
    max_len: Annotated[int, at_least(2)] = 50
    """Sequence window, including the appended mask token at evaluation (so at least 2)."""
    seed: Annotated[int, Seed] = 42
    """Seed for initialisation, batch order and masking."""
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


class BidirectionalBlock(nn.Module):
    """x = LN(x + Dropout(Attn(x))); x = LN(x + Dropout(FFN(x))); Dropout(x). Attention skips padding keys."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj = nn.Linear(dim, 3 * dim)  # query, key and value projections stacked
        self.out_proj = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ff = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.ff_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, L, d), mask (B, 1, L, L) -> (B, L, d), or (B, 1, d) for the newest position only if last_only."""
        dim = x.shape[-1]
        residual = x[:, -1:] if last_only else x
        q_weight, kv_weight = self.in_proj.weight.split([dim, 2 * dim])
        q_bias, kv_bias = self.in_proj.bias.split([dim, 2 * dim])
        q = F.linear(residual, q_weight, q_bias)
        k, v = F.linear(x, kv_weight, kv_bias).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b l (h e) -> b h l e", h=self.heads) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, :, -q.shape[2] :], dropout_p=self.dropout if self.training else 0.0
        )
        x = self.attn_norm(residual + self.drop(self.out_proj(rearrange(attended, "b h l e -> b l (h e)"))))
        x = self.ff_norm(x + self.drop(self.ff(x)))
        return self.drop(x)


class BERT4Rec(nn.Module):
    def __init__(self, num_items: int, args: Args):
        super().__init__()
        self.max_len, self.num_items = args.max_len, num_items
        self.mask_token = num_items + 1
        self.token_emb = nn.Embedding(num_items + 2, args.hidden_size, padding_idx=PAD)
        self.pos_emb = nn.Embedding(args.max_len, args.hidden_size)
        self.emb_dropout = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(
            BidirectionalBlock(args.hidden_size, args.num_heads, args.dropout) for _ in range(args.num_blocks)
        )
        self.out = nn.Linear(args.hidden_size, num_items + 1)  # logits of ids 0..n; id 0 is never scored

    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """tokens (B, L) left-padded item ids and mask tokens -> hidden states (B, L, d).

        last_only: the last block computes the newest position only (B, 1, d), all evaluation needs.
        """
        x = self.token_emb(tokens) + self.pos_emb(right_aligned_positions(tokens.shape[1], self.max_len, tokens.device))
        x = self.emb_dropout(x)
        mask = attention_mask(tokens, causal=False)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only and i == len(self.blocks) - 1)
        return x

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, d) -> logits (N, num_items) of items 1..n (padding is not a class)."""
        return F.linear(hidden, self.out.weight[1:], self.out.bias[1:])


def cloze_mask(
    tokens: torch.Tensor, mask_prob: float, mask_token: int, num_items: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, L) left-padded sequences -> inputs (B, L), labels (B, L): the original item where predicted, else PAD.

    Each real position is chosen with probability mask_prob; a chosen one becomes the mask token (80%), a random item
    (10%) or stays (10%). With probability LAST_ONLY_PROB a sequence instead gets only its newest item masked.
    """
    real = tokens != PAD
    draw = torch.rand(tokens.shape, device=tokens.device)
    chosen = real & (draw < mask_prob)
    kind = draw / mask_prob  # uniform on [0, 1) given that the position is chosen, as in the paper's code
    random_items = torch.randint(1, num_items + 1, tokens.shape, device=tokens.device)
    inputs = torch.where(chosen & (kind < 0.8), mask_token, tokens)
    inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_items, inputs)

    last_only = torch.rand(tokens.shape[0], 1, device=tokens.device) < LAST_ONLY_PROB  # (B, 1)
    newest = torch.zeros_like(real)
    newest[:, -1] = True
    newest &= real
    chosen = torch.where(last_only, newest, chosen)
    inputs = torch.where(last_only, torch.where(newest, mask_token, tokens), inputs)
    return inputs, torch.where(chosen, tokens, PAD)


def batch_loss(model: BERT4Rec, sequences: torch.Tensor, args: Args) -> torch.Tensor | None:
    """Cloze loss of one batch of sequences (B, max_len), or None when no position was drawn for prediction; `model`
    may be its torch.compile wrapper."""
    inputs, labels = cloze_mask(sequences, args.mask_prob, model.mask_token, model.num_items)
    hidden, index = hidden_at(model, inputs, labels != PAD, args.chunk_rows)  # (N, d), (N,)
    if len(index) == 0:
        return None
    return F.cross_entropy(model.item_logits(hidden), labels.reshape(-1)[index] - 1)


def make_scorer(model: BERT4Rec, args: Args, device: torch.device) -> Scorer:
    """The evaluation view of the model (or of its torch.compile wrapper): append the mask token, score the items at
    that position."""

    def scorer(histories: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """histories (B, max_len - 1) -> scores (B, C) of candidates (B, C), or (B, num_items + 1) of every item."""
        masked = torch.cat([histories, torch.full_like(histories[:, :1], model.mask_token)], dim=1)
        with autocast(device, args.dtype):
            hidden = last_hidden(model, masked, args.chunk_rows).float()  # (B, d)
        if candidates is None:
            return model.out(hidden)
        weight, bias = model.out.weight[candidates], model.out.bias[candidates]  # (B, C, d), (B, C)
        return torch.einsum("bd,bcd->bc", hidden, weight) + bias

    return scorer


def evaluate_split(
    model: BERT4Rec,
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
            max_len=args.max_len - 1,  # the scorer appends the mask token
            sample_size=args.sample_size,
            device=device,
            batch_size=args.eval_batch_size,
        )


def main(args: Args) -> dict[str, float]:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    check_run_dir(args.out, args.overwrite, args)
    data = load_dataset(args.data)
    require_users(data, "val", "test")
    check_sample_size(data, args.sample_size)
    table, width = plm_init(data, args, lambda dim: RANDOM_TOKEN_STD)
    item_table = announce_item_table(data, args)
    args = dataclasses.replace(args, hidden_size=width)
    if args.hidden_size % args.num_heads:
        raise InputError(f"--num-heads: hidden size {args.hidden_size} is not divisible by {args.num_heads} heads")
    model = allocate(lambda: BERT4Rec(data.num_items, args), "--hidden-size", args.hidden_size)
    if table is not None:
        mask_row = table.new_zeros(1, table.shape[1])  # the paper gives the mask token a zero vector
        model.token_emb.weight.data.copy_(torch.cat([table, mask_row]))
        model.token_emb.weight.requires_grad_(not args.freeze_embeddings)
    model.to(device)
    sequences = torch.from_numpy(data.train_matrix(args.max_len)).to(device)  # (U, max_len) left-padded
    # As nanoGPT does it: with --compile `model` becomes torch.compile's wrapper, which runs the forward passes and
    # reads through to the same parameters and attributes; `raw_model` is what the optimiser and checkpoints use.
    raw_model = model
    if args.compile:
        model = torch.compile(model, dynamic=True)
    optimizer = torch.optim.Adam([p for p in raw_model.parameters() if p.requires_grad], lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision(args.dtype, device) == torch.float16)
    run_dir = create_run_dir(
        args.out, "bert4rec", args.data, run_tag(item_table), args, overwrite=args.overwrite, item_table=item_table
    )
    print(f"{data.name}: {len(sequences)} training sequences, {data.num_items} items, run {run_dir}")
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
        batches = torch.randperm(len(sequences), device=device).split(args.batch_size)
        epoch_loss, epoch_steps = torch.zeros((), device=device), 0
        bar = progress(batches, desc=f"epoch {epoch}", leave=False)
        for batch in bar:
            with autocast(device, args.dtype):
                loss = batch_loss(model, sequences[batch], args)
            if loss is None:  # no position drawn for prediction: no step
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            epoch_loss += loss.detach()
            loss_since_point += loss.detach()
            epoch_steps += 1
            step += 1
            if step % args.log_every == 0:  # reading the loss waits for the device, so not every step
                epoch_sum, point_sum = torch.stack([epoch_loss, loss_since_point]).tolist()
                bar.set_postfix(loss=f"{epoch_sum / epoch_steps:.4f}")
                lr = optimizer.param_groups[0]["lr"]
                scalars.add(step, **{"train/loss": point_sum / args.log_every, "train/lr": lr})
                loss_since_point.zero_()
        train_loss = float(epoch_loss) / max(1, epoch_steps)
        seconds = time.perf_counter() - started

        val = evaluate_split(model, data, "val", args, device)
        record = {"epoch": epoch, "train_loss": train_loss, "train_seconds": seconds, **val}
        append_jsonl(run_dir / "metrics.jsonl", record)
        scalars.add(step, **{"train/sequences_per_s": len(sequences) / seconds})
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
