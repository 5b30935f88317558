"""Recformer's tokenizer: items (attribute dicts) to flat arrays of token ids, types and word starts.

    ItemTokens               every item tokenized once: flat `input_ids`, `token_types` (1 name / 2 value),
                             `word_starts` (from the fast tokenizer's word ids), per-item `offsets`.
    RecformerTokenizer       wraps any Hugging Face fast tokenizer; .tokenize_items(list of attribute dicts).
    NAME_TYPE ...            the token types: 0 the leading token, 1 attribute name, 2 attribute value, 3 padding.

Text to ids only: the token cache and the batches built from item-id histories are in common/recformer_data.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedTokenizerFast

from common.run import progress

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


def _flatten(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter((x for sub in lists for x in sub), dtype=np.int64, count=sum(map(len, lists)))


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
        source = concat_ranges(string_offsets[piece_string], piece_len)
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
