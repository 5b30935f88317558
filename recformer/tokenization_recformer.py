"""Recformer's inputs: items tokenized once as flat arrays, and batches built from item-id histories.

    ItemTokens               every item tokenized once: flat `input_ids`, `token_types` (1 name / 2 value),
                             `word_starts` (from the fast tokenizer's word ids), per-item `offsets`.
    RecformerTokenizer       wraps any Hugging Face fast tokenizer; .tokenize_items(list of attribute dicts).
    cached_item_tokens       tokenize_items once per tokenizer, config and text, cached as .npz (a pre-training
                             corpus); dataset_item_tokens: the same for a SeqDataset in <dataset>/recformer_tokens/.
    build_batch              left-padded item-id histories (B, L) -> model tensors by numpy ops (items newest first).
    sequence_token_counts    tokens of each row build_batch would make; token_budget_chunks groups rows of similar
                             token count into encoder calls (padding-free batches).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from common.data import PAD, DatasetError, SeqDataset
from common.run import progress, save_atomic

if TYPE_CHECKING:
    from recformer.configuration_recformer import RecformerConfig

NAME_TYPE, VALUE_TYPE, LEADING_TYPE, PADDING_TYPE = 1, 2, 0, 3


@dataclass
class ItemTokens:
    input_ids: np.ndarray
    """(N,) int64 token ids of every item, concatenated in item order."""
    token_types: np.ndarray
    """(N,) int64: 1 for attribute-name tokens, 2 for attribute-value tokens."""
    word_starts: np.ndarray
    """(N,) bool: the token begins a word (of its attribute name or value), for whole-word masking."""
    offsets: np.ndarray
    """(num_rows + 1,) int64: the tokens of row i are [offsets[i], offsets[i + 1])."""

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, path: Path) -> None:
        arrays = {
            "input_ids": self.input_ids.astype(np.int32),
            "token_types": self.token_types.astype(np.int8),
            "word_starts": self.word_starts,
            "offsets": self.offsets,
        }

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        save_atomic(path, write)

    @classmethod
    def load(cls, path: Path) -> ItemTokens:
        with np.load(path) as f:
            return cls(
                f["input_ids"].astype(np.int64),
                f["token_types"].astype(np.int64),
                f["word_starts"].astype(bool),
                f["offsets"].astype(np.int64),
            )


def _flatten(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter((x for sub in lists for x in sub), dtype=np.int64, count=sum(map(len, lists)))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


class RecformerTokenizer:
    """Item-aware tokenizer over a Hugging Face fast tokenizer (byte-level BPE or WordPiece alike).

    An item is its first `max_attr_num` attributes; each attribute is tokens(name) + tokens(value), cut to
    `max_attr_length` tokens, typed 1 (name) and 2 (value). No special tokens inside items. The tokenizer must be a
    fast (Rust) one: whole-word masking reads its word ids.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast, config: RecformerConfig):
        self.hf = hf_tokenizer
        self.config = config

    @property
    def mask_token_id(self) -> int:
        return self.hf.mask_token_id

    def fingerprint(self) -> str:
        """Hash of the tokenizer and of the config fields that shape item tokens."""
        fields = (self.config.max_attr_num, self.config.max_attr_length)
        digest = hashlib.sha256(self.hf.backend_tokenizer.to_str().encode("utf-8") + repr(fields).encode())
        return digest.hexdigest()[:16]

    def _encode_strings(self, strings: list[str], chunk: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat ids, flat word-start flags, (len(strings) + 1,) offsets) of each string tokenized alone."""
        ids, starts, lengths = [], [], []
        for begin in progress(range(0, len(strings), chunk), desc="tokenize", leave=False):
            encoded = self.hf(strings[begin : begin + chunk], add_special_tokens=False, return_attention_mask=False)
            words = [encoding.word_ids for encoding in encoded.encodings]
            lengths.append(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))
            word = _flatten([[-1 if w is None else w for w in ws] for ws in words])
            first = np.zeros(len(word), dtype=bool)
            first[np.cumsum(lengths[-1])[:-1]] = True
            previous = np.concatenate([[-2], word[:-1]])
            ids.append(_flatten(encoded["input_ids"]))
            starts.append(first | (word != previous))
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        empty = np.zeros(0, dtype=np.int64)
        return (
            np.concatenate(ids) if ids else empty,
            np.concatenate(starts) if starts else empty.astype(bool),
            offsets,
        )

    def tokenize_items(self, texts: Sequence[Mapping[str, str]]) -> ItemTokens:
        """ItemTokens with one row per entry of `texts` (a dict of attributes in order; {} gives an empty item)."""
        strings: dict[str, int] = {}
        segments = []  # (row, name string, value string) of each kept attribute, in output order
        for row, attributes in enumerate(texts):
            for name, value in list(attributes.items())[: self.config.max_attr_num]:
                name_id = strings.setdefault(str(name), len(strings))
                value_id = strings.setdefault(str(value), len(strings))
                segments.append((row, name_id, value_id))
        ids, starts, string_offsets = self._encode_strings(list(strings))
        string_lengths = np.diff(string_offsets)
        seg = np.array(segments, dtype=np.int64).reshape(-1, 3)
        name_len = np.minimum(string_lengths[seg[:, 1]], self.config.max_attr_length)
        value_len = np.minimum(string_lengths[seg[:, 2]], self.config.max_attr_length - name_len)
        # Interleave name and value pieces: piece 2k is attribute k's name, 2k + 1 its value.
        piece_string = seg[:, 1:].reshape(-1)
        piece_len = np.stack([name_len, value_len], axis=1).reshape(-1)
        source = _ranges(string_offsets[piece_string], piece_len)
        types = np.repeat(np.tile([NAME_TYPE, VALUE_TYPE], len(seg)), piece_len)
        row_lengths = np.bincount(seg[:, 0], weights=name_len + value_len, minlength=len(texts)).astype(np.int64)
        return ItemTokens(
            input_ids=ids[source],
            token_types=types.astype(np.int64),
            word_starts=starts[source],
            offsets=np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
        )

    def save_pretrained(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))


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
        tokens.save(path)
    return tokens


def _read_item_tokens(path: Path, rows: int) -> ItemTokens | None:
    """The cached tokens at `path` when the file is readable and holds `rows` consistent rows, else None."""
    try:
        tokens = ItemTokens.load(path)
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
    source = _ranges(tokens.offsets[items], lengths)
    column = _ranges(start, lengths)
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
