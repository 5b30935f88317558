"""The item-embedding file that connects the language model to the ID-based recommenders.

Our format: a safetensors file with one tensor `item_embeddings` of shape (num_items + 1, d), row 0 (padding) zeros,
and metadata naming the dataset fingerprint it was made for, the checkpoint and the dimension. The paper's code saves a
bare tensor with torch.save; those files load too (with weights_only=True, so no code can run from them), without a
fingerprint to check.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from common.data import SeqDataset
from common.run import save_atomic

TENSOR_NAME = "item_embeddings"
PAPER_HIDDEN_SIZE = 768


class EmbeddingFileError(ValueError):
    """An embedding file does not fit the dataset; the message names the file and the problem in one line."""


def default_embeddings_path(data_dir: Path) -> Path:
    return Path(data_dir) / "embeddings" / "plm.safetensors"


def save_item_embeddings(path: Path, table: torch.Tensor, data: SeqDataset, checkpoint: str) -> None:
    """Write `table` (num_items + 1, d) for `data` atomically; row 0 is forced to zeros (padding)."""
    if table.shape[0] != data.num_items + 1:
        raise EmbeddingFileError(f"{path}: table has {table.shape[0]} rows, dataset needs {data.num_items + 1}")
    table = table.detach().float().cpu().contiguous().clone()
    table[0] = 0.0
    metadata = {
        "dataset_fingerprint": data.fingerprint,
        "dataset": data.name,
        "checkpoint": str(checkpoint),
        "dim": str(table.shape[1]),
        "num_items": str(data.num_items),
    }
    save_atomic(Path(path), lambda tmp: save_file({TENSOR_NAME: table}, str(tmp), metadata=metadata))


def _read_table(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(table, metadata) from our safetensors file or the paper's torch-saved tensor."""
    if not path.exists():
        raise EmbeddingFileError(f"{path}: embedding file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            # torch's own message spans lines and advises weights_only=False, which would run arbitrary code
            raise EmbeddingFileError(
                f"{path}: neither a safetensors file nor a torch-saved tensor ({type(error).__name__})"
            ) from None
        if not isinstance(loaded, torch.Tensor):
            raise EmbeddingFileError(f"{path}: torch file holds a {type(loaded).__name__}, expected one tensor")
        return loaded, {}
    if TENSOR_NAME not in tensors:
        raise EmbeddingFileError(f"{path}: no tensor named {TENSOR_NAME!r}")
    return tensors[TENSOR_NAME], metadata


def load_item_embeddings(path: Path, data: SeqDataset) -> torch.Tensor:
    """The validated float32 table (num_items + 1, d) stored at `path` for dataset `data`."""
    path = Path(path)
    table, metadata = _read_table(path)
    if table.dim() != 2:
        raise EmbeddingFileError(f"{path}: expected a 2-d table, got shape {tuple(table.shape)}")
    if table.shape[0] != data.num_items + 1:
        raise EmbeddingFileError(
            f"{path}: {table.shape[0]} rows, but {data.path} has {data.num_items} items (+1 padding row)"
        )
    fingerprint = metadata.get("dataset_fingerprint")
    if fingerprint is not None and fingerprint != data.fingerprint:
        raise EmbeddingFileError(
            f"{path}: made for another dataset ({metadata.get('dataset', '?')}, fingerprint {fingerprint}), "
            f"not {data.path} (fingerprint {data.fingerprint})"
        )
    table = table.float()
    if not torch.isfinite(table).all():
        raise EmbeddingFileError(f"{path}: table holds non-finite values")
    return table


def pca_project(table: torch.Tensor, dim: int) -> torch.Tensor:
    """(num_items + 1, D) -> (num_items + 1, dim): item rows centred and projected on their top `dim` principal axes.

    Row 0 (padding) stays zero. Each axis is signed so that its largest loading is positive, which makes the result
    independent of the SVD routine's arbitrary signs.
    """
    items = table[1:].double()
    centred = items - items.mean(dim=0)
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)  # axes: (min(n, D), D), by decreasing variance
    axes = axes[:dim]
    largest = axes.abs().argmax(dim=1)
    axes = axes * axes.gather(1, largest[:, None]).sign()
    projected = table.new_zeros(table.shape[0], dim)
    projected[1:] = (centred @ axes.T).to(table.dtype)
    return projected


def initial_item_table(path: Path, data: SeqDataset, hidden_size: int | None, project: str) -> torch.Tensor:
    """The PLM table (num_items + 1, hidden_size) a recommender starts from: loaded, validated, PCA-reduced if asked.

    project "none" demands that the file's dimension equals hidden_size; "pca" reduces it (never enlarges it).
    hidden_size None keeps the file's dimension.
    """
    path = Path(path)
    table = load_item_embeddings(path, data)
    dim = table.shape[1]
    hidden_size = dim if hidden_size is None else hidden_size
    if project == "pca":
        if hidden_size > min(dim, data.num_items):
            raise EmbeddingFileError(
                f"{path}: PCA cannot produce {hidden_size} dimensions from {data.num_items} items of dimension {dim}"
            )
        return pca_project(table, hidden_size)
    if project != "none":
        raise ValueError(f"project must be 'none' or 'pca', not {project!r}")
    if dim != hidden_size:
        raise EmbeddingFileError(
            f"{path}: vectors have dimension {dim} but the model's hidden size is {hidden_size}; "
            "pass --project pca to reduce them"
        )
    return table


def plm_init(
    data: SeqDataset, init_type: str, embeddings: Path | None, hidden_size: int | None, project: str
) -> tuple[torch.Tensor | None, int]:
    """(initial item table or None, model width) from the recommenders' --init-type, --embeddings, --hidden-size
    and --project: "plm" reads the file (default <data>/embeddings/plm.safetensors) and the width is the table's;
    "none" has no table and the width is --hidden-size, else the paper's 768."""
    if init_type != "plm":
        return None, hidden_size or PAPER_HIDDEN_SIZE
    table = initial_item_table(embeddings or default_embeddings_path(data.path), data, hidden_size, project)
    return table, table.shape[1]
