"""prepare_data.py importers against hand-built fixtures and expectations, plus counts on the shared real data."""

import gzip
import http.server
import json
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from common.data import DatasetError, load_dataset
from prepare_data import (
    Amazon,
    Lcrec,
    PretrainCorpus,
    Recbole,
    Recformer,
    Synthetic,
    Unisrec,
    run,
    synthetic_catalogue,
)

REPO = Path(__file__).resolve().parents[1]


def read_back(out: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, str]] | None]:
    """The written dataset as ({user key: [item key, ...]}, {item key: attributes} or None)."""
    data = load_dataset(out, verbose=False)
    sequences = {user: [data.item_keys[i] for i in data.sequence(row)] for row, user in enumerate(data.user_keys)}
    meta = None if data.item_text is None else dict(zip(data.item_keys[1:], data.item_text[1:]))
    return sequences, meta


def write_json_lines_gz(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


def leftovers(directory: Path) -> list[str]:
    """Hidden temporary entries a failed atomic write could leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------------
# synthetic


def topic_words(attributes: dict[str, str]) -> set[str]:
    """Words an item's text could share with a same-topic item: title words (not the model number), brand,
    category words after the constant "Synthetic Goods" prefix."""
    title = [w for w in attributes["title"].lower().split() if not w.isdigit()]
    return set(title) | {attributes["brand"].lower()} | set(attributes["category"].lower().split()[2:])


def test_synthetic_is_deterministic_and_well_formed():
    sequences, meta = synthetic_catalogue(num_users=200, num_items=100, seed=7)
    assert (sequences, meta) == synthetic_catalogue(num_users=200, num_items=100, seed=7)
    assert sequences != synthetic_catalogue(num_users=200, num_items=100, seed=8)[0]
    assert len(sequences) == 200 and len(meta) == 100
    assert all(5 <= len(seq) <= 30 for seq in sequences.values())
    assert all(list(attributes) == ["title", "brand", "category"] for attributes in meta.values())
    assert {item for seq in sequences.values() for item in seq} <= meta.keys()


def test_synthetic_text_and_behaviour_carry_signal():
    sequences, meta = synthetic_catalogue(num_users=1000, num_items=400, seed=0)
    words = {item: topic_words(attributes) for item, attributes in meta.items()}
    pairs = [(a, b) for seq in sequences.values() for a, b in zip(seq, seq[1:])]
    consecutive_share = np.mean([bool(words[a] & words[b]) for a, b in pairs])
    keys = list(meta)
    random_pairs = np.random.default_rng(0).integers(len(keys), size=(len(pairs), 2))
    random_share = np.mean([bool(words[keys[a]] & words[keys[b]]) for a, b in random_pairs])
    assert consecutive_share > 0.6 and consecutive_share > 5 * random_share

    # Next-item prediction is learnable: an item's most frequent successor follows it far more often than chance.
    successors = defaultdict(Counter)
    for a, b in pairs:
        successors[a][b] += 1
    top_share = sum(c.most_common(1)[0][1] for c in successors.values()) / len(pairs)
    assert top_share > 0.3 > 20 / len(keys)


def test_synthetic_subcommand_writes_what_the_generator_returns(tmp_path):
    stats = run(Synthetic(out=tmp_path / "synthetic", users=50, items=40, seed=3))
    assert read_back(tmp_path / "synthetic") == synthetic_catalogue(50, 40, 3)
    assert stats["users"] == 50


# ----------------------------------------------------------------------------------------------------------------------
# amazon

AMAZON_META = [
    {
        "asin": "A",
        "title": "Lab  Beaker &amp; Lid\n 250ml",
        "brand": "Pyrex &quot;Pro&quot;",
        "category": ["Industrial & Scientific", "Lab  Glass"],
    },
    {"asin": "B", "title": "Pipette", "category": []},  # no brand field at all
    {"asin": "C", "brand": "NoTitle Co"},  # no title: dropped
    {"asin": "D", "title": "   ", "brand": "Blank"},  # blank title: dropped
    {"asin": "E", "title": "Gloves", "brand": "Safe", "category": ["Safety"]},
    {"asin": "A", "title": "A duplicate record", "brand": "", "category": []},  # first record of an asin wins
]
AMAZON_REVIEWS = [  # (user, item, time)
    ("u1", "A", 5), ("u1", "B", 3), ("u2", "A", 1), ("u1", "E", 3), ("u1", "C", 1), ("u3", "A", 2),
    ("u2", "B", 2), ("u3", "C", 3), ("u4", "E", 9), ("u1", "A", 7), ("u2", "E", 3), ("u3", "E", 4),
    ("u4", "B", 8), ("u3", "B", 5), ("u4", "A", 7), ("u4", "E", 6),
]
AMAZON_EXPECTED_META = {
    "A": {"title": "Lab Beaker & Lid 250ml", "brand": 'Pyrex "Pro"', "category": "Industrial & Scientific Lab Glass"},
    "B": {"title": "Pipette", "brand": "", "category": ""},
    "E": {"title": "Gloves", "brand": "Safe", "category": "Safety"},
}
# u1: C has no title, B and E tie at time 3 and keep file order; u2 (3 reviews) and u3 (3 once C is dropped) are
# below the default threshold of 4.
AMAZON_EXPECTED = {"u1": ["B", "E", "A", "A"], "u4": ["E", "A", "B", "E"]}


def amazon_files(directory: Path, category: str = "Things") -> tuple[Path, Path]:
    reviews = [{"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0} for u, i, t in AMAZON_REVIEWS]
    return (
        write_json_lines_gz(directory / "categoryFilesSmall" / f"{category}_5.json.gz", reviews),
        write_json_lines_gz(directory / "metaFiles2" / f"meta_{category}.json.gz", AMAZON_META),
    )


def test_amazon_import_matches_hand_built_expectation(tmp_path):
    reviews, meta = amazon_files(tmp_path / "raw")
    stats = run(Amazon(out=tmp_path / "out", reviews=reviews, meta=meta))
    sequences, item_meta = read_back(tmp_path / "out")
    assert sequences == AMAZON_EXPECTED
    assert item_meta == AMAZON_EXPECTED_META
    assert list(item_meta["A"]) == ["title", "brand", "category"]
    # ids: users in order of first appearance, items by first appearance in those sequences, 1-based
    assert json.loads((tmp_path / "out" / "umap.json").read_text()) == {"u1": 1, "u4": 2}
    assert json.loads((tmp_path / "out" / "smap.json").read_text()) == {"B": 1, "E": 2, "A": 3}
    assert stats["interactions"] == 8


def test_amazon_min_user_interactions_is_a_threshold(tmp_path):
    reviews, meta = amazon_files(tmp_path / "raw")
    run(Amazon(out=tmp_path / "out", reviews=reviews, meta=meta, min_user_interactions=3))
    sequences, _ = read_back(tmp_path / "out")
    assert sequences == {"u1": ["B", "E", "A", "A"], "u2": ["A", "B", "E"], "u3": ["A", "E", "B"],
                         "u4": ["E", "A", "B", "E"]}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(root directory, base URL) of a local HTTP server on 127.0.0.1 serving that directory."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_amazon_download_from_a_local_server(tmp_path, http_root):
    root, url = http_root
    amazon_files(root, category="Things")
    raw = tmp_path / "raw"
    run(Amazon(out=tmp_path / "out", category="Things", base_url=url, download_dir=raw))
    assert read_back(tmp_path / "out") == (AMAZON_EXPECTED, AMAZON_EXPECTED_META)
    assert sorted(p.name for p in raw.iterdir()) == ["Things_5.json.gz", "meta_Things.json.gz"]
    assert (raw / "Things_5.json.gz").read_bytes() == (root / "categoryFilesSmall" / "Things_5.json.gz").read_bytes()


def test_amazon_failed_download_leaves_nothing(tmp_path, http_root):
    _, url = http_root
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError, match="Missing_5.json.gz: download failed"):
        run(Amazon(out=tmp_path / "out", category="Missing", base_url=url, download_dir=raw))
    assert not raw.exists() and not (tmp_path / "out").exists()  # the download directory it made is gone too


def test_failing_import_leaves_no_output_and_keeps_an_existing_one(tmp_path):
    reviews, meta = amazon_files(tmp_path / "raw")
    with gzip.open(reviews, "at", encoding="utf-8") as f:
        f.write('{"reviewerID": "u9", "asin": \n')
    with pytest.raises(DatasetError, match=rf"{reviews}:17: invalid JSON"):
        run(Amazon(out=tmp_path / "out", reviews=reviews, meta=meta))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    existing = tmp_path / "existing"
    run(Synthetic(out=existing, users=20, items=10, seed=0))
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(DatasetError):
        run(Amazon(out=existing, reviews=reviews, meta=meta))
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before and leftovers(tmp_path) == []


def test_amazon_bad_arguments_and_missing_fields(tmp_path):
    reviews, meta = amazon_files(tmp_path / "raw")
    with pytest.raises(DatasetError, match="give --reviews and --meta"):
        run(Amazon(out=tmp_path / "out", reviews=reviews))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope.json.gz'}: file not found"):
        run(Amazon(out=tmp_path / "out", reviews=tmp_path / "nope.json.gz", meta=meta))
    bad = write_json_lines_gz(tmp_path / "bad.json.gz", [{"asin": "A", "unixReviewTime": 1}])
    with pytest.raises(DatasetError, match=rf"{bad}:1: missing field 'reviewerID'"):
        run(Amazon(out=tmp_path / "out", reviews=bad, meta=meta))
    bad = write_json_lines_gz(tmp_path / "bad.json.gz", [{"asin": "A", "reviewerID": "u", "unixReviewTime": "x"}])
    with pytest.raises(DatasetError, match=rf"{bad}:1: timestamp 'x' is not a number"):
        run(Amazon(out=tmp_path / "out", reviews=bad, meta=meta))
    corrupt = tmp_path / "corrupt.json.gz"
    corrupt.write_bytes(b"this is not gzip data")
    with pytest.raises(DatasetError, match=rf"{corrupt}: unreadable"):
        run(Amazon(out=tmp_path / "out", reviews=reviews, meta=corrupt))
    assert not (tmp_path / "out").exists()


def test_command_line_error_is_one_line_and_non_zero(tmp_path):
    missing = tmp_path / "missing.inter.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "prepare_data.py"), "lcrec", "--inter", str(missing), "--items", str(missing),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {missing}: file not found"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# recformer


def test_recformer_layout_is_normalized_to_one_based_ids(tmp_path):
    source = tmp_path / "Original"
    source.mkdir()
    files = {  # as the original processing writes them: 0-based ids, users not in key order
        "smap.json": {"X": 0, "Y": 1, "Z": 2},
        "umap.json": {"ua": 1, "ub": 0},
        "train.json": {"0": [2, 1, 0], "1": [0, 1]},
        "val.json": {"0": [1], "1": [2]},
        "test.json": {"0": [2], "1": [0]},
        "meta_data.json": {"X": {"title": "x", "brand": "bx", "category": "c"}, "Y": {"title": "y"},
                           "Z": {"title": "z"}, "unused": {"title": "dropped"}},
    }
    for name, obj in files.items():
        (source / name).write_text(json.dumps(obj))
    run(Recformer(dir=source, out=tmp_path / "out"))
    sequences, meta = read_back(tmp_path / "out")
    assert sequences == {"ub": ["Z", "Y", "X", "Y", "Z"], "ua": ["X", "Y", "Z", "X"]}
    assert meta == {"X": {"title": "x", "brand": "bx", "category": "c"}, "Y": {"title": "y"}, "Z": {"title": "z"}}
    assert json.loads((tmp_path / "out" / "smap.json").read_text()) == {"X": 1, "Y": 2, "Z": 3}
    assert load_dataset(tmp_path / "out").fingerprint == load_dataset(source).fingerprint


# ----------------------------------------------------------------------------------------------------------------------
# lcrec


def test_lcrec_import(tmp_path):
    inter = tmp_path / "T.inter.json"
    items = tmp_path / "T.item.json"
    inter.write_text(json.dumps({"0": [0, 1, 2, 1], "1": [2, 0], "2": [3, 0, 2]}))
    items.write_text(json.dumps({
        "0": {"title": "Scale &amp; Pan", "description": "long text", "brand": "Acme", "categories": "Lab,Scales"},
        "1": {"title": "Tape", "description": "", "brand": "", "categories": ""},
        "2": {"title": "Tube", "description": "d", "brand": "Glass  Co", "categories": "Lab,Glass,Tubes"},
        "3": {"title": "Clamp", "description": "d", "brand": "B", "categories": "Lab"},
        "4": {"title": "never used", "description": "", "brand": "", "categories": ""},
    }))
    run(Lcrec(inter=inter, items=items, out=tmp_path / "out"))
    sequences, meta = read_back(tmp_path / "out")
    assert sequences == {"0": ["0", "1", "2", "1"], "1": ["2", "0"], "2": ["3", "0", "2"]}
    assert meta == {
        "0": {"title": "Scale & Pan", "brand": "Acme", "category": "Lab Scales"},
        "1": {"title": "Tape", "brand": "", "category": ""},
        "2": {"title": "Tube", "brand": "Glass Co", "category": "Lab Glass Tubes"},
        "3": {"title": "Clamp", "brand": "B", "category": "Lab"},
    }

    inter.write_text(json.dumps({"0": [0, 9]}))
    with pytest.raises(DatasetError, match=rf"{items}: item '9' of T.inter.json has no entry"):
        run(Lcrec(inter=inter, items=items, out=tmp_path / "out2"))


# ----------------------------------------------------------------------------------------------------------------------
# unisrec

UNISREC_ITEMS = ["I0", "I1", "I2", "I3", "I4", "I5"]
UNISREC_USERS = ["alice", "bob", "carol"]
# user index -> full sequence (item indices); alice's is long enough that a history cap of 3 truncates her rows.
UNISREC_FULL = {0: [0, 1, 2, 3, 4, 5, 0, 2], 1: [5, 4, 3, 1], 2: [2, 2, 1]}
HISTORY_CAP = 3


def write_unisrec(directory: Path, full: dict[int, list[int]]) -> None:
    directory.mkdir(exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    train, valid, test = [], [], []
    for user, seq in full.items():
        for k in range(1, len(seq) - 2):  # prefix augmentation of the training part, history capped
            train.append(f"{user}\t{' '.join(map(str, seq[max(0, k - HISTORY_CAP):k]))}\t{seq[k]}\n")
        valid.append(f"{user}\t{' '.join(map(str, seq[-2 - HISTORY_CAP:-2]))}\t{seq[-2]}\n")
        test.append(f"{user}\t{' '.join(map(str, seq[-1 - HISTORY_CAP:-1]))}\t{seq[-1]}\n")
    train = train[::-1]  # the files list prefixes longest first; the importer must not rely on any order
    (directory / "T.train.inter").write_text(header + "".join(train))
    (directory / "T.valid.inter").write_text(header + "".join(valid))
    (directory / "T.test.inter").write_text(header + "".join(test))
    (directory / "T.item2index").write_text("".join(f"{key}\t{i}\n" for i, key in enumerate(UNISREC_ITEMS)))
    (directory / "T.user2index").write_text("".join(f"{key}\t{i}\n" for i, key in enumerate(UNISREC_USERS)))
    texts = "".join(f"{key}\tThing &amp; {key}. Cat. Brand. \n" for key in UNISREC_ITEMS)
    (directory / "T.text").write_text("item_id:token\ttext:token_seq\n" + texts)


def test_unisrec_rebuilds_full_sequences_exactly(tmp_path):
    write_unisrec(tmp_path / "src", UNISREC_FULL)
    run(Unisrec(dir=tmp_path / "src", name="T", out=tmp_path / "out"))
    sequences, meta = read_back(tmp_path / "out")
    assert sequences == {UNISREC_USERS[u]: [UNISREC_ITEMS[i] for i in seq] for u, seq in UNISREC_FULL.items()}
    assert meta["I3"] == {"text": "Thing & I3. Cat. Brand."}


def test_unisrec_rejects_a_validation_row_that_does_not_continue_training(tmp_path):
    write_unisrec(tmp_path / "src", UNISREC_FULL)
    valid = tmp_path / "src" / "T.valid.inter"
    lines = valid.read_text().splitlines(keepends=True)
    lines[2] = "1\t5 3\t3\n"  # bob's real history is 5 4
    valid.write_text("".join(lines))
    with pytest.raises(DatasetError, match=rf"{valid}:3: history of user 1 does not continue"):
        run(Unisrec(dir=tmp_path / "src", name="T", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# recbole


def write_recbole(directory: Path, with_items: bool) -> None:
    directory.mkdir(exist_ok=True)
    rows = [("7", "m1", 4, 300), ("7", "m2", 5, 100), ("3", "m3", 1, 50), ("7", "m3", 2, 100), ("3", "m1", 3, 60),
            ("7", "m9", 3, 200), ("3", "m2", 2, 40)]
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    (directory / "T.inter").write_text(inter + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    if with_items:
        items = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        items += "m1\tToy  Story\t1995\tAnimation Comedy\nm2\tHeat\t1995\tAction\nm3\tAmélie\t2001\tRomance\n"
        (directory / "T.item").write_text(items)


def test_recbole_import_sorts_by_time_and_reads_item_columns(tmp_path, capsys):
    write_recbole(tmp_path / "src", with_items=True)
    run(Recbole(dir=tmp_path / "src", name="T", out=tmp_path / "out"))
    sequences, meta = read_back(tmp_path / "out")
    # user 7: m2 and m3 tie at 100 and keep file order
    assert sequences == {"7": ["m2", "m3", "m9", "m1"], "3": ["m2", "m3", "m1"]}
    assert meta == {
        "m1": {"movie_title": "Toy Story", "release_year": "1995", "class": "Animation Comedy"},
        "m2": {"movie_title": "Heat", "release_year": "1995", "class": "Action"},
        "m3": {"movie_title": "Amélie", "release_year": "2001", "class": "Romance"},
        "m9": {"movie_title": "", "release_year": "", "class": ""},
    }
    assert "1 items of T.inter have no row" in capsys.readouterr().out


def recbole_with_timestamp(directory: Path, value: str) -> Recbole:
    write_recbole(directory, with_items=False)
    inter = directory / "T.inter"
    lines = inter.read_text().splitlines(keepends=True)
    lines[2] = lines[2].rsplit("\t", 1)[0] + f"\t{value}\n"
    inter.write_text("".join(lines))
    return Recbole(dir=directory, name="T", out=directory.parent / "out")


def amazon_with_timestamp(directory: Path, value: str) -> Amazon:
    reviews, meta = amazon_files(directory)
    with gzip.open(reviews, "at", encoding="utf-8") as f:  # line 17, after the 16 valid reviews
        f.write(f'{{"reviewerID": "u1", "asin": "A", "unixReviewTime": {value}}}\n')
    return Amazon(out=directory.parent / "out", reviews=reviews, meta=meta)


@pytest.mark.parametrize(
    "importer, value, line",
    [(recbole_with_timestamp, "nan", "T.inter:3"), (recbole_with_timestamp, "-inf", "T.inter:3"),
     (amazon_with_timestamp, "NaN", "Things_5.json.gz:17"), (amazon_with_timestamp, "true", "Things_5.json.gz:17")],
)  # fmt: skip
def test_timestamps_that_are_not_finite_numbers_are_rejected_with_file_and_line(tmp_path, importer, value, line):
    """NaN compares false with every time, so a sort would silently scramble the sequence around it."""
    args = importer(tmp_path / "src", value)
    with pytest.raises(DatasetError, match=rf"{line}: timestamp .* is not a (finite )?number"):
        run(args)
    assert not args.out.exists()


def test_recbole_without_item_file_is_id_only(tmp_path):
    write_recbole(tmp_path / "src", with_items=False)
    stats = run(Recbole(dir=tmp_path / "src", name="T", out=tmp_path / "out"))
    assert read_back(tmp_path / "out") == ({"7": ["m2", "m3", "m9", "m1"], "3": ["m2", "m3", "m1"]}, None)
    assert not (tmp_path / "out" / "meta_data.json").exists() and stats["items_without_text"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# pretrain-corpus


def lcrec_dataset(tmp_path: Path, name: str, inter: dict, items: dict) -> Path:
    (tmp_path / f"{name}.inter.json").write_text(json.dumps(inter))
    (tmp_path / f"{name}.item.json").write_text(json.dumps(items))
    run(Lcrec(inter=tmp_path / f"{name}.inter.json", items=tmp_path / f"{name}.item.json", out=tmp_path / name))
    return tmp_path / name


def test_pretrain_corpus_namespaces_keys_and_drops_items_without_text(tmp_path, capsys):
    text = {"title": "t", "brand": "b", "categories": "c"}
    blank = {"title": " ", "brand": "", "categories": ""}
    shop_items = {"0": text, "1": blank, "2": text, "3": text}
    shop = lcrec_dataset(tmp_path, "shop", {"u": [0, 1, 2, 3], "v": [1, 2]}, shop_items)
    # "1" exists in both datasets under the same key: namespacing keeps them apart
    lab = lcrec_dataset(tmp_path, "lab", {"w": [1, 0, 1], "x": [0, 2, 0]}, {"0": text, "1": text, "2": blank})
    dev = lcrec_dataset(tmp_path, "dev", {"y": [5, 6, 5]}, {"5": text, "6": text})
    stats = run(PretrainCorpus(sources=(shop, lab), dev=dev, out=tmp_path / "corpus", include_eval_targets=True))
    out = tmp_path / "corpus"
    train = json.loads((out / "train.json").read_text())
    # shop/v loses item "1" and is left with one item, too short for a pre-training pair
    assert train == [["shop/0", "shop/2", "shop/3"], ["lab/1", "lab/0", "lab/1"], ["lab/0", "lab/0"]]
    assert json.loads((out / "dev.json").read_text()) == [["dev/5", "dev/6", "dev/5"]]
    meta = json.loads((out / "meta_data.json").read_text())
    expected_text = {"title": "t", "brand": "b", "category": "c"}
    assert meta == {key: expected_text for key in ["shop/0", "shop/2", "shop/3", "lab/0", "lab/1", "dev/5", "dev/6"]}
    assert stats == {"train_sequences": 3, "dev_sequences": 1, "items": 7, "dropped_items_without_text": 2,
                     "dropped_short_sequences": 1}
    assert f"{shop}: 1 sequences, dropped 1 items without text" in capsys.readouterr().out



def test_pretrain_corpus_leaves_out_validation_and_test_targets_by_default(tmp_path):
    text = {"title": "t", "brand": "b", "categories": "c"}
    long = lcrec_dataset(tmp_path, "long", {"u": [0, 1, 2, 3, 0], "v": [3, 2, 1]}, {str(i): text for i in range(4)})
    dev = lcrec_dataset(tmp_path, "dev", {"y": [5, 6, 5, 6]}, {"5": text, "6": text})
    run(PretrainCorpus(sources=(long,), dev=dev, out=tmp_path / "corpus"))
    # training parts: long/u -> [0, 1, 2]; long/v -> [3], too short; dev/y -> [5, 6]
    assert json.loads((tmp_path / "corpus" / "train.json").read_text()) == [["long/0", "long/1", "long/2"]]
    assert json.loads((tmp_path / "corpus" / "dev.json").read_text()) == [["dev/5", "dev/6"]]
    short = lcrec_dataset(tmp_path, "short", {"u": [0, 1, 2]}, {str(i): text for i in range(3)})
    with pytest.raises(DatasetError, match="training part of the corpus is empty"):
        run(PretrainCorpus(sources=(short,), dev=dev, out=tmp_path / "corpus2"))
    assert not (tmp_path / "corpus2").exists()


def test_pretrain_corpus_rejects_name_collisions_and_id_only_data(tmp_path):
    text = {"title": "t", "brand": "b", "categories": "c"}
    shop = lcrec_dataset(tmp_path, "shop", {"u": [0, 1, 0]}, {"0": text, "1": text})
    (tmp_path / "other").mkdir()
    twin = lcrec_dataset(tmp_path / "other", "shop", {"u": [0, 1, 0]}, {"0": text, "1": text})
    with pytest.raises(DatasetError, match="shop: two --from/--dev directories share this name"):
        run(PretrainCorpus(sources=(shop,), dev=twin, out=tmp_path / "corpus"))
    write_recbole(tmp_path / "ids", with_items=False)
    run(Recbole(dir=tmp_path / "ids", name="T", out=tmp_path / "idonly"))
    with pytest.raises(DatasetError, match="idonly: no meta_data.json"):
        run(PretrainCorpus(sources=(tmp_path / "idonly",), dev=shop, out=tmp_path / "corpus"))
    assert not (tmp_path / "corpus").exists()


# ----------------------------------------------------------------------------------------------------------------------
# counts on the shared real data


def counts(stats: dict) -> tuple[int, int, int]:
    return stats["users"], stats["items"], stats["interactions"]


def test_lcrec_scientific_counts(shared_data, tmp_path):
    folder = shared_data / "scientific"
    inter, items = folder / "Scientific.inter.json", folder / "Scientific.item.json"
    stats = run(Lcrec(inter=inter, items=items, out=tmp_path / "s"))
    assert counts(stats) == (8317, 4344, 58492)


def test_unisrec_scientific_counts(shared_data, tmp_path):
    stats = run(Unisrec(dir=shared_data / "scientific_unisrec", name="Scientific", out=tmp_path / "s"))
    assert counts(stats) == (8442, 4385, 59427)


def test_recbole_ml100k_counts(shared_data, tmp_path):
    stats = run(Recbole(dir=shared_data / "ml-100k", name="ml-100k", out=tmp_path / "m"))
    assert counts(stats) == (943, 1682, 100000)
    _, meta = read_back(tmp_path / "m")
    assert meta["1"] == {"movie_title": "Toy Story", "release_year": "1995", "class": "Animation Children's Comedy"}
