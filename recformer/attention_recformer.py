"""Recformer's attention on PyTorch's fused kernels, the same function as Hugging Face's LongformerSelfAttention.

Recformer's masks have one global token, the first, so a Longformer layer computes:

    local query i (not padding)  softmax over keys j with |i - j| <= w (w = attention_window / 2) that are not padding,
                                 plus key 0 wherever it lies; the layer's local q/k/v; q scaled by 1/sqrt(head_dim)
    global query 0               softmax over every non-padding key with the layer's *global* q/k/v projections
    padding query                attention output 0 (Hugging Face zeroes its probabilities)

Hugging Face reaches this through sliding chunks (a long chain of small reshapes, and every row padded to a multiple
of the window). Here the local part is one fused call, chosen by length and device:

    T <= 8w (4 windows)      scaled_dot_product_attention with a (B, 1, T, T) band + key-0 + padding mask
    longer                   query blocks of w rows against their 3w neighbouring keys and key 0, one batched call
                             (each query scores 3w + 1 keys instead of T, but the key blocks are copies; on one CPU
                             thread, window 64, forward + backward: dense 5% faster at T = 199 for all-MiniLM-L6-v2
                             and 12% at T = 187 for 768 x 12 layers, blocks 1.7x faster at T = 364 for MiniLM)
    CUDA, no dropout         FlexAttention with a block mask, compiled (tested on the CPU unfused only: the development
                             machine has no GPU)

and the global row is computed without projecting every token by the global key/value matrices: for one query,
q . (W_k h_j + b_k) = (W_k^T q) . h_j + const (the constant cancels in the softmax) and sum_j p_j (W_v h_j + b_v) =
W_v (sum_j p_j h_j) + b_v sum_j p_j, which costs (T x H) per head instead of (T x H x H). Under DeepSpeed ZeRO-3,
where a weight exists only while its own module's forward runs, the global row projects every token instead.

The layer's parameters are Hugging Face's (encoder.layer.N.attention.self.query, key_global, ...), so checkpoints are
the same for both implementations; run_encoder drives the Longformer layers' own output and feed-forward modules.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from transformers.models.longformer.modeling_longformer import LongformerEncoder, LongformerSelfAttention


def band_mask(valid: torch.Tensor, one_sided: int) -> torch.Tensor:
    """(B, 1, T, T) bool, True where local query i may attend key j: |i - j| <= one_sided or j = 0, key not padding.

    No row is empty (key 0 is never padding), so the fused kernel never sees an all-masked row.
    """
    positions = torch.arange(valid.shape[1], device=valid.device)
    allowed = (positions[:, None] - positions[None, :]).abs() <= one_sided
    allowed[:, 0] = True
    return allowed[None, None] & valid[:, None, None, :]


def block_mask(valid: torch.Tensor, one_sided: int) -> torch.Tensor:
    """(B * nb, 1, w, 3w + 1) bool for query blocks of w = one_sided rows (nb = ceil(T / w) blocks).

    Query a of block b is position b*w + a; key column c < 3w is position (b - 1)*w + c, allowed when
    a <= c <= a + 2w (|i - j| <= w), inside the sequence, not padding and not position 0; column 3w is key 0.
    """
    batch, length = valid.shape
    w = one_sided
    blocks = -(-length // w)
    padded = F.pad(valid, (w, w + blocks * w - length))  # (B, (nb + 2) w), False outside the sequence
    positions = torch.arange(-w, (blocks + 1) * w, device=valid.device)
    not_first = (positions != 0).unfold(0, 3 * w, w)  # (nb, 3w): position 0 enters through the global column only
    keys = padded.unfold(1, 3 * w, w) & not_first  # (B, nb, 3w)
    offsets = torch.arange(3 * w, device=valid.device)[None, :] - torch.arange(w, device=valid.device)[:, None]
    band = (offsets >= 0) & (offsets <= 2 * w)  # (w, 3w)
    local = band[None, None] & keys[:, :, None, :]  # (B, nb, w, 3w)
    global_column = torch.ones(batch, blocks, w, 1, dtype=torch.bool, device=valid.device)
    return torch.cat([local, global_column], dim=-1).reshape(batch * blocks, 1, w, 3 * w + 1)


def _key_blocks(x: torch.Tensor, w: int, blocks: int) -> torch.Tensor:
    """(B, H, T, D) -> (B * nb, H, 3w + 1, D): each block's 3w neighbouring rows, then row 0."""
    batch, heads, length, dim = x.shape
    padded = F.pad(x, (0, 0, w, w + blocks * w - length))  # (B, H, (nb + 2) w, D)
    windows = padded.unfold(2, 3 * w, w).permute(0, 2, 1, 4, 3)  # (B, nb, H, 3w, D)
    first = x[:, None, :, :1].expand(batch, blocks, heads, 1, dim)
    return torch.cat([windows, first], dim=3).reshape(batch * blocks, heads, 3 * w + 1, dim)


def blocked_attention(q, k, v, mask: torch.Tensor, w: int, dropout: float) -> torch.Tensor:
    """Local attention (B, H, T, D) by query blocks of w rows; mask from block_mask."""
    batch, heads, length, dim = q.shape
    blocks = -(-length // w)
    queries = F.pad(q, (0, 0, 0, blocks * w - length)).reshape(batch, heads, blocks, w, dim)
    queries = queries.transpose(1, 2).reshape(batch * blocks, heads, w, dim)
    out = F.scaled_dot_product_attention(
        queries, _key_blocks(k, w, blocks), _key_blocks(v, w, blocks), attn_mask=mask, dropout_p=dropout
    )  # (B * nb, H, w, D)
    out = out.reshape(batch, blocks, heads, w, dim).transpose(1, 2).reshape(batch, heads, blocks * w, dim)
    return out[:, :, :length]


def flex_block_mask(valid: torch.Tensor, one_sided: int):
    """FlexAttention BlockMask of band_mask (same rule, evaluated blockwise by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q_index, k_index):
        return valid[b, k_index] & (((q_index - k_index).abs() <= one_sided) | (k_index == 0))

    batch, length = valid.shape
    return create_block_mask(allowed, batch, None, length, length, device=valid.device)


KERNELS = ("dense", "blocked", "flex")


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class LocalMasks:
    """The masks of one batch, built once per kernel and window size and shared by all layers."""

    def __init__(self, valid: torch.Tensor, kernel: str | None = None):
        if kernel not in (None, *KERNELS):
            raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
        self.valid = valid  # (B, T) bool, True on real tokens
        self.kernel = kernel
        self._masks: dict[tuple[str, int], object] = {}

    def kernel_for(self, one_sided: int, dropout: float) -> str:
        """The given kernel, else FlexAttention on CUDA, else dense or blocked by length; FlexAttention has no
        attention dropout, so training with dropout takes the SDPA kernels."""
        kernel = self.kernel or ("flex" if self.valid.is_cuda else None)
        if kernel is None or (kernel == "flex" and dropout > 0.0):
            return "dense" if self.valid.shape[1] <= 8 * one_sided else "blocked"
        return kernel

    def get(self, kernel: str, one_sided: int):
        build = {"dense": band_mask, "blocked": block_mask, "flex": flex_block_mask}[kernel]
        if (kernel, one_sided) not in self._masks:
            self._masks[(kernel, one_sided)] = build(self.valid, one_sided)
        return self._masks[(kernel, one_sided)]


def local_attention(q, k, v, masks: LocalMasks, one_sided: int, dropout: float) -> torch.Tensor:
    """(B, H, T, D) output of every query row under the local rule (row 0 is overwritten by the global row)."""
    kernel = masks.kernel_for(one_sided, dropout)
    mask = masks.get(kernel, one_sided)
    if kernel == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if kernel == "blocked":
        return blocked_attention(q, k, v, mask, one_sided, dropout)
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask)  # unfused reference on the CPU, for tests


def fetched_in_forward(linear: torch.nn.Linear) -> bool:
    """True for DeepSpeed ZeRO-3 parameters: they hold their values only while their own module's forward runs."""
    return hasattr(linear.weight, "ds_id")


def global_row(module: LongformerSelfAttention, hidden: torch.Tensor, valid: torch.Tensor, dropout: float):
    """(B, C) attention output of token 0 with the global projections, by the associativity in the module docstring;
    under ZeRO-3 by projecting every token instead (the weights exist only inside the projections' forward)."""
    batch, length, width = hidden.shape
    heads, dim = module.num_heads, module.head_dim
    query = module.query_global(hidden[:, 0]).view(batch, heads, dim) / math.sqrt(dim)
    if fetched_in_forward(module.key_global) or fetched_in_forward(module.value_global):
        keys = module.key_global(hidden).view(batch, length, heads, dim).transpose(1, 2)
        values = module.value_global(hidden).view(batch, length, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            query[:, :, None].to(keys.dtype), keys, values, attn_mask=valid[:, None, None, :], dropout_p=dropout,
            scale=1.0,
        )  # (B, heads, 1, D); the query is scaled already
        return out.reshape(batch, heads * dim)
    key_weight = module.key_global.weight.view(heads, dim, width)
    value_weight = module.value_global.weight.view(heads, dim, width)
    query_in_input = torch.einsum("bnd,ndc->bnc", query, key_weight)  # (B, heads, C)
    scores = torch.einsum("bnc,btc->bnt", query_in_input, hidden)  # (B, heads, T); key bias cancels in softmax
    scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout).to(hidden.dtype)
    mixed = torch.einsum("bnt,btc->bnc", probs, hidden)  # (B, heads, C)
    out = torch.einsum("bnc,ndc->bnd", mixed, value_weight)
    out = out + module.value_global.bias.view(heads, dim) * probs.sum(dim=-1, keepdim=True)
    return out.reshape(batch, heads * dim)


def self_attention(module: LongformerSelfAttention, hidden: torch.Tensor, masks: LocalMasks) -> torch.Tensor:
    """(B, T, C) -> (B, T, C): what module(...) returns for Recformer's masks (global token 0)."""
    batch, length, width = hidden.shape
    heads, dim = module.num_heads, module.head_dim
    dropout = module.dropout if module.training else 0.0

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, D)
        return x.view(batch, length, heads, dim).transpose(1, 2)

    q, k, v = split(module.query(hidden)), split(module.key(hidden)), split(module.value(hidden))
    local = local_attention(q, k, v, masks, module.one_sided_attn_window_size, dropout)
    local = local.transpose(1, 2).reshape(batch, length, width)
    first = global_row(module, hidden, masks.valid, dropout).to(local.dtype)
    out = torch.cat([first[:, None], local[:, 1:]], dim=1)
    return out * masks.valid[:, :, None].to(out.dtype)  # padding queries give 0, as in Hugging Face


def run_encoder(
    encoder: LongformerEncoder, hidden: torch.Tensor, valid: torch.Tensor, kernel: str | None = None
) -> torch.Tensor:
    """(B, T, C) last hidden state of `encoder`'s layers with the fast attention; valid (B, T) bool, valid[:, 0] True.

    T needs no padding to a multiple of the window. kernel: one of KERNELS, or None to choose by length and device.
    """
    masks = LocalMasks(valid, kernel)
    for layer in encoder.layer:
        attention = self_attention(layer.attention.self, hidden, masks)
        attention = layer.attention.output(attention, hidden)
        hidden = layer.ff_chunk(attention)
    return hidden


def check_recformer_masks(attention_mask: torch.Tensor, global_attention_mask: torch.Tensor) -> None:
    """The fast attention assumes Recformer's masks: token 0 real and global, no other global token."""
    first_global = attention_mask[:, 0].bool() & global_attention_mask[:, 0].bool()
    wrong = ~first_global | global_attention_mask[:, 1:].bool().any(dim=1)
    if wrong.any():
        raise ValueError("attention 'fast' needs global attention on the first token only, and that token not padding")

