"""Leave-one-out next-item evaluation shared by every stage, so every model is scored by the same code.

A model is seen through a `Scorer`: given left-padded histories (B, L) it returns scores for candidate items (B, C),
or for every item id (B, num_items + 1) when no candidates are given (full ranking). The target's rank is the number
of other candidates scoring at least as high, so ties never favour the target: a constant scorer ranks last, not
first (the original code counted only strictly higher scores, which makes a constant scorer look perfect).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.data import PAD, DatasetError, SeqDataset
from common.run import save_atomic

KS = (1, 5, 10, 20, 50)
NEGATIVE_SEED = 98765
Scorer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def metric_names() -> list[str]:
    return [f"HR@{k}" for k in KS] + [f"NDCG@{k}" for k in KS] + ["MRR"]


def metric_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """{"<prefix>/HR@1": ..., ..., "<prefix>/MRR": ...}: an evaluate() dict as TensorBoard tags (common.run.Scalars)."""
    return {f"{prefix}/{name}": metrics[name] for name in metric_names()}


def protocol(sample_size: int) -> str:
    """The evaluation protocol as results name it: "sampled-100" (100 negatives per user) or "full ranking"."""
    return f"sampled-{sample_size}" if sample_size > 0 else "full ranking"


def uses_paper_negatives(data: SeqDataset, sample_size: int) -> bool:
    """Whether `sample_size` negatives per user are the ones stored with the dataset (prepare_data.py paper)."""
    return data.paper_negatives is not None and data.paper_negatives.shape[1] == sample_size


def data_protocol(data: SeqDataset, sample_size: int) -> str:
    """`protocol`, naming the paper's negatives when the dataset's stored ones are used."""
    stored = ", the paper's negatives" if uses_paper_negatives(data, sample_size) else ""
    return protocol(sample_size) + stored


def result_line(label: str, metrics: dict) -> str:
    """One printed result: "test (sampled-100): HR@1 0.1234, ..., MRR 0.2345" from an evaluate() dict."""
    values = ", ".join(f"{name} {metrics[name]:.4f}" for name in metric_names())
    return f"{label} ({metrics['protocol']}): {values}"


def check_sample_size(data: SeqDataset, sample_size: int) -> None:
    """DatasetError unless every user has at least `sample_size` items it never touched to draw negatives from.

    Checked when a run starts, so an impossible --sample-size never costs an epoch of training first.
    """
    if sample_size > 0:
        _check_unseen_counts(data, sample_size, data.user_item_keys())


def _check_unseen_counts(data: SeqDataset, sample_size: int, seen_keys: np.ndarray) -> None:
    """check_sample_size on the dataset's (user, item) keys, for callers that already hold them."""
    unseen = data.num_items - np.bincount(seen_keys // (data.num_items + 1), minlength=data.num_users)
    short = np.flatnonzero(unseen < sample_size)
    if len(short):
        raise DatasetError(
            f"--sample-size: user {data.user_keys[short[0]]!r} of {data.path} has only {unseen[short[0]]} items it "
            f"never interacted with to draw negatives from; use fewer, or <= 0 for full ranking (got {sample_size})"
        )


def seen_item_mask(data: SeqDataset, rows: np.ndarray, ends: np.ndarray | None = None) -> torch.Tensor:
    """(len(rows), num_items + 1) bool: True for padding and for the items before position `ends` of each row's
    sequence (the whole sequence when `ends` is None)."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = data.offsets[rows + 1] - data.offsets[rows] if ends is None else ends
    entry_rows, items = data.prefix_items(rows, ends)
    mask = torch.zeros(len(rows), data.num_items + 1, dtype=torch.bool)
    mask[torch.from_numpy(entry_rows), torch.from_numpy(items)] = True
    mask[:, PAD] = True
    return mask


def sample_negatives(data: SeqDataset, sample_size: int, seed: int = NEGATIVE_SEED) -> np.ndarray:
    """(num_users, sample_size) negatives per user, uniform without replacement over items the user never touched.

    Drawn once per dataset and cached in <data>/negatives/ so every model is ranked against the same candidates.
    The file name holds the dataset's content fingerprint, so a changed dataset never reuses another's negatives
    (they could be its users' own items); an unreadable file is drawn again. A dataset that stores the paper's
    negatives (paper_negatives.json) returns those when `sample_size` is their count per user.
    """
    if uses_paper_negatives(data, sample_size):
        return data.paper_negatives
    directory = data.path / "negatives"
    name = f"sample{sample_size}-seed{seed}"
    cache = directory / f"{name}-{data.content_fingerprint}.npy"
    negatives = _read_negatives(cache, (data.num_users, sample_size))
    if negatives is not None:
        return negatives
    negatives = _draw_unseen_items(data, sample_size, np.random.default_rng(seed))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, because np.save would append ".npy" to the temporary name
            np.save(f, negatives)

    save_atomic(cache, write)
    for stale in [*directory.glob(f"{name}-*.npy"), directory / f"{name}.npy"]:  # earlier datasets at this path
        if stale != cache:
            stale.unlink(missing_ok=True)
    return negatives


def _read_negatives(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached negatives at `path`, or None when the file is missing, unreadable or of another shape."""
    try:
        negatives = np.load(path)
    except (OSError, ValueError, EOFError):  # missing, truncated, or not an .npy file
        return None
    return negatives if negatives.shape == shape and negatives.dtype == np.int64 else None


def require_users(data: SeqDataset, *splits: str) -> None:
    """A one-line DatasetError when a split has no user to evaluate (metrics over zero users would read as 0 and
    pick a "best" model on nothing); stages call it before training, evaluate before every evaluation."""
    for split in splits:
        if not (data.has_val if split == "val" else data.has_test).any():
            raise DatasetError(f"{data.path / f'{split}.json'}: no users to evaluate on (split {split} of {data.name})")


def _draw_unseen_items(data: SeqDataset, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rejection sampling, vectorized over users: the first n distinct unseen items of an i.i.d. uniform stream
    form a uniform sample without replacement. Rows that run short are redrawn with a longer stream."""
    seen_keys = data.user_item_keys()
    _check_unseen_counts(data, n, seen_keys)
    negatives = np.zeros((data.num_users, n), dtype=np.int64)
    pending = np.arange(data.num_users)
    stream = 2 * n + 16
    while len(pending):
        draws = rng.integers(1, data.num_items + 1, size=(len(pending), stream))
        keys = pending[:, None] * (data.num_items + 1) + draws
        found = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
        valid = seen_keys[found] != keys
        order = np.argsort(draws, axis=1, kind="stable")  # equal draws stay in stream order
        sorted_draws = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(valid)
        np.put_along_axis(repeat, order[:, 1:], sorted_draws[:, 1:] == sorted_draws[:, :-1], axis=1)
        valid &= ~repeat
        enough = valid.sum(axis=1) >= n
        first_valid = np.argsort(~valid, axis=1, kind="stable")[:, :n]
        negatives[pending[enough]] = np.take_along_axis(draws, first_valid, axis=1)[enough]
        pending = pending[~enough]
        stream *= 2
    return negatives


def target_ranks(target_scores: torch.Tensor, other_scores: torch.Tensor, valid: torch.Tensor | None = None):
    """(B,) 0-based rank of each target: how many valid other candidates score at least as high."""
    beats_target = other_scores >= target_scores[:, None]
    if valid is not None:
        beats_target &= valid
    return beats_target.sum(dim=1)


def metric_sums(ranks: torch.Tensor) -> torch.Tensor:
    """(len(metric_names()),) sums over users of HR@k, NDCG@k and MRR for 0-based ranks."""
    ranks = ranks.double()
    hits = [ranks < k for k in KS]
    discount = 1.0 / torch.log2(ranks + 2.0)
    columns = [h.double() for h in hits] + [h * discount for h in hits] + [1.0 / (ranks + 1.0)]
    return torch.stack([c.sum() for c in columns])


def evaluate(
    scorer: Scorer,
    data: SeqDataset,
    split: str,
    *,
    max_len: int,
    sample_size: int,
    device: torch.device | str,
    batch_size: int = 256,
    exclude_history: bool = False,
    seed: int = NEGATIVE_SEED,
    sharded: bool = False,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean HR@k, NDCG@k (k in KS) and MRR over the users of `split`, plus "users" (how many were scored) and
    "protocol" (see `data_protocol`).

    sample_size > 0 ranks the target against that many cached negatives; <= 0 ranks it against every item.
    exclude_history removes the user's earlier items from full ranking (off by default, as in the paper).
    sharded: every process of the default process group scores every world-th batch of users; the integer ranks
    are summed over the processes (each user's from the one that scored it), then the metrics are summed batch by
    batch as one process sums them, so every process returns exactly the one-process result.
    users: dataset rows to score, a subset of the split's users (default all of them); each keeps its own negatives.
    """
    require_users(data, split)
    rows, histories, targets = data.eval_split(split, max_len)
    if users is not None:
        kept = np.isin(rows, users)
        rows, histories, targets = rows[kept], histories[kept], targets[kept]
    history_ends = data.train_len[rows] + (split == "test")
    sampled = sample_size > 0
    negatives = sample_negatives(data, sample_size, seed)[rows] if sampled else None

    nan_scores = f"evaluation on {data.path} ({split}): the model produced NaN scores"

    def batch_ranks(batch: slice) -> tuple[torch.Tensor, bool]:
        """(users in batch,) 0-based target ranks, and whether any score was NaN."""
        history = torch.from_numpy(histories[batch]).to(device)
        target = torch.from_numpy(targets[batch]).to(device)
        if sampled:
            candidates = torch.cat([target[:, None], torch.from_numpy(negatives[batch]).to(device)], dim=1)
            scores = scorer(history, candidates).float()
            ranks = target_ranks(scores[:, 0], scores[:, 1:])
        else:
            scores = scorer(history, None).float()
            valid = torch.ones_like(scores, dtype=torch.bool)
            if exclude_history:
                valid &= ~seen_item_mask(data, rows[batch], history_ends[batch]).to(device)
            valid[:, PAD] = False
            valid.scatter_(1, target[:, None], False)
            ranks = target_ranks(scores.gather(1, target[:, None])[:, 0], scores, valid)
        return ranks, bool(torch.isnan(scores).any())

    batches = [slice(start, start + batch_size) for start in range(0, len(rows), batch_size)]
    if sharded:
        all_ranks, nan = _sharded_ranks(batch_ranks, batches, len(rows), device)
        if nan:
            raise ValueError(nan_scores)
    sums = torch.zeros(len(metric_names()), dtype=torch.float64, device=device)
    for batch in batches:
        if sharded:
            ranks = all_ranks[batch]
        else:
            ranks, nan = batch_ranks(batch)
            if nan:
                raise ValueError(nan_scores)
        sums += metric_sums(ranks)
    means = (sums / len(rows)).tolist()
    return {**dict(zip(metric_names(), means)), "users": len(rows), "protocol": data_protocol(data, sample_size)}


def _sharded_ranks(batch_ranks, batches: list[slice], users: int, device) -> tuple[torch.Tensor, bool]:
    """((users,) ranks of every user, whether any process saw a NaN score): this process scores batches rank,
    rank + world, ... and the other processes the rest; integer sums, so exact. Every process learns of a NaN, so
    all raise and none is left waiting in a collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    summed = torch.zeros(users + 1, dtype=torch.int64, device=device)  # users' ranks, then batches with NaN
    ranks = summed[:users]
    for batch in batches[rank::world]:
        ranks[batch], nan = batch_ranks(batch)
        summed[users] += nan
    dist.all_reduce(summed)
    return ranks, bool(summed[users] > 0)
