"""Recformer's configuration.

    RecformerConfig          LongformerConfig + Recformer's fields (window 64, 4 token types, 1024 tokens, 51 item
                             positions, 3 attributes of 32 tokens, cls pooling, temperature 0.05, MLM weight 0.1),
                             registered with AutoConfig as model type "recformer".
"""

from __future__ import annotations

from transformers import AutoConfig, LongformerConfig


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
