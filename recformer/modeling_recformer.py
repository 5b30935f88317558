"""Recformer's model: a Longformer whose embeddings know item positions and attribute token types.

    RecformerModel           embeddings (word + RoBERTa-style position + token type + item position) and the
                             `transformers` Longformer encoder; forward(**batch) -> (hidden (B, T, H), pooled (B, H)),
                             pooled = the first token. Its attention is computed by recformer/attention_recformer.py
                             ("fast", the default) or by `transformers` ("hf", the reference): set_attention(model,
                             kind), a runtime choice that checkpoints do not record.
    RecformerForSeqRec       .longformer + a fixed item table; cosine(pooled, item) / temp, full or sampled softmax.
    RecformerForPretraining  .longformer + the Longformer LM head; forward(**batch, mlm_labels=None) ->
                             PretrainingOutput(pooled, mlm_logits, mlm_loss); labels equal to IGNORE_INDEX are not
                             scored.

The configuration is recformer/configuration_recformer.py; inputs come from common/recformer_data.py (build_batch);
weights from recformer/convert_recformer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.longformer.modeling_longformer import (
    LongformerEncoder,
    LongformerLMHead,
    LongformerPreTrainedModel,
)

from common.data import PAD
from recformer.attention_recformer import check_recformer_masks, run_encoder
from recformer.configuration_recformer import RecformerConfig

ATTENTIONS = ("fast", "hf")
IGNORE_INDEX = -100  # label of tokens the MLM loss skips (torch's cross_entropy default ignore_index)


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
        # The Longformer encoder reads one mask whose sign says each token's kind: < 0 masked, 0 local, > 0 global.
        token_kind = torch.where(attention_mask.bool(), global_attention_mask.bool().long(), -1)
        token_kind = F.pad(token_kind, (0, extra), value=-1)
        hidden = self.encoder(hidden, attention_mask=token_kind.to(hidden.dtype), return_dict=True).last_hidden_state
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
