"""Recformer's inputs from a dataset: item tokens cached once, batches built from item-id histories, the item table.

    cached_item_tokens       RecformerTokenizer.tokenize_items once per tokenizer, config and text, cached as .npz (a
                             pre-training corpus); dataset_item_tokens: the same for a SeqDataset in
                             <dataset>/recformer_tokens/; item_texts: its item text, or a one-line DatasetError.
    build_batch              left-padded item-id histories (B, L) -> model tensors by numpy ops (items newest first).
    encode_items             the item table (rows, H) from one-item sequences; fine-tuning and export both use it.

Pre-training, fine-tuning, export and benchmarks/bench_recformer.py read them; the tokenizer and the model they feed
are in recformer/.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.data import PAD, DatasetError, SeqDataset
from common.run import progress, save_atomic, to_device
from recformer.configuration_recformer import RecformerConfig
from recformer.modeling_recformer import RecformerModel
from recformer.tokenization_recformer import LEADING_TYPE, PADDING_TYPE, ItemTokens, RecformerTokenizer, concat_ranges


def _save_item_tokens(tokens: ItemTokens, path: Path) -> None:
    """`tokens` as an .npz file at `path` (ids as int32, types as int8), written atomically."""
    arrays = {
        "input_ids": tokens.input_ids.astype(np.int32),
        "token_types": tokens.token_types.astype(np.int8),
        "word_starts": tokens.word_starts,
        "offsets": tokens.offsets,
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    save_atomic(path, write)


def _load_item_tokens(path: Path) -> ItemTokens:
    """The ItemTokens _save_item_tokens wrote at `path`."""
    with np.load(path) as f:
        return ItemTokens(
            f["input_ids"].astype(np.int64),
            f["token_types"].astype(np.int64),
            f["word_starts"].astype(bool),
            f["offsets"].astype(np.int64),
        )


def text_fingerprint(texts: Sequence[Mapping[str, str]]) -> str:
    digest = hashlib.sha256(json.dumps([list(t.items()) for t in texts], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def cached_item_tokens(
    tokenizer: RecformerTokenizer, texts: Sequence[Mapping[str, str]], cache_dir: Path
) -> ItemTokens:
    """tokenizer.tokenize_items(texts), stored once in cache_dir under a name keyed by tokenizer, config and text.

    Row i holds texts[i]. build_batch and encode_items read id 0 as padding, so a corpus should start with {}.
    The key covers every text in row order, so a changed dataset gets its own file; an unreadable or inconsistent
    file (a crash, a full disk) is tokenized again.
    """
    path = Path(cache_dir) / f"tokens-{tokenizer.fingerprint()}-{text_fingerprint(texts)}.npz"
    tokens = _read_item_tokens(path, len(texts))
    if tokens is None:
        tokens = tokenizer.tokenize_items(texts)
        _save_item_tokens(tokens, path)
    return tokens


def _read_item_tokens(path: Path, rows: int) -> ItemTokens | None:
    """The cached tokens at `path` when the file is readable and holds `rows` consistent rows, else None."""
    try:
        tokens = _load_item_tokens(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # missing, truncated, not an .npz
        return None
    sizes = {len(tokens.input_ids), len(tokens.token_types), len(tokens.word_starts)}
    consistent = len(tokens.offsets) == rows + 1 and tokens.offsets[0] == 0 and sizes == {int(tokens.offsets[-1])}
    return tokens if consistent and (np.diff(tokens.offsets) >= 0).all() else None


def item_texts(data: SeqDataset) -> list[dict[str, str]]:
    """data.item_text, or a one-line DatasetError for ID-only datasets."""
    if data.item_text is None:
        raise DatasetError(f"{data.path}: dataset has no item text (meta_data.json); Recformer reads item text")
    return data.item_text


def dataset_item_tokens(tokenizer: RecformerTokenizer, data: SeqDataset) -> ItemTokens:
    """ItemTokens of every item id of `data` (row 0 = padding, empty), cached in <data>/recformer_tokens/."""
    return cached_item_tokens(tokenizer, item_texts(data), data.path / "recformer_tokens")


def build_batch(
    tokens: ItemTokens, histories: np.ndarray, config: RecformerConfig, *, with_word_starts: bool = False
) -> dict[str, torch.Tensor]:
    """Model inputs for item-id histories (B, L), left-padded with 0, most recent item last.

    Each row becomes: the leading token (type 0, item position 0), then the items newest first (item i gets item
    position i + 1), at most max_item_embeddings - 1 items and max_token_num tokens; then padding (pad id, type 3,
    item position max_item_embeddings - 1, attention 0) up to the longest row (the Hugging Face attention pads to a
    multiple of the window itself). Global attention on the first token only. with_word_starts adds a (B, T) bool
    "word_starts" (False on the leading token and padding).
    """
    histories = np.asarray(histories, dtype=np.int64)
    batch = histories.shape[0]
    newest_first = histories[:, ::-1][:, : config.max_item_embeddings - 1]
    rows, columns = np.nonzero(newest_first != PAD)  # row-major: newest item of each row first
    items = newest_first[rows, columns]
    lengths = tokens.lengths[items]
    first_of_row = np.searchsorted(rows, np.arange(batch))
    rank = np.arange(len(rows)) - first_of_row[rows]  # 0 for the newest item of its row
    before = np.cumsum(lengths) - lengths  # tokens of all earlier items in the flat list
    start = 1 + before - before[first_of_row[rows]]  # column of each item's first token in its row
    source = concat_ranges(tokens.offsets[items], lengths)
    column = concat_ranges(start, lengths)
    token_item = np.repeat(np.arange(len(rows)), lengths)
    keep = column < config.max_token_num
    source, token_item, column = source[keep], token_item[keep], column[keep]
    token_row = rows[token_item]
    row_tokens = 1 + np.bincount(token_row, minlength=batch)
    width = int(row_tokens.max()) if batch else 1

    input_ids = np.full((batch, width), config.pad_token_id, dtype=np.int64)
    token_type_ids = np.full((batch, width), PADDING_TYPE, dtype=np.int64)
    item_position_ids = np.full((batch, width), config.max_item_embeddings - 1, dtype=np.int64)
    input_ids[:, 0] = config.bos_token_id
    token_type_ids[:, 0] = LEADING_TYPE
    item_position_ids[:, 0] = 0
    input_ids[token_row, column] = tokens.input_ids[source]
    token_type_ids[token_row, column] = tokens.token_types[source]
    item_position_ids[token_row, column] = rank[token_item] + 1
    attention_mask = np.arange(width)[None, :] < row_tokens[:, None]
    global_attention_mask = np.zeros((batch, width), dtype=np.int64)
    global_attention_mask[:, 0] = 1
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask.astype(np.int64),
        "token_type_ids": token_type_ids,
        "item_position_ids": item_position_ids,
        "global_attention_mask": global_attention_mask,
    }
    if with_word_starts:
        word_starts = np.zeros((batch, width), dtype=bool)
        word_starts[token_row, column] = tokens.word_starts[source]
        out["word_starts"] = word_starts
    return {name: torch.from_numpy(array) for name, array in out.items()}


@torch.no_grad()
def encode_items(
    encoder: RecformerModel,
    tokens: ItemTokens,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    sharded: bool = False,
) -> torch.Tensor:
    """(rows, H) float32 pooled vectors of every row of `tokens` as a one-item sequence; row 0 (padding) zeros.

    Items are batched in order of token count to cut padding; the encoder runs in eval mode, without gradient.
    sharded: every process of the default process group encodes every world-th of those batches (the same batches
    as one process, so the same rows) and the table is summed over the ranks, each row coming from one of them.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    was_training = encoder.training
    encoder.eval()
    num_rows = len(tokens.offsets) - 1
    order = np.argsort(tokens.lengths[1:], kind="stable") + 1
    table = torch.zeros(num_rows, encoder.config.hidden_size, device=device)
    starts = range(rank * batch_size, len(order), world * batch_size)  # round robin: each rank gets short and long
    for begin in progress(starts, desc="encode items", leave=False):
        ids = order[begin : begin + batch_size]
        batch = to_device(build_batch(tokens, ids[:, None], encoder.config), device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pooled = encoder(**batch)[1]
        table[torch.from_numpy(ids).to(device)] = pooled.float()
    encoder.train(was_training)
    if sharded:
        dist.all_reduce(table)  # every other rank holds zeros in a row, so the sum is that row exactly
    return table
