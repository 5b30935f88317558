"""Recformer: the Longformer that reads item text, its item/sequence tokenizer and its backbone loader.

Shared by pretrain_recformer.py, finetune_recformer.py and export_embeddings.py.

Model
    RecformerConfig          LongformerConfig + Recformer's fields (window 64, 4 token types, 1024 tokens, 51 item
                             positions, 3 attributes of 32 tokens, cls pooling, temperature 0.05, MLM weight 0.1).
    RecformerModel           embeddings (word + RoBERTa-style position + token type + item position) and the
                             `transformers` Longformer encoder; forward(**batch) -> (hidden (B, T, H), pooled (B, H)),
                             pooled = the first token. Its attention is computed by common/recformer_attention.py
                             ("fast", the default) or by `transformers` ("hf", the reference): set_attention(model,
                             kind), a runtime choice that checkpoints do not record.
    RecformerForSeqRec       .longformer + a fixed item table; cosine(pooled, item) / temp, full or sampled softmax.
    RecformerForPretraining  .longformer + the Longformer LM head; forward(**batch, mlm_labels=None) ->
                             PretrainingOutput(pooled, mlm_logits, mlm_loss).

Tokens
    ItemTokens               every item tokenized once: flat `input_ids`, `token_types` (1 name / 2 value),
                             `word_starts` (from the fast tokenizer's word ids), per-item `offsets`.
    RecformerTokenizer       wraps any Hugging Face fast tokenizer; .tokenize_items(list of attribute dicts).
    dataset_item_tokens      ItemTokens of a SeqDataset, cached in <dataset>/recformer_tokens/ keyed by tokenizer,
                             config and item text.
    build_batch              left-padded item-id histories (B, L) -> model tensors by numpy ops (items newest first).
    encode_items             the item table (rows, H) from one-item sequences; fine-tuning and export both use it.

Backbones
    load_backbone(spec, model_class, texts=None) -> (model, tokenizer), spec one of: our checkpoint directory; a
    Hugging Face Longformer / BERT / RoBERTa directory or hub name; the paper's `.bin` state dicts; "tiny". Prints
    copied / new / unused tensors; a shape mismatch raises BackboneError. save_checkpoint writes a directory
    (config.json, model.safetensors, tokenizer files) atomically.
    Converting a Hugging Face encoder: layers copied into the Longformer layout, q/k/v also into the global
    projections when the source has none; positions moved to the RoBERTa offset (row pad + 1 = first token) and
    repeated up to max_token_num; the 4-row token-type table starts as the source's segment-0 row (which the source
    adds to every token); item positions are new; the LM head is copied when present (decoder tied to the word
    embeddings when the source ties them). The paper's `.bin` files take config and tokenizer from config.json and
    tokenizer files beside them, else from allenai/longformer-base-4096 (network or local Hugging Face cache).
    cached_item_tokens tokenizes a pre-training corpus (a list of attribute dicts) with the same cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, LongformerConfig, PreTrainedTokenizerFast
from transformers.models.longformer.modeling_longformer import (
    LongformerEncoder,
    LongformerLMHead,
    LongformerPreTrainedModel,
)
from transformers.utils import logging as hf_logging

from common.data import PAD, SeqDataset
from common.recformer_attention import check_recformer_masks, run_encoder
from common.run import progress, save_atomic

NAME_TYPE, VALUE_TYPE, LEADING_TYPE, PADDING_TYPE = 1, 2, 0, 3
IGNORE_INDEX = -100
ATTENTIONS = ("fast", "hf")


class BackboneError(ValueError):
    """A backbone cannot be loaded or does not fit; the message says which file and why, in one line."""


# ----------------------------------------------------------------------------------------------------- model


class RecformerConfig(LongformerConfig):
    model_type = "recformer"

    def __init__(
        self,
        attention_window: int | list[int] = 64,
        token_type_size: int = 4,
        max_token_num: int = 1024,
        max_item_embeddings: int = 51,
        max_attr_num: int = 3,
        max_attr_length: int = 32,
        pooler_type: str = "cls",
        temp: float = 0.05,
        mlm_weight: float = 0.1,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(attention_window=attention_window, **kwargs)
        if isinstance(self.attention_window, int):
            self.attention_window = [self.attention_window] * self.num_hidden_layers
        self.token_type_size = token_type_size
        self.max_token_num = max_token_num
        self.max_item_embeddings = max_item_embeddings
        self.max_attr_num = max_attr_num
        self.max_attr_length = max_attr_length
        self.pooler_type = pooler_type
        self.temp = temp
        self.mlm_weight = mlm_weight

    @property
    def window(self) -> int:
        """The largest layer window: the Hugging Face attention pads sequences to a multiple of it (for its chunks)."""
        return max(self.attention_window)


AutoConfig.register(RecformerConfig.model_type, RecformerConfig)  # lets AutoTokenizer read our checkpoint dirs
hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would interleave with the training bars


def roberta_position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) positions counted from pad_id + 1 over non-pad tokens; pad tokens get pad_id (RoBERTa's convention)."""
    not_pad = input_ids.ne(pad_id).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + pad_id


class RecformerEmbeddings(nn.Module):
    def __init__(self, config: RecformerConfig):
        super().__init__()
        self.pad_id = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(config.token_type_size, config.hidden_size)
        self.item_position_embeddings = nn.Embedding(config.max_item_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, item_position_ids):
        positions = roberta_position_ids(input_ids, self.pad_id)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
            + self.item_position_embeddings(item_position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class RecformerPreTrainedModel(LongformerPreTrainedModel):
    config_class = RecformerConfig
    config: RecformerConfig
    base_model_prefix = "longformer"


class RecformerModel(RecformerPreTrainedModel):
    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        if config.pooler_type != "cls":
            raise ValueError(f"pooler_type {config.pooler_type!r} is not supported (only 'cls')")
        self.embeddings = RecformerEmbeddings(config)
        self.encoder = LongformerEncoder(config)
        self.attention = "fast"  # or "hf" (Hugging Face's Longformer attention, the reference); see set_attention
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def encode(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, global_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's layers: embeddings (B, T, H) -> last hidden state (B, T, H), by self.attention."""
        if self.attention == "fast":
            check_recformer_masks(attention_mask, global_attention_mask)
            return run_encoder(self.encoder, hidden, attention_mask.bool())
        # Hugging Face's chunked attention needs a multiple of the largest window; padded positions are masked keys
        # and independent query rows, so their zero embeddings change no real position's output.
        length = hidden.shape[1]
        extra = -length % self.config.window
        hidden = F.pad(hidden, (0, 0, 0, extra))
        # The Longformer encoder reads only the sign of its mask: < 0 masked, 0 local, > 0 global attention.
        sign = torch.where(attention_mask.bool(), global_attention_mask.bool().long(), -1)
        sign = F.pad(sign, (0, extra), value=-1)
        hidden = self.encoder(hidden, attention_mask=sign.to(hidden.dtype), return_dict=True).last_hidden_state
        return hidden[:, :length]

    def forward(self, input_ids, attention_mask, token_type_ids, item_position_ids, global_attention_mask):
        """(hidden (B, T, H), pooled (B, H)) for a batch from build_batch."""
        hidden = self.embeddings(input_ids, token_type_ids, item_position_ids)
        hidden = self.encode(hidden, attention_mask, global_attention_mask)
        return hidden, hidden[:, 0]


def set_attention(model: nn.Module, attention: str) -> None:
    """Run every RecformerModel inside `model` with `attention` ("fast" or "hf"); a runtime choice, never saved."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    for module in model.modules():
        if isinstance(module, RecformerModel):
            module.attention = attention


def cosine_scores(queries: torch.Tensor, keys: torch.Tensor, temp: float) -> torch.Tensor:
    """cos(q, k) / temp: queries (B, H) against keys (N, H) -> (B, N), or keys (B, C, H) -> (B, C)."""
    queries = F.normalize(queries.float(), dim=-1)
    keys = F.normalize(keys.float(), dim=-1)
    if keys.dim() == 2:
        return queries @ keys.T / temp
    return torch.einsum("bh,bch->bc", queries, keys) / temp


class RecformerForSeqRec(RecformerPreTrainedModel):
    """Scores items by cosine(sequence vector, item vector) / temp against a fixed item table."""

    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        self.longformer = RecformerModel(config)
        # (num_items + 1, H), row 0 padding; rebuilt from the encoder by the training script, never a parameter.
        self.register_buffer("item_table", torch.zeros(1, config.hidden_size), persistent=False)
        self.post_init()

    def set_item_table(self, table: torch.Tensor) -> None:
        self.item_table = table.detach().float().to(self.item_table.device)

    def scores(self, pooled: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) scores of `candidates` (B, C), or (B, num_items + 1) of every id with padding at -inf."""
        if candidates is not None:
            return cosine_scores(pooled, self.item_table[candidates], self.config.temp)
        scores = cosine_scores(pooled, self.item_table, self.config.temp)
        scores[:, PAD] = float("-inf")
        return scores

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor, negatives: int) -> torch.Tensor:
        """Cross-entropy of the label over all items (negatives <= 0) or against `negatives` random items."""
        if negatives <= 0:
            return F.cross_entropy(self.scores(pooled), labels)
        num_items = self.item_table.shape[0] - 1
        sampled = torch.randint(1, num_items + 1, (labels.shape[0], negatives), device=labels.device)
        candidates = torch.cat([labels[:, None], sampled], dim=1)
        return F.cross_entropy(self.scores(pooled, candidates), torch.zeros_like(labels))

    def forward(self, **batch) -> torch.Tensor:
        """Pooled sequence vectors (B, H) of a build_batch batch."""
        return self.longformer(**batch)[1]


@dataclass
class PretrainingOutput:
    pooled: torch.Tensor
    """(B, H) first-token vectors."""
    mlm_logits: torch.Tensor | None = None
    """(B, T, V) LM-head logits when no labels were given."""
    mlm_loss: torch.Tensor | None = None
    """Mean cross-entropy over labelled tokens when mlm_labels were given (logits only at those tokens)."""


class RecformerForPretraining(RecformerPreTrainedModel):
    def __init__(self, config: RecformerConfig):
        super().__init__(config)
        self.longformer = RecformerModel(config)
        self.lm_head = LongformerLMHead(config)
        self.post_init()

    def forward(self, mlm_labels: torch.Tensor | None = None, **batch) -> PretrainingOutput:
        hidden, pooled = self.longformer(**batch)
        if mlm_labels is None:
            return PretrainingOutput(pooled, mlm_logits=self.lm_head(hidden))
        labelled = mlm_labels != IGNORE_INDEX
        # The vocabulary projection dominates the head's cost, so run it on the labelled tokens only.
        logits = self.lm_head(hidden[labelled])
        loss = F.cross_entropy(logits.float(), mlm_labels[labelled]) if labelled.any() else hidden.sum() * 0.0
        return PretrainingOutput(pooled, mlm_loss=loss)


# ---------------------------------------------------------------------------------------------- tokenization


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
    `max_attr_length` tokens, typed 1 (name) and 2 (value). No special tokens inside items.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast, config: RecformerConfig):
        if not hf_tokenizer.is_fast:
            raise BackboneError(f"{hf_tokenizer.name_or_path}: a fast (Rust) tokenizer is needed for word ids")
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
    """data.item_text, or a one-line BackboneError for ID-only datasets."""
    if data.item_text is None:
        raise BackboneError(f"{data.path}: dataset has no item text (meta_data.json); Recformer reads item text")
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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters for AdamW, with no weight decay on biases and LayerNorm weights (as the paper's code)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


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


# ------------------------------------------------------------------------------------------------- backbones

TINY = "tiny"
ROBERTA_STYLE = {"roberta", "longformer", "xlm-roberta", "camembert", "recformer"}  # positions start at pad + 1
ENCODER_FAMILIES = {"bert", "electra", *ROBERTA_STYLE} - {"recformer"}  # the BERT layer layout the conversion reads
ENCODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")  # fmt: skip
PAPER_PREFIXES = ("_forward_module.model.", "model.")
SOURCE_HEADS = {  # Hugging Face LM-head names -> Longformer LM head
    "lm_head.dense.": "lm_head.dense.",
    "lm_head.layer_norm.": "lm_head.layer_norm.",
    "lm_head.decoder.": "lm_head.decoder.",
    "lm_head.bias": "lm_head.bias",
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
    "cls.predictions.decoder.": "lm_head.decoder.",
    "cls.predictions.bias": "lm_head.bias",
}


def _summarize(names: list[str], per_layer: bool = True) -> str:
    """Parameter names with layer numbers folded ('encoder.layer.*.x.weight (x12)'); without per_layer, all of a
    layer stack's tensors fold into one entry ('encoder.layer.* (192 tensors)')."""
    if per_layer:
        counts = Counter(re.sub(r"\.\d+\.", ".*.", name) for name in names)
        return ", ".join(f"{name} (x{n})" if n > 1 else name for name, n in counts.items()) or "none"
    counts = Counter(re.sub(r"\.\d+\..*", ".*", name) for name in names)
    return ", ".join(f"{name} ({n} tensors)" if n > 1 else name for name, n in counts.items()) or "none"


def _in_model_names(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder names as `model` spells them: under `longformer.` in the task models, bare in RecformerModel."""
    if isinstance(model, RecformerModel):
        return {name.removeprefix("longformer."): tensor for name, tensor in state.items()}
    encoder = ("embeddings.", "encoder.")
    return {("longformer." + name if name.startswith(encoder) else name): tensor for name, tensor in state.items()}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with encoder names under `longformer.` whatever the model class."""
    state = model.state_dict()
    return {"longformer." + n: t for n, t in state.items()} if isinstance(model, RecformerModel) else state


def copy_weights(model: nn.Module, source: Mapping[str, torch.Tensor], origin: str, notes: Mapping[str, str]) -> None:
    """Copy every tensor of `source` whose name the model has; print copied / new / unused; shapes must match."""
    source = _in_model_names(model, source)
    target = model.state_dict()
    copied, new = [], []
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in source:
                new.append(name)
                continue
            if tuple(source[name].shape) != tuple(tensor.shape):
                raise BackboneError(
                    f"{origin}: {name} has shape {tuple(source[name].shape)}, the model needs {tuple(tensor.shape)}"
                )
            tensor.copy_(source[name])
            copied.append(name)
    unused = sorted(set(source) - set(target))
    print(f"backbone {origin}: copied {len(copied)} tensors: {_summarize(copied, per_layer=False)}")
    print(f"backbone {origin}: new {len(new)} tensors: {_summarize(new)}")
    if unused:
        print(f"backbone {origin}: unused {len(unused)} tensors: {_summarize(unused)}")
    for name, note in notes.items():
        print(f"backbone {origin}: {name}: {note}")


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The weights in `directory`; a corrupt or foreign file is a one-line BackboneError naming it."""
    if (directory / "model.safetensors").exists():
        file = directory / "model.safetensors"
        try:
            return load_file(str(file))
        except Exception as error:  # noqa: BLE001 -- safetensors' Rust errors share no useful base class
            raise BackboneError(f"{file}: not a readable safetensors file ({type(error).__name__})") from None
    if (directory / "pytorch_model.bin").exists():
        return _torch_state_dict(directory / "pytorch_model.bin")
    raise BackboneError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict (unwrapped from the paper's {"module": ...}), or a one-line BackboneError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- corrupt or foreign files fail in many ways
        raise BackboneError(f"{path}: not a torch state dict ({type(error).__name__})") from None
    if not isinstance(state, Mapping):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return dict(state.get("module", state))


def _read_config(file: Path) -> dict:
    """A config.json as a dict; unreadable, invalid or non-object JSON is a one-line BackboneError naming it."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise BackboneError(f"{file}: cannot read it ({type(error).__name__})") from None
    except json.JSONDecodeError as error:
        raise BackboneError(f"{file}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise BackboneError(f"{file}: holds a JSON {type(config).__name__}, expected an object")
    return config


def _require_sizes(config: Mapping, origin: str | Path) -> None:
    """A BackboneError unless an encoder `config` holds every size the conversion reads."""
    missing = [key for key in ENCODER_FIELDS if key not in config]
    if missing:
        raise BackboneError(f"{origin}: config has no {', '.join(missing)}")


def _check_encoder_config(config: Mapping, origin: str | Path) -> None:
    """A BackboneError unless `config` describes an encoder family the conversion reads, with every size it needs."""
    family = config.get("model_type")
    if family not in ENCODER_FAMILIES:
        raise BackboneError(
            f"{origin}: model_type {family!r} is not supported (supported: {', '.join(sorted(ENCODER_FAMILIES))}, "
            f"or a Recformer checkpoint)"
        )
    _require_sizes(config, origin)


def _hf_tokenizer(location: str | Path) -> PreTrainedTokenizerFast:
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except (OSError, ValueError) as error:
        raise BackboneError(f"{location}: cannot load its tokenizer ({str(error).splitlines()[0]})") from None


def _config_from_source(source: Mapping, tokenizer: PreTrainedTokenizerFast) -> RecformerConfig:
    """Recformer config with the source encoder's sizes and the tokenizer's special ids."""
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range",
    )  # fmt: skip
    leading = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    return RecformerConfig(
        **{key: source[key] for key in keys if key in source},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=leading,
        eos_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        max_position_embeddings=source["max_position_embeddings"],
    )


def _strip_base_prefix(name: str) -> str:
    head, _, rest = name.partition(".")
    return rest if head in {"bert", "roberta", "longformer", "electra", "xlm_roberta"} and rest else name


def _convert_encoder_state(
    state: Mapping[str, torch.Tensor],
    source_config: Mapping,
    config: RecformerConfig,
    fresh: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Hugging Face BERT/RoBERTa/Longformer state dict in our names (with `longformer.` prefix), plus notes.

    `fresh` holds the new model's initial tensors, used where the conversion keeps rows the source lacks.
    """
    out, notes = {}, {}
    for name, tensor in state.items():
        name = _strip_base_prefix(name)
        head = next((prefix for prefix in SOURCE_HEADS if name.startswith(prefix)), None)
        if head is not None:
            out[SOURCE_HEADS[head] + name[len(head) :]] = tensor
        elif name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
            out["longformer." + name] = tensor
        else:
            out[name] = tensor  # pooler and the like: reported as unused
    for name in [n for n in out if re.search(r"attention\.self\.(query|key|value)\.", n)]:
        global_name = re.sub(r"\.(query|key|value)\.", r".\1_global.", name)
        if global_name not in out:
            out[global_name] = out[name]
            notes["global q/k/v"] = "copied from the local q/k/v (the Longformer recipe)"
    if "lm_head.decoder.weight" not in out and "lm_head.dense.weight" in out:
        out["lm_head.decoder.weight"] = out["longformer.embeddings.word_embeddings.weight"]
        notes["lm_head.decoder.weight"] = "tied to the word embeddings in the source, copied from them"
    if "lm_head.bias" in out:
        out["lm_head.decoder.bias"] = out["lm_head.bias"]
    _move_positions(out, source_config, config, fresh, notes)
    _seed_token_types(out, fresh, notes)
    return out, notes


def _move_positions(out, source_config, config, fresh, notes) -> None:
    """Lay the source position table out RoBERTa-style (row pad + 1 + j = token j), repeated to max_token_num."""
    key = "longformer.embeddings.position_embeddings.weight"
    table = out[key]
    pad = config.pad_token_id
    offset = pad + 1 if source_config.get("model_type") in ROBERTA_STYLE else 0
    if offset == pad + 1 and table.shape[0] == config.max_position_embeddings:
        return
    usable = table.shape[0] - offset
    moved = fresh[key].clone()
    moved[: pad + 1] = table[: pad + 1] if offset else 0.0
    moved[pad + 1 : pad + 1 + config.max_token_num] = table[offset + np.arange(config.max_token_num) % usable]
    out[key] = moved
    notes["position_embeddings"] = (
        f"{usable} source positions moved to start at row {pad + 1}"
        + (f" and repeated to {config.max_token_num}" if usable < config.max_token_num else "")
    )


def _seed_token_types(out, fresh, notes) -> None:
    """Our 4 token types replace the source's segments; each starts as segment 0, which the source added to
    every token, so the converted model computes the source's function until item positions are learned."""
    key = "longformer.embeddings.token_type_embeddings.weight"
    if key not in out or out[key].shape == fresh[key].shape:
        return
    out[key] = out[key][:1].expand_as(fresh[key]).clone()
    notes["token_type_embeddings"] = f"new table of {fresh[key].shape[0]} types, each initialised from segment 0"


def _from_hf_encoder(location: str, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 1 and 2: a Hugging Face Longformer / BERT / RoBERTa checkpoint (directory or hub name)."""
    directory = Path(location)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(location, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]))
        except Exception as error:  # noqa: BLE001 -- any hub failure means the same thing to the user
            raise BackboneError(f"{location}: not a directory and not downloadable ({type(error).__name__})") from None
    source_config = _read_config(directory / "config.json")
    _check_encoder_config(source_config, directory / "config.json")
    tokenizer = _hf_tokenizer(directory)
    config = _config_from_source(source_config, tokenizer)
    if source_config.get("model_type") not in ROBERTA_STYLE or config.max_position_embeddings < (
        config.max_token_num + config.pad_token_id + 1
    ):
        config.max_position_embeddings = config.max_token_num + config.pad_token_id + 1
    model = model_class(config)
    state, notes = _convert_encoder_state(_read_state_dict(directory), source_config, config, full_state_dict(model))
    copy_weights(model, state, str(location), notes)
    return model, RecformerTokenizer(tokenizer, config)


def _from_checkpoint(directory: Path, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 3: a directory written by save_checkpoint."""
    try:
        config = RecformerConfig.from_pretrained(str(directory))
        model = model_class(config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackboneError(f"{directory / 'config.json'}: does not describe a Recformer model ({problem})") from None
    copy_weights(model, _read_state_dict(directory), str(directory), {})
    return model, RecformerTokenizer(_hf_tokenizer(directory), config)


def _from_paper_file(path: Path, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 4: the paper's torch-saved state dicts, with config and tokenizer from the file's folder or the hub."""
    base = path.parent if (path.parent / "config.json").exists() else "allenai/longformer-base-4096"
    state = _torch_state_dict(path)
    # Checked before the config and tokenizer, which may come from the hub: a wrong file fails at once.
    if not any(name.endswith("embeddings.word_embeddings.weight") for name in state):
        raise BackboneError(f"{path}: no word_embeddings tensor; not a Recformer/Longformer state dict")
    tokenizer = _hf_tokenizer(base)
    source_config = _base_config(base)
    config = _config_from_source(source_config, tokenizer)
    model = model_class(config)
    copy_weights(model, _paper_names(state), str(path), {})
    return model, RecformerTokenizer(tokenizer, config)


def _base_config(base: str | Path) -> dict:
    if isinstance(base, Path):
        config = _read_config(base / "config.json")
        _require_sizes(config, base / "config.json")
        return config
    try:
        return AutoConfig.from_pretrained(base).to_dict()
    except OSError as error:
        raise BackboneError(f"{base}: cannot load its config ({str(error).splitlines()[0]})") from None


def _paper_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of the paper's files -> ours: drop wrapper prefixes and buffers, put the encoder under longformer."""
    out = {}
    for name, tensor in state.items():
        for prefix in PAPER_PREFIXES:
            name = name.removeprefix(prefix)
        if name.endswith("position_ids"):
            continue
        if name.startswith(("embeddings.", "encoder.")):
            name = "longformer." + name
        out[name] = tensor
    return out


def tiny_backbone(
    texts: Sequence[Mapping[str, str]], model_class, *, vocab_size: int = 2000
) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 5: a 2-layer, 64-wide random Recformer and a byte-level BPE tokenizer trained on the item texts.

    Window 16 and 2 heads: on a CPU the Longformer attention's copies, not its matrix products, dominate a model this
    small, and they shrink with the window (a training step is several times faster than with window 64).
    Initializer range 0.05 instead of 0.02: at 64 dimensions the smaller range leaves every layer's update so small
    next to the residual that the first token's output is nearly the same for every input (pairwise cosine 0.9999),
    and the contrastive loss starts with nothing to tell sequences apart.
    """
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    corpus = [f"{name} {value}" for attributes in texts for name, value in attributes.items()]
    bpe.train_from_iterator(
        corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )  # fmt: skip
    config = RecformerConfig(
        vocab_size=len(hf), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        attention_window=16, initializer_range=0.05,
        pad_token_id=hf.pad_token_id, bos_token_id=hf.cls_token_id, eos_token_id=hf.sep_token_id,
        sep_token_id=hf.sep_token_id, max_position_embeddings=1024 + hf.pad_token_id + 1,
    )  # fmt: skip
    model = model_class(config)
    print(f"backbone tiny: random {sum(p.numel() for p in model.parameters())} parameters, BPE vocabulary {len(hf)}")
    return model, RecformerTokenizer(hf, config)


def load_backbone(
    spec: str, model_class, texts: Sequence[Mapping[str, str]] | None = None
) -> tuple[nn.Module, RecformerTokenizer]:
    """(model_class instance, tokenizer) from a backbone spec (see the module docstring); texts feed "tiny"."""
    if spec == TINY:
        if texts is None:
            raise BackboneError("backbone tiny: needs item texts to train its tokenizer")
        return tiny_backbone(texts, model_class)
    path = Path(spec)
    if path.suffix == ".bin" and path.is_file():
        return _from_paper_file(path, model_class)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise BackboneError(f"{path}: no config.json; not a model directory")
        model_type = _read_config(config_file).get("model_type")
        if model_type == RecformerConfig.model_type:
            return _from_checkpoint(path, model_class)
        return _from_hf_encoder(spec, model_class)
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise BackboneError(f"{spec}: not a model directory, a .bin state dict, a hub name or 'tiny'")
    return _from_hf_encoder(spec, model_class)


def save_checkpoint(
    directory: Path, model: nn.Module, tokenizer: RecformerTokenizer, extra: Callable[[Path], None] | None = None
) -> None:
    """config.json, model.safetensors and tokenizer files in `directory`, replaced atomically; extra(tmp_dir) may add
    files to the same atomic write."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    save_atomic(Path(directory), write)
