"""Sequential-recommendation datasets: one on-disk format for every stage, loaded into flat arrays.

A dataset is a directory in the layout of Recformer's processed fine-tuning data:

    train.json  {user_id: [item_id, ...]}   training part of each sequence, time order
    val.json    {user_id: [item_id]}        second-to-last item (validation target)
    test.json   {user_id: [item_id]}        last item (test target)
    smap.json   {original item key: item_id}
    umap.json   {original user key: user_id}
    meta_data.json {original item key: {attribute: text, ...}}   (optional: absent for ID-only datasets)
    stats.json  summary written by prepare_data.py
    numbering.json  {"source": importer, "smap_fingerprint": ...}   (optional: the item numbering is an imported
                smap's, so the paper's bare-tensor embedding files fit it; see common/embeddings.py)
    paper_negatives.json {user_id: [item_id, ...]}   (optional: the paper's sampled evaluation negatives)

Item ids we write are 1-based; 0 is padding. Files written by the original Recformer processing are 0-based and are
shifted on load. In memory every user's full sequence (train + val + test) lives in one CSR pair (`Sequences`:
`offsets`, `items`), as do the pre-training corpus's sequences, so a 3.6M-sequence corpus costs two integer arrays,
not millions of Python lists.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.run import InputError

PAD = 0
SPLIT_FILES = ("train.json", "val.json", "test.json")
DATASET_FILES = (*SPLIT_FILES, "smap.json", "umap.json", "stats.json")
CORPUS_FILES = ("train.json", "dev.json", "meta_data.json", "stats.json")
CACHE_DIRS = ("negatives", "recformer_tokens")  # what the stages add to a dataset; rebuilt when missing
NUMBERING_FILE = "numbering.json"
PAPER_NEGATIVES_FILE = "paper_negatives.json"
OPTIONAL_DATASET_FILES = ("meta_data.json", NUMBERING_FILE, PAPER_NEGATIVES_FILE)


class DatasetError(InputError):
    """A dataset file is missing or inconsistent; the message names the file and the problem in one line."""


@dataclass
class Sequences:
    """Item-id sequences stored flat (CSR): sequence i is items[offsets[i]:offsets[i + 1]], oldest first. Two
    integer arrays however many sequences there are; datasets and the pre-training corpus both hold theirs so."""

    offsets: np.ndarray
    """(n + 1,) int64 CSR offsets into `items`; offsets[0] == 0."""
    items: np.ndarray
    """(total,) int64 item ids of every sequence, one sequence after the other."""

    @staticmethod
    def from_lengths(lengths: Iterable[int], items: Iterable[int]) -> Sequences:
        """The sequences of these lengths, whose items come one sequence after the other in `items`. Both may be
        generators, so no Python list per sequence is built (a corpus of millions of sequences stays two arrays)."""
        lengths = np.fromiter(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Sequences(offsets, np.fromiter(items, dtype=np.int64, count=int(offsets[-1])))

    @staticmethod
    def from_lists(lists: Sequence[Sequence[int]]) -> Sequences:
        """The sequences `lists` (item ids, oldest first) in CSR form."""
        return Sequences.from_lengths(map(len, lists), itertools.chain.from_iterable(lists))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """(n,) int64 length of each sequence."""
        return np.diff(self.offsets)

    def sequence(self, row: int) -> np.ndarray:
        """Sequence `row`, oldest item first."""
        return self.items[self.offsets[row] : self.offsets[row + 1]]

    def left_padded(self, rows: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
        """(len(rows), length): the `length` items before position `ends[i]` of each row's sequence, right-aligned.

        Missing positions on the left hold PAD, so column -1 is always the most recent item.
        """
        rows = np.asarray(rows, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        starts = self.offsets[rows]
        # positions[i, j] indexes items[]; column j = length - 1 is the item just before ends[i].
        positions = (starts + ends)[:, None] - length + np.arange(length)[None, :]
        valid = positions >= starts[:, None]
        return np.where(valid, self.items[np.where(valid, positions, 0)], PAD)

    def prefix_items(self, rows: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each entry, item) for the first ends[i] items of each row in `rows`, flat, in row order."""
        rows = np.asarray(rows, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        entry_rows = np.repeat(np.arange(len(rows)), ends)
        position_in_row = np.arange(ends.sum()) - np.repeat(np.cumsum(ends) - ends, ends)
        return entry_rows, self.items[self.offsets[rows][entry_rows] + position_in_row]


@dataclass
class SeqDataset(Sequences):
    """One row per user: `offsets` and `items` (see Sequences) hold each user's full sequence (train, then val
    target, then test target)."""

    path: Path
    """Dataset directory."""
    item_keys: list[str]
    """item_keys[i] is the original key of item id i; item_keys[0] == "" (padding)."""
    user_keys: list[str]
    """Original key of each user row; rows are sorted by the json user id."""
    train_len: np.ndarray
    """(num_users,) int64: length of the training part of each sequence."""
    has_val: np.ndarray
    """(num_users,) bool: the user has a validation target (the item right after the training part)."""
    has_test: np.ndarray
    """(num_users,) bool: the user has a test target (the item right after the validation target)."""
    item_text: list[dict[str, str]] | None
    """item_text[i] holds item i's attributes in file order ([0] = {}); None for ID-only datasets."""
    numbering: dict | None = None
    """numbering.json: which importer kept an imported smap's item numbering, and that smap's fingerprint."""
    paper_negatives: np.ndarray | None = None
    """(num_users, N) int64 evaluation negatives stored with the dataset (paper_negatives.json), or None."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def num_items(self) -> int:
        return len(self.item_keys) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        """Hash of the item keys in id order: an embedding table made for one dataset fits another only if equal."""
        return smap_fingerprint(self.item_keys[1:])

    @property
    def keeps_imported_numbering(self) -> bool:
        """The items are numbered as the smap they were imported from (numbering.json), and still are: the rows of
        a table made for that smap (the paper's bare tensors) are this dataset's items."""
        return self.numbering is not None and self.numbering.get("smap_fingerprint") == self.fingerprint

    @functools.cached_property
    def content_fingerprint(self) -> str:
        """Hash of the item and user keys, every sequence and its split: caches derived from the interactions
        (evaluation negatives) are valid only for the dataset with the same content fingerprint. Computed once per
        loaded dataset (seconds for millions of sequences), as evaluation asks for it at every epoch."""
        digest = hashlib.sha256()
        for part in ("\n".join(self.item_keys), "\n".join(self.user_keys)):
            digest.update(part.encode("utf-8") + b"\0")
        for array in (self.offsets, self.items, self.train_len, self.has_val, self.has_test):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def user_item_keys(self, ends: np.ndarray | None = None) -> np.ndarray:
        """Sorted unique keys row * (num_items + 1) + item of the first ends[row] items of every user (the whole
        sequence when None): membership tests by binary search at one integer per interaction."""
        ends = self.lengths if ends is None else ends
        rows, items = self.prefix_items(np.arange(self.num_users), ends)
        return np.unique(rows * (self.num_items + 1) + items)

    def train_matrix(self, length: int) -> np.ndarray:
        """(num_users, length) left-padded training parts."""
        return self.left_padded(np.arange(self.num_users), self.train_len, length)

    def eval_split(self, split: str, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, histories (n, length), targets (n,)) for the users evaluated on `split` ("val" or "test").

        The validation history is the training part; the test history is the training part plus the val target.
        """
        if split == "val":
            rows = np.flatnonzero(self.has_val)
            ends = self.train_len[rows]
        elif split == "test":
            rows = np.flatnonzero(self.has_test)
            ends = self.train_len[rows] + 1
        else:
            raise ValueError(f"split must be 'val' or 'test', not {split!r}")
        targets = self.items[self.offsets[rows] + ends]
        return rows, self.left_padded(rows, ends, length), targets


def smap_fingerprint(keys_in_id_order: Sequence[str]) -> str:
    """Hash of an smap's item keys in id order (SeqDataset.fingerprint of a dataset numbered by it)."""
    return hashlib.sha256("\n".join(keys_in_id_order).encode("utf-8")).hexdigest()[:16]


def reject_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise DatasetError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def read_json(path: Path, kind: type = dict):
    """A JSON file whose top level is a `kind` (dict or list), rejecting duplicate keys (json.load would silently
    keep the last one); every problem is a one-line DatasetError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=reject_duplicate_keys)
    except DatasetError as error:
        raise DatasetError(f"{path}: {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, kind):
        raise DatasetError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__} at top level")
    return data


def item_attributes(meta_path: Path, key: str, attributes) -> dict[str, str]:
    """One meta_data.json entry as {attribute name: text} in file order (null text becomes "")."""
    if not isinstance(attributes, dict):
        raise DatasetError(f"{meta_path}: entry of item {key!r} is not an object of attributes")
    return {str(name): "" if value is None else str(value) for name, value in attributes.items()}


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_map(path: Path) -> dict[str, int]:
    mapping = read_json(path)
    for key, value in mapping.items():
        if not _is_integer(value):
            raise DatasetError(f"{path}: id of {key!r} is {value!r}, not an integer")
    ids = sorted(mapping.values())
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: two keys share one id")
    return mapping


def _split_lists(path: Path) -> dict[int, list[int]]:
    raw = read_json(path)
    split, keys = {}, {}
    for user, sequence in raw.items():
        if not isinstance(sequence, list):
            raise DatasetError(f"{path}: user {user!r} does not map to a list of integer item ids")
        bad = next((i for i in sequence if not _is_integer(i)), None)
        if bad is not None:  # JSON true/false would pass isinstance(i, int) as 1/0
            raise DatasetError(f"{path}: user {user!r} has item id {json.dumps(bad)}, not an integer")
        if not sequence:
            raise DatasetError(f"{path}: user {user!r} has an empty sequence")
        try:
            number = int(user)
        except ValueError:
            raise DatasetError(f"{path}: user id {user!r} is not an integer") from None
        if number in keys:  # "1" and "01" are one user id: one history would silently replace the other
            raise DatasetError(f"{path}: user keys {keys[number]!r} and {user!r} are the same user id {number}")
        keys[number] = user
        split[number] = sequence
    return split


def _check_item_range(path: Path, split: dict[int, list[int]], low: int, high: int) -> None:
    """Every item id in `split` lies in [low, high]; vectorized, the offending user is looked up only on failure."""
    try:
        flat = np.fromiter((i for sequence in split.values() for i in sequence), dtype=np.int64)
        in_range = not flat.size or (flat.min() >= low and flat.max() <= high)
    except OverflowError:  # an id beyond int64, e.g. 10**30
        in_range = False
    if not in_range:
        user, item = next((u, i) for u, seq in split.items() for i in seq if not low <= i <= high)
        raise DatasetError(f"{path}: user {user} has item id {item} that is not in smap.json")


def read_smap(path: Path) -> tuple[list[str], int]:
    """(item keys by 1-based id, with "" at 0; the shift that made them 1-based) of an smap.json {key: id}.

    The original Recformer processing numbers items from 0; those ids are shifted by 1 so that 0 is padding.
    """
    smap = _id_map(path)
    shift = 1 if min(smap.values(), default=1) == 0 else 0
    if sorted(smap.values()) != list(range(1 - shift, len(smap) + 1 - shift)):
        raise DatasetError(f"{path}: item ids are not contiguous from 1 (or from 0)")
    item_keys = [""] * (len(smap) + 1)
    for key, item in smap.items():
        item_keys[item + shift] = key
    return item_keys, shift


def load_dataset(path: str | Path, verbose: bool = True) -> SeqDataset:
    """Load and validate a dataset directory; raises DatasetError with a one-line message naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(
            f"{path}: dataset directory not found; prepare_data.py makes one "
            f"(python prepare_data.py synthetic --out {path}, or an importer: python prepare_data.py --help)"
        )
    item_keys, shift = read_smap(path / "smap.json")
    num_items = len(item_keys) - 1
    umap = _id_map(path / "umap.json")
    splits = {name: _split_lists(path / name) for name in SPLIT_FILES}
    train, val, test = (splits[name] for name in SPLIT_FILES)
    if shift and verbose:
        print(f"{path}: item ids are 0-based (original Recformer processing); shifting them by +1")

    user_ids = sorted(train)
    if not user_ids:
        raise DatasetError(f"{path / 'train.json'}: no users")
    user_key_of = {user: key for key, user in umap.items()}
    for name, split in splits.items():
        unknown_user = next((user for user in split if user not in user_key_of), None)
        if unknown_user is not None:
            raise DatasetError(f"{path / name}: user {unknown_user} is not in umap.json")
        _check_item_range(path / name, split, 1 - shift, num_items - shift)
    for name, split in (("val.json", val), ("test.json", test)):
        for user, sequence in split.items():
            if user not in train:
                raise DatasetError(f"{path / name}: user {user} has no training history in train.json")
            if len(sequence) != 1:
                raise DatasetError(f"{path / name}: user {user} has {len(sequence)} targets, expected 1")
    for user in test:
        if user not in val:
            raise DatasetError(f"{path / 'test.json'}: user {user} has a test target but no validation target")

    sequences = Sequences.from_lengths(
        (len(train[u]) + (u in val) + (u in test) for u in user_ids),
        (item for u in user_ids for item in (*train[u], *val.get(u, ()), *test.get(u, ()))),
    )
    sequences.items += shift
    item_text = _load_item_text(path, item_keys)
    data = SeqDataset(
        path=path,
        item_keys=item_keys,
        user_keys=[user_key_of[u] for u in user_ids],
        offsets=sequences.offsets,
        items=sequences.items,
        train_len=np.array([len(train[u]) for u in user_ids], dtype=np.int64),
        has_val=np.array([u in val for u in user_ids], dtype=bool),
        has_test=np.array([u in test for u in user_ids], dtype=bool),
        item_text=item_text,
    )
    if (path / NUMBERING_FILE).exists():
        data.numbering = read_json(path / NUMBERING_FILE)
    if (path / PAPER_NEGATIVES_FILE).exists():
        data.paper_negatives = _load_paper_negatives(path / PAPER_NEGATIVES_FILE, data, user_ids, shift)
    return data


def _load_paper_negatives(path: Path, data: SeqDataset, user_ids: list[int], shift: int) -> np.ndarray:
    """(num_users, N) negatives from {user_id: [item_id, ...]}: every user, N distinct items of the catalogue that
    the user never interacted with (otherwise a negative could be the target itself)."""
    split = _split_lists(path)
    missing = next((user for user in user_ids if user not in split), None)
    if missing is not None:
        raise DatasetError(f"{path}: user {missing} has no negatives")
    if len(split) != len(user_ids):
        raise DatasetError(f"{path}: user {next(u for u in split if u not in set(user_ids))} is not in train.json")
    _check_item_range(path, split, 1 - shift, data.num_items - shift)
    counts = {len(split[user]) for user in user_ids}
    if len(counts) != 1:
        raise DatasetError(f"{path}: users have different numbers of negatives ({', '.join(map(str, sorted(counts)))})")
    negatives = np.array([split[user] for user in user_ids], dtype=np.int64) + shift
    keys = np.arange(data.num_users)[:, None] * (data.num_items + 1) + negatives
    seen = data.user_item_keys()
    found = np.isin(keys, seen)
    repeated = np.sort(negatives, axis=1)[:, 1:] == np.sort(negatives, axis=1)[:, :-1]
    bad = np.flatnonzero(found.any(axis=1) | repeated.any(axis=1))
    if len(bad):
        raise DatasetError(f"{path}: negatives of user {user_ids[bad[0]]} repeat an item or hold one of the user's own")
    return negatives


def _load_item_text(path: Path, item_keys: list[str]) -> list[dict[str, str]] | None:
    """Attributes of every item in id order, or None when the dataset has no meta_data.json.

    The original processing writes the whole category's catalogue, so keys beyond smap are ignored; an smap item
    missing from meta_data.json is an error.
    """
    meta_path = path / "meta_data.json"
    if not meta_path.exists():
        return None
    meta = read_json(meta_path)
    item_text: list[dict[str, str]] = [{}]
    for key in item_keys[1:]:
        if key not in meta:
            raise DatasetError(f"{meta_path}: item {key!r} from smap.json has no entry")
        item_text.append(item_attributes(meta_path, key, meta[key]))
    return item_text


