"""The dataset format: writing, loading (incl. 0-based files) and every validation error."""

import json

import numpy as np
import pytest

from common.data import PAD, SPLIT_FILES, DatasetError, Sequences, load_dataset
from common.evaluation import evaluate
from prepare_data import write_dataset

SEQUENCES = {"ann": ["a", "b", "c", "d"], "bob": ["b", "c"], "cid": ["e", "a", "b"]}
META = {key: {"title": f"Title {key}", "brand": "Acme", "category": "Tools"} for key in "abcde"}


@pytest.fixture()
def dataset_dir(tmp_path):
    out = tmp_path / "toy"
    write_dataset(out, SEQUENCES, META)
    return out


def rewrite(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


def test_written_files_and_split(dataset_dir):
    assert json.loads((dataset_dir / "smap.json").read_text()) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert json.loads((dataset_dir / "umap.json").read_text()) == {"ann": 1, "bob": 2, "cid": 3}
    assert json.loads((dataset_dir / "train.json").read_text()) == {"1": [1, 2], "2": [2, 3], "3": [5]}
    assert json.loads((dataset_dir / "val.json").read_text()) == {"1": [3], "3": [1]}
    assert json.loads((dataset_dir / "test.json").read_text()) == {"1": [4], "3": [2]}
    stats = json.loads((dataset_dir / "stats.json").read_text())
    assert stats["users"] == 3 and stats["items"] == 5 and stats["interactions"] == 9
    assert stats["median_sequence_length"] == 3.0 and stats["items_without_text"] == 0


def test_loaded_arrays(dataset_dir):
    data = load_dataset(dataset_dir)
    assert data.item_keys == ["", "a", "b", "c", "d", "e"]
    assert data.user_keys == ["ann", "bob", "cid"]
    assert isinstance(data, Sequences) and len(data) == 3
    np.testing.assert_array_equal(data.offsets, [0, 4, 6, 9])
    np.testing.assert_array_equal(data.lengths, [4, 2, 3])
    np.testing.assert_array_equal(data.sequence(0), [1, 2, 3, 4])
    np.testing.assert_array_equal(data.train_matrix(3), [[0, 1, 2], [0, 2, 3], [0, 0, 5]])
    rows, histories, targets = data.eval_split("test", 4)
    np.testing.assert_array_equal(rows, [0, 2])
    np.testing.assert_array_equal(histories, [[0, 1, 2, 3], [0, 0, 5, 1]])
    np.testing.assert_array_equal(targets, [4, 2])
    assert data.item_text[2] == META["b"]


def test_sequences_csr_matches_python_lists():
    """The CSR storage against list slicing: every row, every end position, histories shorter and longer."""
    lists = [[5, 6], [], [1, 2, 3, 4, 9], [7]]
    sequences = Sequences.from_lists(lists)
    np.testing.assert_array_equal(sequences.offsets, [0, 2, 2, 7, 8])
    np.testing.assert_array_equal(sequences.items, [5, 6, 1, 2, 3, 4, 9, 7])
    assert len(sequences) == 4 and sequences.lengths.tolist() == [2, 0, 5, 1]
    assert [sequences.sequence(row).tolist() for row in range(4)] == lists
    rows, ends = zip(*[(row, end) for row, items in enumerate(lists) for end in range(len(items) + 1)])
    for length in (1, 3, 6):
        expected = [[PAD] * max(0, length - end) + lists[row][max(0, end - length) : end]
                    for row, end in zip(rows, ends)]  # fmt: skip
        assert sequences.left_padded(np.array(rows), np.array(ends), length).tolist() == expected
    entry_rows, items = sequences.prefix_items(np.array([2, 0, 1, 3]), np.array([3, 1, 0, 1]))
    assert entry_rows.tolist() == [0, 0, 0, 1, 3] and items.tolist() == [1, 2, 3, 5, 7]


def test_zero_based_files_are_shifted(dataset_dir, capsys):
    """The original Recformer processing numbers items from 0."""
    expected = load_dataset(dataset_dir)
    rewrite(dataset_dir / "smap.json", lambda d: d.update({k: v - 1 for k, v in d.items()}))
    for name in ("train.json", "val.json", "test.json"):
        rewrite(dataset_dir / name, lambda d: d.update({u: [i - 1 for i in s] for u, s in d.items()}))
    data = load_dataset(dataset_dir)
    assert "0-based" in capsys.readouterr().out
    np.testing.assert_array_equal(data.items, expected.items)
    assert data.item_keys == expected.item_keys


def test_fingerprint_depends_on_item_order(dataset_dir, tmp_path):
    other = tmp_path / "other"
    write_dataset(other, {"x": ["b", "a", "c"]}, None)
    assert load_dataset(dataset_dir).fingerprint != load_dataset(other).fingerprint


def test_missing_meta_means_id_only(dataset_dir):
    (dataset_dir / "meta_data.json").unlink()
    assert load_dataset(dataset_dir).item_text is None


def test_missing_file(dataset_dir):
    (dataset_dir / "val.json").unlink()
    with pytest.raises(DatasetError, match=r"val\.json: file not found"):
        load_dataset(dataset_dir)


def test_bad_json(dataset_dir):
    (dataset_dir / "train.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"train\.json: invalid JSON"):
        load_dataset(dataset_dir)


def test_unknown_item_id(dataset_dir):
    rewrite(dataset_dir / "train.json", lambda d: d["1"].append(99))
    with pytest.raises(DatasetError, match=r"train\.json: user 1 has item id 99 that is not in smap"):
        load_dataset(dataset_dir)


def test_unknown_user_id(dataset_dir):
    rewrite(dataset_dir / "train.json", lambda d: d.update({"7": [1]}))
    with pytest.raises(DatasetError, match=r"train\.json: user 7 is not in umap"):
        load_dataset(dataset_dir)


def test_empty_sequence(dataset_dir):
    rewrite(dataset_dir / "train.json", lambda d: d.update({"2": []}))
    with pytest.raises(DatasetError, match=r"train\.json: user '2' has an empty sequence"):
        load_dataset(dataset_dir)


def test_val_user_without_history(dataset_dir):
    rewrite(dataset_dir / "train.json", lambda d: d.pop("3"))
    with pytest.raises(DatasetError, match=r"val\.json: user 3 has no training history"):
        load_dataset(dataset_dir)


def test_meta_smap_mismatch(dataset_dir):
    rewrite(dataset_dir / "meta_data.json", lambda d: d.pop("c"))
    with pytest.raises(DatasetError, match=r"meta_data\.json: item 'c' from smap\.json has no entry"):
        load_dataset(dataset_dir)


def test_duplicate_keys(dataset_dir):
    (dataset_dir / "smap.json").write_text('{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "a": 6}')
    with pytest.raises(DatasetError, match=r"smap\.json: duplicate key 'a'"):
        load_dataset(dataset_dir)


def test_shared_item_id(dataset_dir):
    rewrite(dataset_dir / "smap.json", lambda d: d.update({"e": 4}))
    with pytest.raises(DatasetError, match=r"smap\.json: two keys share one id"):
        load_dataset(dataset_dir)


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(DatasetError, match="has no meta data"):
        write_dataset(out, SEQUENCES, {"a": META["a"]})
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_atomically(dataset_dir):
    stats = write_dataset(dataset_dir, {"zed": ["q", "r", "s", "t"]}, None)
    assert stats["users"] == 1
    assert not (dataset_dir / "meta_data.json").exists()
    assert [p.name for p in dataset_dir.parent.iterdir()] == ["toy"]


def edit(name, update):
    return lambda directory: rewrite(directory / name, update)


BAD_FILES = {  # case: (edit of the toy dataset, expected one-line message)
    "JSON true as an item id": (
        edit("train.json", lambda d: d["1"].append(True)), r"train\.json: user '1' has item id true, not an integer"
    ),
    "JSON false as an item id": (
        edit("test.json", lambda d: d.update({"1": [False]})), r"test\.json: user '1' has item id false"
    ),
    "id beyond int64": (
        edit("val.json", lambda d: d.update({"1": [10**30]})), r"val\.json: user 1 has item id 10{30} that is not"
    ),
    "no users": (
        lambda directory: [edit(name, dict.clear)(directory) for name in SPLIT_FILES], r"train\.json: no users"
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_ids_and_empty_datasets_are_one_line_errors(dataset_dir, case):
    break_dataset, message = BAD_FILES[case]
    break_dataset(dataset_dir)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(dataset_dir)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_evaluation_over_zero_users_is_an_error(dataset_dir, split):
    rewrite(dataset_dir / "test.json", lambda d: d.clear())  # a test target needs a validation target
    if split == "val":
        rewrite(dataset_dir / "val.json", lambda d: d.clear())
    data = load_dataset(dataset_dir)

    def never_called(histories, candidates):
        raise AssertionError("there is nothing to score")

    with pytest.raises(DatasetError, match=rf"{split}\.json: no users to evaluate on \(split {split} of toy\)"):
        evaluate(never_called, data, split, max_len=5, sample_size=0, device="cpu")
