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


def length_chunks(seqs: torch.Tensor, num_chunks: int) -> list[tuple[torch.Tensor, int]]:
    """Rows of `seqs` (B, L) sorted by length and split into up to `num_chunks` groups: [(row indices, width)].

    `width` is the longest sequence of the group, so seqs[rows, -width:] drops only padding.
    """
    lengths = (seqs != PAD).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    groups = [rows for rows in torch.tensor_split(order, num_chunks) if len(rows)]
    # One device sync for all widths: the last row of each group is its longest.
    widths = lengths[torch.stack([rows[-1] for rows in groups])].clamp(min=1).tolist()
    return list(zip(groups, widths))


def last_hidden(
    encode: Callable[[torch.Tensor], torch.Tensor], histories: torch.Tensor, num_chunks: int
) -> torch.Tensor:
    """(B, d) output at the newest position of each history, computed chunk by chunk on trimmed histories."""
    parts, rows_in_order = [], []
    for rows, width in length_chunks(histories, num_chunks):
        parts.append(encode(histories[rows, -width:])[:, -1])
        rows_in_order.append(rows)
    hidden = torch.cat(parts)
    return hidden[torch.argsort(torch.cat(rows_in_order))]
