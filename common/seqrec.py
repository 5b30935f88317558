"""What SASRec and BERT4Rec share: padding-aware attention masks and length-bucketed batches.

Histories are left-padded (B, L) int64 tensors with the newest item in the last column. Both models count positions
from the right (the newest item always gets the last position embedding) and never attend to padding, so a history's
outputs do not depend on how much padding sits on its left. That lets a batch be cut into chunks of similar length,
each trimmed to its longest history: on short-sequence data (Scientific: 7 items per user on average, max length 50)
the padding that would dominate the arithmetic then costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.data import PAD
from common.run import EarlyStopping, append_jsonl, save_atomic, write_json_atomic

BEST_METRIC = "NDCG@10"


def attention_mask(seqs: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query position i may attend to key position j: real keys (and j <= i if causal).

    A padding query would otherwise see no key at all, and scaled_dot_product_attention returns NaN for such a row
    (which then leaks into real rows through 0 * NaN), so every position may also see itself; padding outputs are
    never used.
    """
    length = seqs.shape[1]
    allowed = (seqs != PAD)[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=seqs.device)


def right_aligned_positions(length: int, max_len: int, device: torch.device) -> torch.Tensor:
    """(length,) position ids for the last `length` columns of a max_len window: the newest item is max_len - 1."""
    if length > max_len:
        raise ValueError(f"sequence of length {length} is longer than max_len {max_len}")
    return torch.arange(max_len - length, max_len, device=device)


def length_chunks(seqs: torch.Tensor, chunk_rows: int) -> list[tuple[torch.Tensor, int]]:
    """Rows of `seqs` (B, L) sorted by length and split into groups of `chunk_rows`: [(row indices, width)].

    `width` is the longest sequence of the group, so seqs[rows, -width:] drops only padding.
    """
    lengths = (seqs != PAD).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    groups = list(order.split(chunk_rows))
    # One device sync for all widths: the last row of each group is its longest.
    widths = lengths[torch.stack([rows[-1] for rows in groups])].clamp(min=1).tolist()
    return list(zip(groups, widths))


def last_hidden(encode: Callable[..., torch.Tensor], histories: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """(B, d) output at the newest position of each history, computed chunk by chunk on trimmed histories.

    encode(seqs, last_only=True) may compute its last block for the newest position only.
    """
    parts, rows_in_order = [], []
    for rows, width in length_chunks(histories, chunk_rows):
        parts.append(encode(histories[rows, -width:], last_only=True)[:, -1])
        rows_in_order.append(rows)
    hidden = torch.cat(parts)
    return hidden[torch.argsort(torch.cat(rows_in_order))]


def hidden_at(
    encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, keep: torch.Tensor, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, d) at the N positions where `keep` (B, L) is True, and those positions as flat indices into B * L.

    `keep` may only mark real (non-padding) positions: each chunk is trimmed to its longest history. Callers pick the
    labels of the kept positions with labels.reshape(-1)[index].
    """
    length = inputs.shape[1]
    hidden, index = [], []
    for rows, width in length_chunks(inputs, chunk_rows):
        flat = rows[:, None] * length + torch.arange(length - width, length, device=inputs.device)  # (b, width)
        chunk_keep = keep[rows, -width:]
        hidden.append(encode(inputs[rows, -width:])[chunk_keep])
        index.append(flat[chunk_keep])
    return torch.cat(hidden), torch.cat(index)


def train_with_early_stopping(
    model: torch.nn.Module,
    train_epoch: Callable[[int], float],
    evaluate_split: Callable[[str], dict[str, float]],
    run_dir: Path,
    epochs: int,
    patience: int,
) -> dict[str, float]:
    """The paper's schedule: validate after every epoch, keep the best model by validation NDCG@10, stop after
    `patience` epochs without a new best, then test the best model once.

    train_epoch(epoch) trains one pass and returns its mean loss; evaluate_split("val" | "test") returns metrics and
    runs under no_grad in eval mode. Writes metrics.jsonl (one line per validation), best.pt (atomically, at each new
    best; model state and epoch) and test_metrics.json; returns the test metrics.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    checkpoint = run_dir / "best.pt"
    stopper = EarlyStopping(patience)
    best_epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        loss = train_epoch(epoch)
        seconds = time.perf_counter() - started
        val = _evaluate(model, evaluate_split, "val")
        append_jsonl(run_dir / "metrics.jsonl", {"epoch": epoch, "train_loss": loss, "train_seconds": seconds, **val})
        print(f"epoch {epoch}: loss {loss:.4f}, val ({val['protocol']}) {BEST_METRIC} {val[BEST_METRIC]:.4f}, "
              f"HR@10 {val['HR@10']:.4f}")
        if stopper.update(val[BEST_METRIC]):
            best_epoch = epoch
            state = {"model": model.state_dict(), "epoch": epoch}
            save_atomic(checkpoint, lambda tmp: torch.save(state, tmp))
        if stopper.should_stop:
            break
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["model"])
    test = _evaluate(model, evaluate_split, "test")
    write_json_atomic(
        run_dir / "test_metrics.json", {**test, "best_epoch": best_epoch, f"val_{BEST_METRIC}": stopper.best}
    )
    return test


def _evaluate(model: torch.nn.Module, evaluate_split, split: str) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return evaluate_split(split)
