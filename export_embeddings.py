"""Export Recformer item vectors: the table that initialises SASRec / BERT4Rec (`--init-type plm`).

Every item is encoded as a one-item sequence (leading token + the item's attribute tokens), exactly as fine-tuning
builds its item table (the same `encode_items`), and its first-token vector is its row. The checkpoint decides the
paper's variant:

    raw PLM (a Hugging Face Longformer / BERT / RoBERTa, or "tiny")   -> "longformer"
    pre-trained Recformer (pretrain_recformer.py output)               -> "pretrain"
    <finetune_recformer.py out>/stage1                                 -> "finetune"

Output: a safetensors file with tensor `item_embeddings` (items + 1, d), row 0 zeros, and metadata naming the dataset
fingerprint, the checkpoint and the dimension (common/embeddings.py); written atomically.

    python export_embeddings.py --checkpoint runs/finetune/<run>/stage1 --data data/synthetic
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from common.data import DatasetError, load_dataset
from common.embeddings import EmbeddingFileError, default_embeddings_path, save_item_embeddings
from common.recformer import (
    BackboneError,
    RecformerModel,
    dataset_item_tokens,
    encode_items,
    item_texts,
    load_backbone,
    set_attention,
)
from common.run import precision, resolve_device, seed_everything


@dataclass
class Args:
    checkpoint: str
    """Weights to encode with: a Recformer checkpoint directory, a Hugging Face Longformer / BERT / RoBERTa directory
    or hub name, the paper's .bin state dict, or "tiny" (random; seeded by --seed)."""
    data: Path = Path("data/synthetic")
    """Dataset directory with item text (written by prepare_data.py)."""
    out: Path | None = None
    """Output file; default <data>/embeddings/plm.safetensors."""
    batch_size: int = 64
    """Items per forward pass (items are sorted by token count, so batches carry little padding)."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ..."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Autocast precision of the encoder; the table is stored as float32 either way."""
    seed: int = 42
    """Seed for the random parts of a converted backbone (new tables, "tiny")."""
    attention: Literal["fast", "hf"] = "fast"
    """Encoder attention: "fast" (fused kernels, common/recformer_attention.py) or "hf" (Hugging Face's Longformer
    attention, the reference); the same function and weights."""


def main(args: Args) -> None:
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be at least 1")
    seed_everything(args.seed)
    device = resolve_device(args.device)
    out = args.out or default_embeddings_path(args.data)
    try:
        data = load_dataset(args.data)
        encoder, tokenizer = load_backbone(args.checkpoint, RecformerModel, item_texts(data))
        tokens = dataset_item_tokens(tokenizer, data)
    except (DatasetError, BackboneError, EmbeddingFileError) as error:
        raise SystemExit(f"error: {error}") from None
    set_attention(encoder, args.attention)
    encoder.to(device)
    began = time.time()
    dtype = precision(args.dtype, device)
    table = encode_items(encoder, tokens, batch_size=args.batch_size, device=device, autocast_dtype=dtype)
    seconds = time.time() - began
    save_item_embeddings(out, table, data, args.checkpoint)
    print(f"wrote {out}: {data.num_items} items x {table.shape[1]} in {seconds:.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
