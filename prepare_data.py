"""Build datasets in the project's format (Recformer's fine-tuning layout, see common/data.py).

One subcommand per source:

    python prepare_data.py synthetic --out data/synthetic        # the built-in SYNTHETIC demo dataset
    python prepare_data.py amazon --reviews X_5.json.gz --meta meta_X.json.gz --out data/X
    python prepare_data.py amazon --category Industrial_and_Scientific --out data/scientific   # downloads
    python prepare_data.py recformer --dir processed/Scientific --out data/scientific
    python prepare_data.py paper --pkl dataset.pkl --negatives random-sample_size100-seed98765.pkl --out data/X
    python prepare_data.py lcrec --inter X.inter.json --items X.item.json --out data/X
    python prepare_data.py unisrec --dir dataset/Scientific --name Scientific --out data/scientific_unisrec
    python prepare_data.py recbole --dir ml-100k --name ml-100k --out data/ml-100k
    python prepare_data.py pretrain-corpus --from data/a data/b --dev data/c --out data/corpus

Every importer turns its source into `{user key: [item key, ...] in time order}` plus optional item text and hands
it to `common.data.write_dataset`, which assigns ids, splits leave-one-out and writes atomically.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import json
import math
import pickle
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Union

import numpy as np
import tyro

from common.cli import Checked, NonNegative, Positive, parse
from common.data import (
    CACHE_DIRS,
    CORPUS_FILES,
    DATASET_FILES,
    NUMBERING_FILE,
    OPTIONAL_DATASET_FILES,
    PAD,
    PAPER_NEGATIVES_FILE,
    SPLIT_FILES,
    DatasetError,
    SeqDataset,
    item_attributes,
    load_dataset,
    read_json,
    reject_duplicate_keys,
    smap_fingerprint,
)
from common.run import (
    OutputError,
    ending_in_one_line,
    progress,
    protected_path_inside,
    refuse_file_on_the_way,
    save_atomic,
)

Sequences = dict[str, list[str]]
ItemMeta = dict[str, dict[str, str]]


# ----------------------------------------------------------------------------------------------------------------------
# command line: one dataclass per subcommand

AMAZON_2018_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"


@dataclass
class Synthetic(Checked):
    """Generate the built-in SYNTHETIC dataset: invented items and users whose behaviour follows latent topics that
    also shape the item text, so that text-based item vectors have real signal to find. Not real data."""

    out: Path = Path("data/synthetic")
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""
    users: Annotated[int, Positive] = 2000
    """number of users"""
    items: Annotated[int, Positive] = 500
    """number of items in the catalogue (an item no user happens to visit is left out of the dataset)"""
    seed: Annotated[int, NonNegative] = 0
    """seed of the generator (same seed, same dataset)"""


@dataclass
class Amazon(Checked):
    """Import raw Amazon Review Data 2018 files (a 5-core review file and its category's meta file): items need a
    title; attributes title, brand, category; sequences sorted by review time. Not Recformer's process.py, which
    keeps a random fifth of the users and no title filter (use `paper` or `recformer` for the paper's data)."""

    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""
    reviews: Path | None = None
    """5-core reviews, e.g. Industrial_and_Scientific_5.json.gz (json lines: reviewerID, asin, unixReviewTime)"""
    meta: Path | None = None
    """item meta data, e.g. meta_Industrial_and_Scientific.json.gz (json lines: asin, title, brand, category)"""
    category: str | None = None
    """instead of --reviews/--meta: download this category (e.g. Industrial_and_Scientific) from --base-url"""
    base_url: str = AMAZON_2018_URL
    """host of the Amazon 2018 files (categoryFilesSmall/<category>_5.json.gz, metaFiles2/meta_<category>.json.gz)"""
    download_dir: Path = Path("data/raw")
    """where downloaded files are kept (an existing file is reused, not fetched again)"""
    min_user_interactions: Annotated[int, Positive] = 4
    """drop users with fewer interactions (after dropping items without a title); 4 as in the paper's data"""


@dataclass
class Recformer(Checked):
    """Re-write a directory in Recformer's processed layout (e.g. from the original `finetune_data/process.py`,
    0-based ids) validated and normalized: 1-based ids renumbered by first appearance, stats.json."""

    dir: Path
    """source dataset directory (train/val/test/smap/umap json, optional meta_data.json)"""
    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""


@dataclass
class Paper(Checked):
    """Import the paper's ID-model data: `dataset.pkl` (a pickled dict: train {uid: [sid, ...]}, val {uid: [sid]},
    test {uid: [sid]}, smap {original item id: sid}, optional umap), ids kept as the paper numbers them (1..n). The
    pickles are read by a restricted unpickler that builds only dicts, lists, ints and strings (numpy integers, which
    the paper's negative sampler writes, become ints); any other object is refused and nothing in the file runs."""

    pkl: Path
    """the paper's dataset.pkl"""
    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""
    negatives: Path | None = None
    """the paper's negatives cache beside it, e.g. random-sample_size100-seed98765.pkl ({uid: [sid, ...]}); stored
    in the dataset, so that --sample-size N (N = negatives per user) scores exactly these candidates in every stage"""
    meta: Path | None = None
    """Recformer's meta_data.json ({original item id: {attribute: text}}, keyed like the pickle's smap) for item
    text; without it the dataset is ID-only"""


@dataclass
class Lcrec(Checked):
    """Import LC-Rec json (`X.inter.json` {user index: [item index, ...]} in time order, `X.item.json`
    {item index: {title, description, brand, categories}}). Attributes kept: title, brand, category (the
    comma-separated categories joined by spaces, as in the Amazon import); the long description is left out."""

    inter: Path
    """interactions, e.g. Scientific.inter.json"""
    items: Path
    """item text, e.g. Scientific.item.json"""
    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""


@dataclass
class Unisrec(Checked):
    """Import UniSRec/RecBole atomic files: `N.train.inter` (one row per training prefix), `N.valid.inter`,
    `N.test.inter`, `N.text`, `N.item2index`, `N.user2index`. Full sequences are rebuilt exactly: the training
    prefixes chained into one sequence, then the validation target, then the test target. Item text: one attribute
    `text` (the file's single "title. categories. brand." string)."""

    dir: Path
    """directory holding the atomic files"""
    name: str
    """dataset name N (file prefix), e.g. Scientific"""
    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""


@dataclass
class Recbole(Checked):
    """Import RecBole atomic files: `N.inter` (user_id, item_id, timestamp columns; others ignored) and, when present,
    `N.item` whose other columns become the item's attributes in file order (ml-100k: movie_title, release_year,
    class). Sequences are sorted by timestamp, file order on ties. Without `N.item` the dataset is ID-only."""

    dir: Path
    """directory holding the atomic files"""
    name: str
    """dataset name N (file prefix), e.g. ml-100k"""
    out: Path
    """output dataset directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""


@dataclass
class PretrainCorpus(Checked):
    """Build a pre-training corpus in the paper's layout (`train.json` and `dev.json`: lists of item-key sequences
    in time order; `meta_data.json`) from dataset directories, the way Recformer's corpus joined several Amazon
    categories for training and held one out for validation. Item keys become `<dataset name>/<key>` so ids never
    collide across datasets; items without text are dropped (count printed), then sequences shorter than 2."""

    sources: Annotated[tuple[Path, ...], tyro.conf.arg(name="from")]
    """dataset directories whose sequences form train.json"""
    dev: Path
    """dataset directory whose sequences form dev.json (keep it disjoint from --from)"""
    out: Path
    """output corpus directory"""
    overwrite: bool = False
    """replace --out even when it is not a dataset this tool wrote (deleting everything in it)"""
    include_eval_targets: bool = False
    """also take each user's validation and test targets (by default only training parts, so that a model
    fine-tuned and evaluated on a source dataset never pre-trained on its evaluation targets)"""


Command = Union[
    Annotated[Synthetic, tyro.conf.subcommand("synthetic")],
    Annotated[Amazon, tyro.conf.subcommand("amazon")],
    Annotated[Recformer, tyro.conf.subcommand("recformer")],
    Annotated[Paper, tyro.conf.subcommand("paper")],
    Annotated[Lcrec, tyro.conf.subcommand("lcrec")],
    Annotated[Unisrec, tyro.conf.subcommand("unisrec")],
    Annotated[Recbole, tyro.conf.subcommand("recbole")],
    Annotated[PretrainCorpus, tyro.conf.subcommand("pretrain-corpus")],
]


# ----------------------------------------------------------------------------------------------------------------------
# the dataset directory (common/data.py reads it)


def has_text(attributes: Mapping[str, str]) -> bool:
    return any(value.strip() for value in attributes.values())


def dataset_stats(data: SeqDataset) -> dict:
    lengths = data.lengths
    return {
        "users": data.num_users,
        "items": data.num_items,
        "interactions": data.num_interactions,
        "avg_sequence_length": round(float(lengths.mean()), 4) if len(lengths) else 0.0,
        "median_sequence_length": float(np.median(lengths)) if len(lengths) else 0.0,
        "density": data.num_interactions / max(1, data.num_users * data.num_items),
        "items_without_text": (
            data.num_items if data.item_text is None else sum(not has_text(a) for a in data.item_text[1:])
        ),
    }


def _negative_ids(
    out: Path, negatives: Mapping[str, Sequence[str]], umap: Mapping[str, int], smap: Mapping[str, int]
) -> dict[int, list[int]]:
    """{user id: [item id, ...]} of {user key: [item key, ...]} negatives, in the dataset's numbering."""
    unknown = next((key for key in negatives if key not in umap), None)
    if unknown is not None:
        raise DatasetError(f"{out}: negatives for user {unknown!r}, who has no sequence")
    unknown = next((key for items in negatives.values() for key in items if key not in smap), None)
    if unknown is not None:
        raise DatasetError(f"{out}: negative item {unknown!r} is not an item of the dataset")
    return {umap[user]: [smap[key] for key in items] for user, items in negatives.items()}


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def check_replaceable(out: Path, overwrite: bool, config=None) -> None:
    """Refuse, before any work, an output directory prepare_data.py may not replace: a file, a path under a file,
    a directory holding the current directory or an input named in `config`, or (unless `overwrite`) a non-empty
    directory that is not a dataset or corpus this tool wrote. Ours means: its stats.json and layout files are
    there, and nothing else but optional meta_data.json and the stages' caches (an exported embedding table inside
    is the user's work, so it needs --overwrite too)."""
    out = Path(out)
    refuse_file_on_the_way(out, "dataset directory", DatasetError)
    if not out.is_dir():
        return
    protected = protected_path_inside(out, config)
    if protected is not None:
        raise DatasetError(f"{out}: not replaced, it holds {protected}, which this command reads or runs in")
    if overwrite:
        return
    names = {entry.name for entry in out.iterdir()}
    ours = {*DATASET_FILES, *CORPUS_FILES, *OPTIONAL_DATASET_FILES, *CACHE_DIRS}
    if names and not (names <= ours and (set(DATASET_FILES) <= names or set(CORPUS_FILES) <= names)):
        foreign = sorted(names - ours) or ["no stats.json"]
        raise DatasetError(
            f"{out}: not a dataset written by prepare_data.py ({', '.join(foreign[:3])}); "
            "pass --overwrite to replace it with everything in it"
        )


def write_dataset(
    out: str | Path,
    sequences: Mapping[str, Sequence[str]],
    item_meta: Mapping[str, Mapping[str, str]] | None,
    item_order: Sequence[str] | None = None,
    numbering_source: str | None = None,
    negatives: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Write `sequences` ({user key: [item key, ...] in time order}) as a dataset directory; return its stats.

    Items get 1-based ids in `item_order` (to keep an existing numbering), else in order of first appearance; users
    in the given order. Leave-one-out split: the last item
    is the test target, the one before it the validation target, the rest is training history; users with fewer
    than 3 items keep everything in train. The directory is swapped in atomically (common.run.save_atomic).
    numbering_source: the importer that kept `item_order` from an smap (recorded in numbering.json with the smap's
    fingerprint). negatives: {user key: [item key, ...]}, evaluation negatives to store (paper_negatives.json).
    """
    out = Path(out)
    if not sequences:
        raise DatasetError(f"{out}: no user sequences to write")
    smap: dict[str, int] = {key: number for number, key in enumerate(item_order or (), start=1)}
    umap: dict[str, int] = {}
    train, val, test = {}, {}, {}
    for user_key, item_sequence in sequences.items():
        if not item_sequence:
            raise DatasetError(f"{out}: user {user_key!r} has an empty sequence")
        user = umap.setdefault(user_key, len(umap) + 1)
        ids = [smap.setdefault(key, len(smap) + 1) for key in item_sequence]
        if len(ids) < 3:
            train[user] = ids
        else:
            train[user], val[user], test[user] = ids[:-2], ids[-2:-1], ids[-1:]
    if item_meta is not None:
        missing = next((key for key in smap if key not in item_meta), None)
        if missing is not None:
            raise DatasetError(f"{out}: item {missing!r} has no meta data")
    negative_ids = None if negatives is None else _negative_ids(out, negatives, umap, smap)

    def build(tmp: Path) -> None:
        tmp.mkdir()
        for name, split in zip(SPLIT_FILES, (train, val, test)):
            _write_json(tmp / name, split)
        _write_json(tmp / "smap.json", smap)
        _write_json(tmp / "umap.json", umap)
        if item_meta is not None:
            _write_json(tmp / "meta_data.json", {key: dict(item_meta[key]) for key in smap})
        if numbering_source is not None:
            numbering = {"source": numbering_source, "smap_fingerprint": smap_fingerprint(list(smap))}
            _write_json(tmp / NUMBERING_FILE, numbering)
        if negatives is not None:
            _write_json(tmp / PAPER_NEGATIVES_FILE, negative_ids)
        stats = dataset_stats(load_dataset(tmp, verbose=False))
        _write_json(tmp / "stats.json", stats)

    save_atomic(out, build)
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# synthetic


ITEMS_PER_TOPIC = 20
TITLE_WORDS_PER_TOPIC = 8
BRANDS_PER_TOPIC = 2
SHARED_NOISE_WORDS = 40
STAY_IN_TOPIC = 0.75  # otherwise jump to one of the user's preferred topics (possibly the same one)
FOLLOW_CHAIN = 0.7  # within a topic, how often the next item is the topic's "next model" (the sequential pattern)
OFF_TOPIC_BRAND = 0.1  # noise: an item carries a random other brand
MIN_LEN, MAX_LEN, MEAN_EXTRA_LEN = 5, 30, 8


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable lowercase words made of 2-3 consonant-vowel syllables."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}  # ordered set, for determinism
    while len(words) < count:
        picks = rng.integers(len(syllables), size=rng.integers(2, 4))
        words["".join(syllables[p] for p in picks)] = None
    return list(words)


def _synthetic_text(rng: np.random.Generator, topic_of_item: np.ndarray, num_topics: int) -> list[dict[str, str]]:
    """Item text whose brand, category and most title words come from the item's topic vocabulary."""
    per_topic = TITLE_WORDS_PER_TOPIC + BRANDS_PER_TOPIC + 2  # + two category words
    words = _pseudo_words(rng, num_topics * per_topic + SHARED_NOISE_WORDS)
    vocab = np.array(words[: num_topics * per_topic]).reshape(num_topics, per_topic)
    noise = words[num_topics * per_topic :]
    title_words = vocab[:, :TITLE_WORDS_PER_TOPIC]
    brands = vocab[:, TITLE_WORDS_PER_TOPIC : TITLE_WORDS_PER_TOPIC + BRANDS_PER_TOPIC]
    categories = vocab[:, -2:]
    texts = []
    for topic in topic_of_item:
        title = list(rng.choice(title_words[topic], size=3, replace=False)) + [noise[rng.integers(len(noise))]]
        rng.shuffle(title)
        brand_topic = rng.integers(num_topics) if rng.random() < OFF_TOPIC_BRAND else topic
        texts.append(
            {
                "title": " ".join(title).capitalize() + f" {rng.integers(10, 1000)}",
                "brand": str(rng.choice(brands[brand_topic])).capitalize(),
                "category": "Synthetic Goods " + " ".join(categories[topic]).title(),
            }
        )
    return texts


def _synthetic_sequence(rng: np.random.Generator, topic_items: list[np.ndarray], num_topics: int) -> list[int]:
    """One user's item indices: a few preferred topics; inside a topic the user mostly walks the topic's chain."""
    preferred = rng.choice(num_topics, size=min(num_topics, rng.integers(1, 4)), replace=False)
    weights = rng.dirichlet(np.ones(len(preferred)))
    length = min(MAX_LEN, MIN_LEN + rng.poisson(MEAN_EXTRA_LEN))
    topic = rng.choice(preferred, p=weights)
    position = rng.integers(len(topic_items[topic]))
    sequence = [topic_items[topic][position]]
    for _ in range(length - 1):
        if rng.random() >= STAY_IN_TOPIC:
            topic = rng.choice(preferred, p=weights)
            position = rng.integers(len(topic_items[topic]))
        elif rng.random() < FOLLOW_CHAIN:
            position = (position + 1) % len(topic_items[topic])
        else:  # another item of the same topic, never the current one (every topic has >= 2 items)
            position = (position + 1 + rng.integers(len(topic_items[topic]) - 1)) % len(topic_items[topic])
        sequence.append(topic_items[topic][position])
    return sequence


def synthetic_catalogue(num_users: int, num_items: int, seed: int) -> tuple[Sequences, ItemMeta]:
    """A SYNTHETIC catalogue: (sequences {user key: [item key, ...] in time order}, item_meta {item key: {"title",
    "brand", "category"}}). Items belong to latent topics that drive both their text and how users move between
    them, so next-item prediction is learnable and text similarity predicts behaviour. Deterministic in `seed`."""
    if num_users < 1 or num_items < 2:
        raise DatasetError(f"synthetic catalogue needs >= 1 user and >= 2 items, not {num_users} and {num_items}")
    rng = np.random.default_rng(seed)
    num_topics = max(1, num_items // ITEMS_PER_TOPIC)
    topic_of_item = rng.permutation(np.arange(num_items) % num_topics)
    topic_items = [np.flatnonzero(topic_of_item == t) for t in range(num_topics)]
    texts = _synthetic_text(rng, topic_of_item, num_topics)
    item_keys = [f"item{i:0{len(str(num_items))}d}" for i in range(num_items)]
    item_meta = dict(zip(item_keys, texts))
    sequences = {
        f"user{u:0{len(str(num_users))}d}": [item_keys[i] for i in _synthetic_sequence(rng, topic_items, num_topics)]
        for u in range(num_users)
    }
    return sequences, item_meta


def build_synthetic(args: Synthetic) -> tuple[Sequences, ItemMeta]:
    return synthetic_catalogue(args.users, args.items, args.seed)


# ----------------------------------------------------------------------------------------------------------------------
# shared parsing helpers


def clean_text(text: str) -> str:
    """HTML entities unescaped, runs of whitespace collapsed to one space (Amazon titles carry both)."""
    return " ".join(html.unescape(text).split())


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline) of a text file, gunzipped when it ends in `.gz`; a missing,
    corrupt or non-UTF-8 file is a one-line error naming it."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
            for number, line in enumerate(progress(f, desc=path.name, unit=" lines", leave=False), start=1):
                yield number, line.rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: unreadable ({error})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a json-lines file."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object")
        yield number, record


def _field(path: Path, number: int, record: dict, name: str):
    if name not in record:
        raise DatasetError(f"{path}:{number}: missing field {name!r}")
    return record[name]


JSON_KINDS = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null", float: "a number"}


def _key(where: str, name: str, value) -> str:
    """A user or item key: a JSON string, or an integer written as one; anything else would be unhashable (an
    array, an object) or collide with a string key (true, 1.0), so it is an error naming `where`."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise DatasetError(f"{where}: {name} is {JSON_KINDS.get(type(value), type(value).__name__)}, expected a string")


def _text(where: str, name: str, value) -> str:
    """An attribute's text before clean_text: a string or number as it reads, null as ""; a list (Amazon's
    category, possibly nested) as its texts joined by spaces. An object has no one reading as text, so it is an
    error naming `where` (str() would turn {'en': 'x'} into the text "{'en': 'x'}")."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(part for part in (_text(where, name, v) for v in value) if part)
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    raise DatasetError(f"{where}: {name} is {JSON_KINDS.get(type(value), type(value).__name__)}, expected text")


def _timestamp(path: Path, number: int, value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        seconds = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}:{number}: timestamp {value!r} is not a number") from None
    if not math.isfinite(seconds):  # NaN compares false with everything and would scramble the time order
        raise DatasetError(f"{path}:{number}: timestamp {value!r} is not a finite number")
    return seconds


def _read_json(path: Path):
    """A JSON file (gunzipped when .gz); a key given twice in one object is an error (json.loads keeps the last)."""
    text = "\n".join(line for _, line in _lines(path))
    try:
        return json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: invalid JSON ({error})") from None
    except DatasetError as error:
        raise DatasetError(f"{path}: {error}") from None


def _sorted_by_time(events: dict[str, list[tuple[float, str]]]) -> Sequences:
    """{user: [(time, item), ...] in file order} -> {user: [item, ...]} sorted by time, file order on ties."""
    return {user: [item for _, item in sorted(pairs, key=lambda pair: pair[0])] for user, pairs in events.items()}


# ----------------------------------------------------------------------------------------------------------------------
# amazon


def download(url: str, path: Path) -> Path:
    """Fetch `url` into `path` via a temporary file in the same directory, so `path` is either whole or absent."""
    if path.exists():
        return path

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with progress(None, total=size, desc=path.name, unit="B", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))

    try:
        save_atomic(path, write)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise DatasetError(f"{url}: download failed ({error})") from None
    return path


def download_amazon(category: str, directory: Path, base_url: str = AMAZON_2018_URL) -> tuple[Path, Path]:
    """(reviews path, meta path) of one Amazon 2018 category, downloaded into `directory` unless already there."""
    base_url = base_url.rstrip("/")
    made = [path for path in (directory, *directory.parents) if not path.exists()]  # innermost first
    try:
        reviews = download(f"{base_url}/categoryFilesSmall/{category}_5.json.gz", directory / f"{category}_5.json.gz")
        meta = download(f"{base_url}/metaFiles2/meta_{category}.json.gz", directory / f"meta_{category}.json.gz")
    except (DatasetError, OutputError):
        for path in made:  # a failed download leaves no empty directories of its own (rmdir keeps non-empty ones)
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return reviews, meta


def read_amazon_meta(path: Path) -> ItemMeta:
    """{asin: {"title", "brand", "category"}} for items with a non-empty title; the first record of an asin wins."""
    meta: ItemMeta = {}
    for number, record in _json_lines(path):
        where = f"{path}:{number}"
        asin = _key(where, "asin", _field(path, number, record, "asin"))
        title = clean_text(_text(where, "title", record.get("title")))
        if not title or asin in meta:
            continue
        meta[asin] = {
            "title": title,
            "brand": clean_text(_text(where, "brand", record.get("brand"))),
            "category": clean_text(_text(where, "category", record.get("category"))),
        }
    return meta


def read_amazon_reviews(path: Path, items: ItemMeta, min_user_interactions: int) -> Sequences:
    """{reviewerID: [asin, ...]} by review time (file order on ties), items restricted to `items`, short users
    dropped; users in order of first appearance."""
    events: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for number, record in _json_lines(path):
        asin = _key(f"{path}:{number}", "asin", _field(path, number, record, "asin"))
        if asin in items:
            user = _key(f"{path}:{number}", "reviewerID", _field(path, number, record, "reviewerID"))
            events[user].append((_timestamp(path, number, _field(path, number, record, "unixReviewTime")), asin))
    sequences = _sorted_by_time(events)
    return {user: items_ for user, items_ in sequences.items() if len(items_) >= min_user_interactions}


def build_amazon(args: Amazon) -> tuple[Sequences, ItemMeta]:
    if args.category is not None:
        if args.reviews is not None or args.meta is not None:
            raise DatasetError("amazon: give either --category or --reviews and --meta, not both")
        reviews, meta_path = download_amazon(args.category, args.download_dir, args.base_url)
    elif args.reviews is None or args.meta is None:
        raise DatasetError("amazon: give --reviews and --meta (or --category to download them)")
    else:
        reviews, meta_path = args.reviews, args.meta
    meta = read_amazon_meta(meta_path)
    sequences = read_amazon_reviews(reviews, meta, args.min_user_interactions)
    if not sequences:
        raise DatasetError(f"{reviews}: no user has {args.min_user_interactions} reviews of items with a title")
    return sequences, meta


# ----------------------------------------------------------------------------------------------------------------------
# recformer


def import_recformer(args: Recformer) -> dict:
    """Rewrite with 1-based ids in the original item order, so tables made for the original files still fit."""
    data = load_dataset(args.dir)
    sequences = {
        user: [data.item_keys[i] for i in data.sequence(row)] for row, user in enumerate(data.user_keys)
    }
    meta = None if data.item_text is None else dict(zip(data.item_keys[1:], data.item_text[1:]))
    negatives = None
    if data.paper_negatives is not None:  # a dataset `paper` wrote keeps the paper's candidates
        negatives = {user: [data.item_keys[i] for i in row] for user, row in zip(data.user_keys, data.paper_negatives)}
    return write_dataset(
        args.out, sequences, meta, item_order=data.item_keys[1:], numbering_source="recformer", negatives=negatives
    )


# ----------------------------------------------------------------------------------------------------------------------
# paper


NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
BYTE_ORDERS = {"<": "little", ">": "big", "|": "little", "=": sys.byteorder}


class _IntegerDtype:
    """Stands in for numpy.dtype while unpickling: only integer codes ("i8", "u4", ...) are accepted."""

    def __init__(self, code, align=False, copy=True):
        if not (isinstance(code, str) and len(code) == 2 and code[0] in "iu" and code[1] in "1248"):
            raise pickle.UnpicklingError(f"refused numpy dtype {code!r} (only integer scalars are read)")
        self.signed, self.size, self.order = code[0] == "i", int(code[1]), "little"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) > 1 and state[1] in BYTE_ORDERS):
            raise pickle.UnpicklingError("refused numpy dtype state")
        self.order = BYTE_ORDERS[state[1]]


def _integer_scalar(dtype, data):
    """numpy.core.multiarray.scalar for integer dtypes: the Python int its bytes hold."""
    if not (isinstance(dtype, _IntegerDtype) and isinstance(data, bytes) and len(data) == dtype.size):
        raise pickle.UnpicklingError("refused numpy scalar (only integer scalars are read)")
    return int.from_bytes(data, dtype.order, signed=dtype.signed)


def _latin1_bytes(text, encoding):
    """_codecs.encode as protocol-2 pickles of numpy scalars use it: latin-1 text to bytes, nothing else."""
    if not (isinstance(text, str) and encoding == "latin1"):
        raise pickle.UnpicklingError("refused _codecs.encode (only latin1 text is read)")
    return text.encode("latin1")


class PlainUnpickler(pickle.Unpickler):
    """Builds nothing but pickle's own containers and numpy integer scalars (as ints): every other global is
    refused before it is looked up, so no code in the file runs."""

    def find_class(self, module, name):
        if (module, name) in NUMPY_SCALAR:
            return _integer_scalar
        if (module, name) == ("numpy", "dtype"):
            return _IntegerDtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _plain_value(path: Path, value, where: str):
    """`value` if it is made of dicts, lists, ints and strings only; else a one-line DatasetError saying where."""
    if isinstance(value, dict):
        return {
            _plain_value(path, key, where): _plain_value(path, item, f"{where}[{key!r}]") for key, item in value.items()
        }
    if isinstance(value, list):
        return [_plain_value(path, item, where) for item in value]
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DatasetError(f"{path}: {where} holds a {type(value).__name__}; only dicts, lists, ints and strings are read")


def read_plain_pickle(path: Path):
    """The pickle at `path`, built by PlainUnpickler and checked by _plain_value; every problem is one line."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            value = PlainUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise DatasetError(f"{path}: {error}; nothing in it was run") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DatasetError(f"{path}: not a readable pickle ({type(error).__name__})") from None
    return _plain_value(path, value, "the pickle")


def _numbered(path: Path, mapping, what: str) -> dict:
    """{key: id} whose ids are exactly 1..n, as the paper numbers items and users."""
    if not isinstance(mapping, dict) or not all(isinstance(i, int) for i in mapping.values()):
        raise DatasetError(f"{path}: {what} is not a dict of integer ids")
    if sorted(mapping.values()) != list(range(1, len(mapping) + 1)):
        raise DatasetError(f"{path}: {what} ids are not 1..{len(mapping)}")
    return mapping


def _paper_split(path: Path, dataset: dict, name: str, targets: bool) -> dict[int, list[int]]:
    """dataset[name] as {uid: [sid, ...]}, one sid per user when `targets` (the paper's val and test)."""
    split = dataset.get(name)
    if not isinstance(split, dict) or not all(isinstance(seq, list) for seq in split.values()):
        raise DatasetError(f"{path}: {name!r} is not a dict {{user id: [item id, ...]}}")
    bad = next((user for user, seq in split.items() if not seq or (targets and len(seq) != 1)), None)
    if bad is not None:
        raise DatasetError(f"{path}: user {bad!r} of {name!r} has {len(split[bad])} items, expected "
                           + ("1" if targets else "at least 1"))
    return split


def build_paper(args: Paper) -> dict:
    """Write the dataset with the pickle's numbering (items 1..n in smap order, users by uid) and return its stats."""
    dataset = read_plain_pickle(args.pkl)
    if not isinstance(dataset, dict):
        raise DatasetError(f"{args.pkl}: holds a {type(dataset).__name__}, expected the paper's dataset dict")
    smap = _numbered(args.pkl, dataset.get("smap"), "'smap'")
    item_keys = {sid: str(key) for key, sid in smap.items()}
    if len(set(item_keys.values())) != len(item_keys):
        raise DatasetError(f"{args.pkl}: two smap keys read as the same item id")
    train, val, test = (_paper_split(args.pkl, dataset, name, name != "train") for name in ("train", "val", "test"))
    users = sorted(train)
    if users != list(range(1, len(users) + 1)):
        raise DatasetError(f"{args.pkl}: 'train' user ids are not 1..{len(users)}")
    unlike = next((name for name, split in (("val", val), ("test", test)) if sorted(split) != users), None)
    if unlike is not None:  # a user without both targets would be re-split by write_dataset
        raise DatasetError(f"{args.pkl}: {unlike!r} has not one target for every user of 'train'")
    user_keys = {uid: str(uid) for uid in users}
    if "umap" in dataset:
        user_keys = {uid: str(key) for key, uid in _numbered(args.pkl, dataset["umap"], "'umap'").items()}
    unknown = next((sid for u in users for sid in (*train[u], *val[u], *test[u]) if sid not in item_keys), None)
    if unknown is not None:
        raise DatasetError(f"{args.pkl}: item id {unknown!r} is not in 'smap'")
    sequences = {user_keys[u]: [item_keys[sid] for sid in (*train[u], *val[u], *test[u])] for u in users}
    order = [item_keys[sid] for sid in range(1, len(item_keys) + 1)]
    meta = None if args.meta is None else _paper_meta(args.meta, order)
    negatives = None if args.negatives is None else _paper_negatives(args.negatives, users, user_keys, item_keys)
    stats = write_dataset(args.out, sequences, meta, order, numbering_source="paper", negatives=negatives)
    if negatives is not None:
        count = len(next(iter(negatives.values())))
        print(f"{args.out}: stores the paper's negatives; --sample-size {count} scores exactly these candidates")
    return stats


def _paper_meta(path: Path, item_keys: list[str]) -> ItemMeta:
    """Recformer's meta_data.json entries of the smap's items (other entries are ignored, as Recformer does)."""
    meta = read_json(path)
    missing = next((key for key in item_keys if key not in meta), None)
    if missing is not None:
        raise DatasetError(f"{path}: item {missing!r} of the pickle's smap has no entry")
    return {key: item_attributes(path, key, meta[key]) for key in item_keys}


def _paper_negatives(path: Path, users: list[int], user_keys: dict, item_keys: dict) -> dict[str, list[str]]:
    """{user key: [item key, ...]} from the paper's {uid: [sid, ...]}, one list for every user."""
    negatives = read_plain_pickle(path)
    if not isinstance(negatives, dict) or not all(isinstance(seq, list) for seq in negatives.values()):
        raise DatasetError(f"{path}: expected the paper's negatives {{user id: [item id, ...]}}")
    missing = next((u for u in users if u not in negatives), None)
    if missing is not None or len(negatives) != len(users):
        raise DatasetError(f"{path}: negatives are not given for exactly the users of the dataset (user {missing})")
    unknown = next((sid for seq in negatives.values() for sid in seq if sid not in item_keys), None)
    if unknown is not None:
        raise DatasetError(f"{path}: item id {unknown!r} is not in the smap")
    return {user_keys[u]: [item_keys[sid] for sid in negatives[u]] for u in users}


# ----------------------------------------------------------------------------------------------------------------------
# lcrec


def lcrec_attributes(where: str, text: dict) -> dict[str, str]:
    """title, brand, category (the comma-separated categories joined by spaces) of one LC-Rec item."""
    return {
        "title": clean_text(_text(where, "title", text.get("title"))),
        "brand": clean_text(_text(where, "brand", text.get("brand"))),
        "category": clean_text(_text(where, "categories", text.get("categories")).replace(",", " ")),
    }


def build_lcrec(args: Lcrec) -> tuple[Sequences, ItemMeta]:
    inter, raw_items = _read_json(args.inter), _read_json(args.items)
    if not isinstance(inter, dict) or not all(isinstance(seq, list) and seq for seq in inter.values()):
        raise DatasetError(f"{args.inter}: expected {{user: [item, ...]}} with non-empty lists")
    if not isinstance(raw_items, dict) or not all(isinstance(text, dict) for text in raw_items.values()):
        raise DatasetError(f"{args.items}: expected {{item: {{attribute: text}}}}")
    sequences = {user: [_key(f"{args.inter}: user {user!r}", "an item", item) for item in seq]
                 for user, seq in inter.items()}  # fmt: skip
    missing = next((item for seq in sequences.values() for item in seq if item not in raw_items), None)
    if missing is not None:
        raise DatasetError(f"{args.items}: item {missing!r} of {args.inter.name} has no entry")
    meta = {key: lcrec_attributes(f"{args.items}: item {key!r}", text) for key, text in raw_items.items()}
    return sequences, meta


# ----------------------------------------------------------------------------------------------------------------------
# unisrec


def _atomic_header(path: Path) -> list[str]:
    """Column names of a RecBole atomic file without their `:type` suffix."""
    _, header = next(_lines(path), (1, ""))
    return [column.partition(":")[0] for column in header.split("\t")]


def _atomic_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of a RecBole atomic file, header skipped."""
    width = len(_atomic_header(path))
    for number, line in _lines(path):
        if number > 1 and line.strip():
            fields = line.split("\t")
            if len(fields) != width:
                raise DatasetError(f"{path}:{number}: {len(fields)} fields, header has {width}")
            yield number, fields


def _index_file(path: Path) -> list[str]:
    """Keys of a `key<TAB>index` file in index order; indices must be 0..n-1."""
    keys: dict[int, str] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        key, _, index = line.partition("\t")
        if not index.isdigit() or int(index) in keys:
            raise DatasetError(f"{path}:{number}: expected `key<TAB>index` with a new integer index")
        keys[int(index)] = key
    if sorted(keys) != list(range(len(keys))):
        raise DatasetError(f"{path}: indices are not 0..{len(keys) - 1}")
    return [keys[i] for i in range(len(keys))]


def _inter_rows(path: Path) -> Iterator[tuple[int, int, list[int], int]]:
    """(line number, user index, history, target) of a UniSRec `.inter` file."""
    for number, fields in _atomic_rows(path):
        if len(fields) != 3:
            raise DatasetError(f"{path}:{number}: expected user_id, item_id_list, item_id columns")
        try:
            user, history, target = int(fields[0]), [int(i) for i in fields[1].split()], int(fields[2])
        except ValueError:
            raise DatasetError(f"{path}:{number}: non-integer user or item index") from None
        yield number, user, history, target


def _rebuild_training_sequences(path: Path) -> dict[int, list[int]]:
    """{user: training sequence} from prefix-augmented rows (history, target), histories capped at some length.

    Row k holds (seq[max(0, k - cap):k], seq[k]), so the sequence is rebuilt by chaining: start from the one-item
    history, then repeatedly look up the row whose history is the current tail. File order is not relied upon.
    """
    rows: dict[int, dict[tuple[int, ...], int]] = defaultdict(dict)
    cap = 0
    for number, user, history, target in _inter_rows(path):
        if not history or tuple(history) in rows[user]:
            raise DatasetError(f"{path}:{number}: empty or repeated history for user {user}; cannot chain prefixes")
        rows[user][tuple(history)] = target
        cap = max(cap, len(history))
    sequences = {}
    for user, targets in rows.items():
        first = [h for h in targets if len(h) == 1]
        if len(first) != 1:
            raise DatasetError(f"{path}: user {user} has {len(first)} one-item prefixes, expected 1")
        sequence = [*first[0], targets[first[0]]]
        for _ in range(len(targets) - 1):  # bounded: a repeated window must not loop forever
            tail = tuple(sequence[-cap:])
            if tail not in targets:
                break
            sequence.append(targets[tail])
        if len(sequence) != len(targets) + 1:
            raise DatasetError(f"{path}: prefixes of user {user} do not chain into one sequence")
        sequences[user] = sequence
    return sequences


def build_unisrec(args: Unisrec) -> tuple[Sequences, ItemMeta]:
    base = args.dir / args.name
    item_keys = _index_file(Path(f"{base}.item2index"))
    user_keys = _index_file(Path(f"{base}.user2index"))
    full = _rebuild_training_sequences(Path(f"{base}.train.inter"))
    for split in ("valid", "test"):
        path = Path(f"{base}.{split}.inter")
        for number, user, history, target in _inter_rows(path):
            if split == "valid" and user not in full:  # a one-item training part has no prefix rows
                full[user] = history
            # The history is capped (50 in UniSRec), so it must match the tail of what was rebuilt so far.
            if user not in full or full[user][len(full[user]) - len(history) :] != history:
                raise DatasetError(f"{path}:{number}: history of user {user} does not continue its training prefixes")
            full[user].append(target)
    bad = next((i for seq in full.values() for i in seq if not 0 <= i < len(item_keys)), None)
    if bad is not None:
        raise DatasetError(f"{base}.item2index: item index {bad} used in the .inter files is not listed")
    if any(not 0 <= user < len(user_keys) for user in full):
        raise DatasetError(f"{base}.user2index: a user index used in the .inter files is not listed")
    text_path = Path(f"{base}.text")
    texts = {key: clean_text(text) for _, (key, text) in _atomic_rows(text_path)}
    missing = next((key for key in item_keys if key not in texts), None)
    if missing is not None:
        raise DatasetError(f"{text_path}: item {missing!r} has no text")
    sequences = {user_keys[user]: [item_keys[i] for i in full[user]] for user in sorted(full)}
    return sequences, {key: {"text": texts[key]} for key in item_keys}


# ----------------------------------------------------------------------------------------------------------------------
# recbole


def _column(path: Path, columns: list[str], name: str) -> int:
    if name not in columns:
        raise DatasetError(f"{path}: no {name!r} column in the header")
    return columns.index(name)


def build_recbole(args: Recbole) -> tuple[Sequences, ItemMeta | None]:
    inter_path = args.dir / f"{args.name}.inter"
    columns = _atomic_header(inter_path)
    user_col, item_col, time_col = (_column(inter_path, columns, c) for c in ("user_id", "item_id", "timestamp"))
    events: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for number, fields in _atomic_rows(inter_path):
        events[fields[user_col]].append((_timestamp(inter_path, number, fields[time_col]), fields[item_col]))
    sequences = _sorted_by_time(events)
    item_path = args.dir / f"{args.name}.item"
    if not item_path.exists():
        return sequences, None
    item_columns = _atomic_header(item_path)
    key_col = _column(item_path, item_columns, "item_id")
    attributes = [(i, name) for i, name in enumerate(item_columns) if i != key_col]
    meta = {
        fields[key_col]: {name: clean_text(fields[i]) for i, name in attributes}
        for _, fields in _atomic_rows(item_path)
    }
    used = {item for seq in sequences.values() for item in seq}
    without_text = used - meta.keys()
    if without_text:
        print(f"{item_path}: {len(without_text)} items of {inter_path.name} have no row; they get empty text")
        meta.update({item: {name: "" for _, name in attributes} for item in without_text})
    return sequences, meta


# ----------------------------------------------------------------------------------------------------------------------
# pretrain-corpus


MIN_CORPUS_SEQUENCE = 2  # a pre-training pair needs at least one item before its target


def corpus_sequences(data: SeqDataset, train_only: bool) -> tuple[list[list[str]], ItemMeta, dict[str, int]]:
    """(namespaced sequences, their items' text, counts of what was dropped) of one dataset."""
    if data.item_text is None:
        raise DatasetError(f"{data.path}: no meta_data.json (ID-only dataset); a pre-training corpus needs item text")
    with_text = np.array([has_text(attributes) for attributes in data.item_text])
    with_text[PAD] = False
    keys = [f"{data.name}/{key}" for key in data.item_keys]
    sequences, dropped_sequences = [], 0
    for row in range(data.num_users):
        items = data.sequence(row)[: data.train_len[row]] if train_only else data.sequence(row)
        items = items[with_text[items]]
        if len(items) >= MIN_CORPUS_SEQUENCE:
            sequences.append([keys[i] for i in items])
        else:
            dropped_sequences += 1
    used = {key for seq in sequences for key in seq}
    meta = {keys[i]: data.item_text[i] for i in range(1, len(keys)) if keys[i] in used}
    return sequences, meta, {"items": int((~with_text[1:]).sum()), "sequences": dropped_sequences}


def write_corpus(out: Path, train: list[list[str]], dev: list[list[str]], meta: ItemMeta, stats: dict) -> None:
    """The corpus directory, swapped in atomically (a reader never sees half of it; a failure keeps the old one)."""

    def build(tmp: Path) -> None:
        tmp.mkdir()
        for name, obj in (("train.json", train), ("dev.json", dev), ("meta_data.json", meta), ("stats.json", stats)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False)

    save_atomic(out, build)


def _corpus_part(directories: list[Path], train_only: bool) -> tuple[list[list[str]], ItemMeta, int, int]:
    """(sequences, item text, dropped items, dropped sequences) of several datasets, printing each one's counts."""
    sequences: list[list[str]] = []
    meta: ItemMeta = {}
    dropped_items = dropped_sequences = 0
    for directory in directories:
        part, text, dropped = corpus_sequences(load_dataset(directory), train_only)
        print(f"{directory}: {len(part)} sequences, dropped {dropped['items']} items without text "
              f"and {dropped['sequences']} sequences shorter than {MIN_CORPUS_SEQUENCE}")
        sequences.extend(part)
        meta.update(text)
        dropped_items += dropped["items"]
        dropped_sequences += dropped["sequences"]
    return sequences, meta, dropped_items, dropped_sequences


def build_pretrain_corpus(args: PretrainCorpus) -> dict:
    """Write the corpus and return its stats."""
    # Resolved, so that "." or a trailing slash still yields the directory's real name for the key namespace.
    sources = [Path(d).resolve() for d in args.sources]
    dev_dir = Path(args.dev).resolve()
    names = [d.name for d in [*sources, dev_dir]]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise DatasetError(f"{repeated}: two --from/--dev directories share this name, so their keys would collide")
    train_only = not args.include_eval_targets
    train, train_meta, train_items, train_sequences = _corpus_part(sources, train_only)
    dev, dev_meta, dev_items, dev_sequences = _corpus_part([dev_dir], train_only)
    if not train or not dev:
        raise DatasetError(f"{args.out}: the {'training' if not train else 'dev'} part of the corpus is empty")
    meta = train_meta | dev_meta
    stats = {
        "train_sequences": len(train),
        "dev_sequences": len(dev),
        "items": len(meta),
        "dropped_items_without_text": train_items + dev_items,
        "dropped_short_sequences": train_sequences + dev_sequences,
    }
    write_corpus(args.out, train, dev, meta, stats)
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# command line


DATASET_BUILDERS = {
    Synthetic: build_synthetic,
    Amazon: build_amazon,
    Lcrec: build_lcrec,
    Unisrec: build_unisrec,
    Recbole: build_recbole,
}


def run(args: Command) -> dict:
    """Build what `args` asks for, write it atomically under args.out, print and return its stats."""
    check_replaceable(args.out, args.overwrite, args)
    if isinstance(args, PretrainCorpus):
        stats = build_pretrain_corpus(args)
    elif isinstance(args, Recformer):
        stats = import_recformer(args)
    elif isinstance(args, Paper):
        stats = build_paper(args)
    else:
        sequences, item_meta = DATASET_BUILDERS[type(args)](args)
        stats = write_dataset(args.out, sequences, item_meta)
    print(f"wrote {args.out}: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    return stats


if __name__ == "__main__":
    with ending_in_one_line():
        run(parse(Command))
