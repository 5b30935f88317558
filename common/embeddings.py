"""The item-embedding file that connects the language model to the ID-based recommenders.

Our format: a safetensors file with one tensor `item_embeddings` of shape (num_items + 1, d), row 0 (padding) zeros,
and metadata naming the dataset fingerprint it was made for, the checkpoint and the dimension. The paper's code saves a
bare tensor with torch.save (rows in the order of its smap, row 0 zeros); those files load too (with
weights_only=True, so no code can run from them), but name no items, so they load only into a dataset that keeps the
numbering of the smap it was imported from (prepare_data.py paper / recformer, recorded in numbering.json), or with
the smap.json their rows follow (--embeddings-smap), which reorders them to the dataset's ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from common.cli import FlagError
from common.data import SeqDataset, read_smap
from common.run import InputError, load_torch_file, save_atomic

TENSOR_NAME = "item_embeddings"
STAGE_TABLE_FILE = "item_table.safetensors"  # beside a fine-tuning stage's checkpoint: the table its validation used
PAPER_HIDDEN_SIZE = 768
WHITEN_EPS = 1e-6  # relative floor of the eigenvalues PCA-whitening divides by


class EmbeddingFileError(InputError):
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


def _read_table(path: Path) -> tuple[torch.Tensor, dict[str, str] | None]:
    """(table, metadata) from our safetensors file, or (table, None) from the paper's torch-saved tensor."""
    if not path.exists():
        raise EmbeddingFileError(
            f"{path}: embedding file not found; export_embeddings.py writes it "
            f"(python export_embeddings.py --checkpoint <model> --data <dataset> --out {path})"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        try:
            loaded = load_torch_file(path)
        except Exception as error:
            # torch's own message spans lines and advises weights_only=False, which would run arbitrary code
            raise EmbeddingFileError(
                f"{path}: neither a safetensors file nor a torch-saved tensor ({type(error).__name__})"
            ) from None
        if not isinstance(loaded, torch.Tensor):
            raise EmbeddingFileError(f"{path}: torch file holds a {type(loaded).__name__}, expected one tensor")
        return loaded, None
    if TENSOR_NAME not in tensors:
        raise EmbeddingFileError(f"{path}: no tensor named {TENSOR_NAME!r}")
    if "dataset_fingerprint" not in metadata:
        print(f"{path}: no dataset fingerprint in its metadata (not written by export_embeddings.py), so the check "
              "that it was made for this dataset is skipped; only its row count is checked")
    return tensors[TENSOR_NAME], metadata


def _rows_by_smap(path: Path, table: torch.Tensor, smap_path: Path, data: SeqDataset) -> torch.Tensor:
    """A bare table whose rows follow `smap_path` (row = id, shifted to 1-based) reordered to `data`'s item ids."""
    source_keys, _ = read_smap(Path(smap_path))
    if table.shape[0] != len(source_keys):
        raise EmbeddingFileError(
            f"{path}: {table.shape[0]} rows, but --embeddings-smap {smap_path} has {len(source_keys) - 1} items "
            "(+1 padding row)"
        )
    row_of = {key: row for row, key in enumerate(source_keys)}
    missing = next((key for key in data.item_keys[1:] if key not in row_of), None)
    if missing is not None:
        raise EmbeddingFileError(f"--embeddings-smap: item {missing!r} of {data.path} is not in {smap_path}")
    return table[[0] + [row_of[key] for key in data.item_keys[1:]]]


def load_item_embeddings(path: Path, data: SeqDataset, rows_smap: Path | None = None) -> torch.Tensor:
    """The validated float32 table (num_items + 1, d) stored at `path` for dataset `data`.

    A bare tensor (the paper's file) needs a dataset that keeps its imported smap's numbering, or `rows_smap`, the
    smap.json its rows follow (--embeddings-smap).
    """
    path = Path(path)
    table, metadata = _read_table(path)
    return checked_table(path, table, metadata, data, rows_smap)


def checked_table(
    path: Path, table: torch.Tensor, metadata: dict[str, str] | None, data: SeqDataset, rows_smap: Path | None = None
) -> torch.Tensor:
    """`table` read from `path` (metadata None: a bare tensor) validated for `data` as `load_item_embeddings` says."""
    if table.dim() != 2:
        raise EmbeddingFileError(f"{path}: expected a 2-d table, got shape {tuple(table.shape)}")
    if metadata is not None and rows_smap is not None:
        raise EmbeddingFileError(f"--embeddings-smap: {path} names its dataset itself; the flag is for bare tensors")
    if rows_smap is not None:
        table = _rows_by_smap(path, table, rows_smap, data)
    if table.shape[0] != data.num_items + 1:
        raise EmbeddingFileError(
            f"{path}: {table.shape[0]} rows, but {data.path} has {data.num_items} items (+1 padding row)"
        )
    if metadata is None and rows_smap is None and not data.keeps_imported_numbering:
        raise EmbeddingFileError(
            f"{path}: a bare tensor names no items and {data.path} does not keep an imported smap's numbering "
            "(prepare_data.py paper or recformer); pass --embeddings-smap with the smap.json its rows follow"
        )
    fingerprint = (metadata or {}).get("dataset_fingerprint")
    if fingerprint is not None and fingerprint != data.fingerprint:
        raise EmbeddingFileError(
            f"{path}: made for another dataset ({metadata.get('dataset', '?')}, fingerprint {fingerprint}), "
            f"not {data.path} (fingerprint {data.fingerprint})"
        )
    table = table.float()
    if not torch.isfinite(table).all():
        raise EmbeddingFileError(f"{path}: table holds non-finite values")
    return table


def _signed_by_largest_loading(axes: torch.Tensor) -> torch.Tensor:
    """axes (k, D), one per row, each flipped so that its largest loading is positive: results then do not depend on
    the decomposition routine's arbitrary signs."""
    largest = axes.abs().argmax(dim=1)
    return axes * axes.gather(1, largest[:, None]).sign()


def pca_project(table: torch.Tensor, dim: int) -> torch.Tensor:
    """(num_items + 1, D) -> (num_items + 1, dim): item rows centred and projected on their top `dim` principal axes.

    Row 0 (padding) stays zero. Each axis is signed so that its largest loading is positive.
    """
    items = table[1:].double()
    centred = items - items.mean(dim=0)
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)  # axes: (min(n, D), D), by decreasing variance
    axes = _signed_by_largest_loading(axes[:dim])
    projected = table.new_zeros(table.shape[0], dim)
    projected[1:] = (centred @ axes.T).to(table.dtype)
    return projected


def _whiten(centred: torch.Tensor) -> torch.Tensor:
    """centred (n, D) -> (n, D) on the principal axes (decreasing variance), each axis divided by its standard
    deviation, so the covariance becomes the identity. Eigenvalues below WHITEN_EPS x the largest are raised to that
    floor: directions the items do not span stay near zero instead of turning numerical noise into unit variance."""
    covariance = centred.T @ centred / len(centred)  # (D, D)
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    variances, vectors = variances.flip(0), vectors.flip(1)
    axes = _signed_by_largest_loading(vectors.T)  # (D, D), one axis per row
    return (centred @ axes.T) / variances.clamp_min(WHITEN_EPS * variances[0]).sqrt()


def transform_items(table: torch.Tensor, transform: str, target_std: float) -> torch.Tensor:
    """(num_items + 1, d) -> (num_items + 1, d): the --init-transform of a PLM item table.

    "none" returns the table as is (the paper copies the vectors). "center" subtracts the mean item vector; "whiten"
    PCA-whitens the items (BERT-whitening, as UniSRec whitens its text vectors). Both then scale the items so that
    their element standard deviation is `target_std`, the one the model's own random initialisation gives its table:
    raw language-model vectors share one dominant direction (mean pairwise cosine 0.66 for MiniLM on Scientific) and
    are ~20x longer than SASRec's random rows, which slows training from them. The mean and covariance are taken over
    the items only; row 0 (padding) stays zero.
    """
    if transform == "none":
        return table
    if transform not in ("center", "whiten"):
        raise ValueError(f"transform must be 'none', 'center' or 'whiten', not {transform!r}")
    items = table[1:].double()
    items = items - items.mean(dim=0)
    if transform == "whiten":
        items = _whiten(items)
    # The items are centred, so their element standard deviation is the root mean square.
    items = items * (target_std / items.pow(2).mean().sqrt())
    transformed = table.new_zeros(table.shape)
    transformed[1:] = items.to(table.dtype)
    return transformed


def initial_item_table(
    path: Path,
    data: SeqDataset,
    hidden_size: int | None,
    project: str,
    transform: str = "none",
    target_std: Callable[[int], float] | None = None,
    rows_smap: Path | None = None,
) -> torch.Tensor:
    """The PLM table (num_items + 1, hidden_size) a recommender starts from: loaded, validated (rows_smap: see
    `load_item_embeddings`), PCA-reduced if asked, then transformed (`transform_items`; target_std(width) is the
    model's random-initialisation std at that width).

    project "none" demands that the file's dimension equals hidden_size; "pca" reduces it (never enlarges it).
    hidden_size None keeps the file's dimension. Reduction comes first, so "whiten" whitens the kept components.
    """
    path = Path(path)
    table = load_item_embeddings(path, data, rows_smap)
    dim = table.shape[1]
    hidden_size = dim if hidden_size is None else hidden_size
    if project == "pca":
        if hidden_size > min(dim, data.num_items):
            raise EmbeddingFileError(
                f"{path}: PCA cannot produce {hidden_size} dimensions from {data.num_items} items of dimension {dim}"
            )
        table = pca_project(table, hidden_size)
    elif project != "none":
        raise ValueError(f"project must be 'none' or 'pca', not {project!r}")
    elif dim != hidden_size:
        raise EmbeddingFileError(
            f"{path}: vectors have dimension {dim} but the model's hidden size is {hidden_size}; "
            "pass --project pca to reduce them"
        )
    if transform == "none":
        return table
    if target_std is None:
        raise ValueError(f"transform {transform!r} needs target_std, the model's random-initialisation std")
    _check_transformable(path, table, transform)
    transformed = transform_items(table, transform, target_std(hidden_size))
    if not torch.isfinite(transformed).all():
        raise EmbeddingFileError(f"{path}: --init-transform {transform} gives non-finite vectors for this table")
    return transformed


def _check_transformable(path: Path, table: torch.Tensor, transform: str) -> None:
    """An EmbeddingFileError, before any training, for a table --init-transform center/whiten cannot rescale: item
    vectors that are all equal (all zero, say) have no spread to rescale (0/0 gives NaN scores after an epoch), and
    entries so large that their squares overflow float32 would do the same in the model."""
    items = table[1:].double()
    if not (items.abs().pow(2).sum(dim=1) < torch.finfo(torch.float32).max).all():
        largest = float(items.abs().max())
        raise EmbeddingFileError(
            f"{path}: entries up to {largest:.3g} are too large for --init-transform {transform} (their squares "
            "overflow float32)"
        )
    if len(items) < 2 or not (items != items[0]).any():
        raise EmbeddingFileError(f"{path}: every item vector is the same, so --init-transform {transform} has no "
                                 "spread to rescale")  # fmt: skip


PLM_ONLY_FLAGS = {"embeddings": None, "embeddings_smap": None, "project": "none", "init_transform": "none"}  # unset


def refuse_plm_flags_without_plm(args) -> None:
    """FlagError for a flag about the PLM table (--embeddings, --embeddings-smap, --project, --init-transform)
    given with --init-type none, which would ignore it without a word. Called by the recommenders' Args on
    construction."""
    if args.init_type == "plm":
        return
    for name, unset in PLM_ONLY_FLAGS.items():
        value = getattr(args, name)
        if value != unset:
            raise FlagError(name, "applies only with --init-type plm, which this run does not use", value)


def plm_table_path(data: SeqDataset, embeddings: Path | None) -> Path:
    """The file --init-type plm reads: --embeddings, default <data>/embeddings/plm.safetensors."""
    return Path(embeddings or default_embeddings_path(data.path))


def announce_item_table(data: SeqDataset, args) -> dict | None:
    """What a recommender's PLM item table is (`args`: SASRec's or BERT4Rec's Args), printed as the run's first
    line and returned for its config.json: the resolved file, the sha256 of its bytes (a re-exported table is told
    apart from the one a run used) and of its values alone (see table_values_sha256), and the --init-transform;
    None without --init-type plm."""
    if args.init_type != "plm":
        return None
    path = plm_table_path(data, args.embeddings)
    record = {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "values_sha256": table_values_sha256(path),
        "transform": args.init_transform,
    }
    print(f"item table {record['path']} (sha256 {record['sha256']}), --init-transform {args.init_transform}")
    return record


def table_values_sha256(path: Path) -> str:
    """sha256 of the values in an item-table file (every tensor's bytes, by tensor name), not of the file: two
    exports of equal vectors differ in bytes, since safetensors writes its metadata in no fixed order."""
    try:
        with safe_open(str(path), framework="pt") as table:
            tensors = [table.get_tensor(name) for name in sorted(table.keys())]
    except (SafetensorError, OSError, ValueError):
        tensors = [load_torch_file(path)]  # the paper's bare tensor
    values = hashlib.sha256()
    for tensor in tensors:
        values.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return values.hexdigest()


def run_tag(item_table: dict | None) -> str:
    """The middle of a default run directory's name: "none" for a random table, else "plm-<transform>"."""
    return "none" if item_table is None else f"plm-{item_table['transform']}"


def plm_init(data: SeqDataset, args, target_std: Callable[[int], float]) -> tuple[torch.Tensor | None, int]:
    """(initial item table or None, model width) from a recommender's Args (SASRec's or BERT4Rec's: --init-type,
    --embeddings, --hidden-size, --project, --init-transform, --embeddings-smap): "plm" reads the file (default
    <data>/embeddings/plm.safetensors) and the width is the table's; "none" has no table (the transform is ignored)
    and the width is --hidden-size, else the paper's 768.
    target_std(width): the element std of the model's own random item table at that width."""
    if args.init_type != "plm":
        return None, args.hidden_size or PAPER_HIDDEN_SIZE
    path = plm_table_path(data, args.embeddings)
    table = initial_item_table(path, data, args.hidden_size, args.project, args.init_transform, target_std,
                               args.embeddings_smap)  # fmt: skip
    return table, table.shape[1]
