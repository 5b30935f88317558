"""What SASRec and BERT4Rec share: padding-aware attention masks and length-bucketed batches.

Histories are left-padded (B, L) int64 tensors with the newest item in the last column. Both models count positions
from the right (the newest item always gets the last position embedding) and never attend to padding, so a history's
outputs do not depend on how much padding sits on its left. That lets a batch be cut into chunks of similar length,
each trimmed to its longest history: on short-sequence data (Scientific: 7 items per user on average, max length 50)
the padding that would dominate the arithmetic then costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.data import PAD


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


def last_hidden(model: Callable[..., torch.Tensor], histories: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """(B, d) output at the newest position of each history, computed chunk by chunk on trimmed histories.

    `model` is the model or its compiled form; model(seqs, last_only=True) may compute its last block for the
    newest position only.
    """
    parts, rows_in_order = [], []
    for rows, width in length_chunks(histories, chunk_rows):
        parts.append(model(histories[rows, -width:], last_only=True)[:, -1])
        rows_in_order.append(rows)
    hidden = torch.cat(parts)
    return hidden[torch.argsort(torch.cat(rows_in_order))]


def hidden_at(
    model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, keep: torch.Tensor, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, d) of `model` (the model or its compiled form) at the N positions where `keep` (B, L) is True,
    and those positions as flat indices into B * L.

    `keep` may only mark real (non-padding) positions: each chunk is trimmed to its longest history. Callers pick the
    labels of the kept positions with labels.reshape(-1)[index].
    """
    length = inputs.shape[1]
    hidden, index = [], []
    for rows, width in length_chunks(inputs, chunk_rows):
        flat = rows[:, None] * length + torch.arange(length - width, length, device=inputs.device)  # (b, width)
        chunk_keep = keep[rows, -width:]
        hidden.append(model(inputs[rows, -width:])[chunk_keep])
        index.append(flat[chunk_keep])
    return torch.cat(hidden), torch.cat(index)
