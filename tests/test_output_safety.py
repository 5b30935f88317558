"""Output safety: a failed or killed write never loses the previous dataset or checkpoint, nothing that is not ours
is replaced without --overwrite, caches follow the dataset they were made for, written files get normal modes."""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_recformer_model import small_config, word_piece

import export_embeddings
import train_sasrec
from common.data import DatasetError, load_dataset
from common.embeddings import save_item_embeddings
from common.evaluation import sample_negatives
from common.recformer_data import dataset_item_tokens
from common.run import OutputError, create_run_dir, recover, save_atomic
from prepare_data import Recformer, Synthetic, run, write_dataset
from recformer.tokenization_recformer import RecformerTokenizer

KILLED = 137


def hidden_entries(directory: Path) -> list[str]:
    """Temporary or swap leftovers (hidden names) in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------------
# a write that fails or is killed between its steps


def write_dataset_version(out: Path, version: str) -> None:
    write_dataset(out, {"ann": [version, "b", "c"], "bob": ["b", version]}, None)


def read_dataset_version(out: Path) -> str:
    data = load_dataset(out, verbose=False)
    return data.item_keys[data.sequence(0)[0]]


def write_checkpoint_version(out: Path, version: str) -> None:
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text(version)

    save_atomic(out, write)


def read_checkpoint_version(out: Path) -> str:
    return (out / "model.safetensors").read_text()


WRITERS = {
    "dataset": (write_dataset_version, read_dataset_version),
    "checkpoint directory": (write_checkpoint_version, read_checkpoint_version),
}


def die_at(step: str):
    """Patch the step of a directory write at which the process dies (os._exit runs no handler, like kill -9)."""
    if step == "writing the new files":  # right after the temporary directory is created
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            real_mkdir(self, *args, **kwargs)
            if ".tmp-" in self.name:
                os._exit(KILLED)

        Path.mkdir = mkdir
    elif step == "deleting the old version":
        shutil.rmtree = lambda *args, **kwargs: os._exit(KILLED)
    else:  # the k-th rename: 1 tmp -> .new, 2 target -> .old, 3 .new -> target
        real_rename, calls = Path.rename, []

        def rename(self, target):
            calls.append(target)
            if len(calls) == int(step[-1]):
                os._exit(KILLED)
            return real_rename(self, target)

        Path.rename = rename


KILL_STEPS = {  # step: the version at the target once the next call has recovered
    "writing the new files": "old",
    "rename 1": "old",
    "rename 2": "old",
    "rename 3": "new",
    "deleting the old version": "new",
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("step", KILL_STEPS)
def test_a_write_killed_at_any_step_is_recovered_by_the_next_call(tmp_path, writer, step):
    write, read = WRITERS[writer]
    out = tmp_path / "target"
    write(out, "old")
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        try:
            die_at(step)
            write(out, "new")
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED
    if out.exists():  # only a kill between moving the old version away and the new one in leaves no target
        assert read(out) == ("old" if KILL_STEPS[step] == "old" else "new")
    else:
        assert step == "rename 3"
    recover(out)  # what every later write to `out` does first
    assert read(out) == KILL_STEPS[step] and hidden_entries(tmp_path) == []
    write(out, "newer")
    assert read(out) == "newer" and hidden_entries(tmp_path) == []


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("failing_rename", [1, 2, 3])
def test_a_write_failing_between_its_renames_keeps_the_previous_version(tmp_path, monkeypatch, writer, failing_rename):
    write, read = WRITERS[writer]
    out = tmp_path / "target"
    write(out, "old")
    real_rename, calls = Path.rename, []

    def rename(self, target):
        calls.append(target)
        if len(calls) == failing_rename:
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        write(out, "new")
    assert read(out) == "old" and hidden_entries(tmp_path) == []


@pytest.mark.parametrize("hidden", [".data.tmp-k2j4h7x1.old", ".data.old-3hd9a0w2/data"])
def test_a_directory_the_earlier_swaps_left_only_under_a_hidden_name_is_restored(tmp_path, hidden):
    """The two-rename swaps before this version (save_atomic, replace_dir_atomically) killed between their renames."""
    out = tmp_path / "data"
    write_dataset_version(out, "old")
    (tmp_path / hidden).parent.mkdir(exist_ok=True)
    out.rename(tmp_path / hidden)
    recover(out)
    assert read_dataset_version(out) == "old"


def test_stale_temporary_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "table.safetensors"
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        save_atomic(out, lambda tmp: (tmp.write_text("half"), os._exit(KILLED)))
    os.waitpid(child, 0)
    (stale,) = hidden_entries(tmp_path)
    live = tmp_path / stale.replace(f"-{child}-", f"-{os.getpid()}-")  # a write in progress in this process
    live.write_text("in progress")
    save_atomic(out, lambda tmp: tmp.write_text("whole"))
    assert out.read_text() == "whole" and hidden_entries(tmp_path) == [live.name]


# ----------------------------------------------------------------------------------------------------------------------
# outputs that are not ours


def foreign_directory(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    return tmp_path / "out"


def regular_file(tmp_path: Path) -> Path:
    (tmp_path / "out").write_text("a file")
    return tmp_path / "out"


def under_a_file(tmp_path: Path) -> Path:
    return regular_file(tmp_path) / "dataset"


def dataset_with_an_exported_table(tmp_path: Path) -> Path:
    run(Synthetic(out=tmp_path / "out", users=20, items=60))
    (tmp_path / "out" / "embeddings").mkdir()
    (tmp_path / "out" / "embeddings" / "plm.safetensors").write_text("a table")
    return tmp_path / "out"


def dataset_with_caches(tmp_path: Path) -> Path:
    run(Synthetic(out=tmp_path / "out", users=20, items=60))
    sample_negatives(load_dataset(tmp_path / "out"), 3)
    return tmp_path / "out"


def empty_directory(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


OUTPUTS = {  # existing --out: (refused without --overwrite, refused with --overwrite, message)
    foreign_directory: (True, False, r"not a dataset written by prepare_data.py \(thesis.tex\)"),
    regular_file: (True, True, "is a file, not a dataset directory"),
    under_a_file: (True, True, "cannot be a dataset directory, .*out is a file"),
    dataset_with_an_exported_table: (True, False, r"not a dataset written by prepare_data.py \(embeddings\)"),
    dataset_with_caches: (False, False, ""),
    empty_directory: (False, False, ""),
}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


@pytest.mark.parametrize("make_output", OUTPUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_data_replaces_only_its_own_datasets_unless_told_to(tmp_path, make_output, overwrite):
    out = make_output(tmp_path)
    before = snapshot(tmp_path / "out")
    refused_without, refused_with, message = OUTPUTS[make_output]
    args = Synthetic(out=out, users=30, items=12, seed=5, overwrite=overwrite)
    if refused_with if overwrite else refused_without:
        with pytest.raises(DatasetError, match=message) as error:
            run(args)
        assert "\n" not in str(error.value) and str(out) in str(error.value)
        assert snapshot(tmp_path / "out") == before
    else:
        assert run(args)["users"] == 30 and load_dataset(out).num_users == 30
    assert hidden_entries(tmp_path) == []


def test_a_stage_refuses_an_earlier_run_directory_unless_told_to_empty_it(synthetic_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    args = train_sasrec.Args(
        data=synthetic_data, out=out, hidden_size=16, num_heads=2, epochs=1, sample_size=20, device="cpu"
    )
    with pytest.raises(OutputError) as error:
        train_sasrec.main(args)
    message = str(error.value)
    assert message.startswith(f"{out}: holds files of an earlier run") and "--overwrite" in message
    assert "\n" not in message and [p.name for p in out.iterdir()] == ["metrics.jsonl"]

    train_sasrec.main(train_sasrec.Args(**{**vars(args), "overwrite": True}))
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_never_deletes_an_input_or_the_current_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(Synthetic(out=out / "source", users=20, items=60))
    before = snapshot(out)
    with pytest.raises(DatasetError, match=f"{out}: not replaced, it holds {out / 'source'}"):
        run(Recformer(dir=out / "source", out=out, overwrite=True))
    with pytest.raises(OutputError, match=f"{out}: not emptied, it holds {out / 'source'}"):
        train_sasrec.main(train_sasrec.Args(data=out / "source", out=out, overwrite=True))
    monkeypatch.chdir(out / "source")
    with pytest.raises(OutputError, match=f"{out}: not emptied, it holds {out / 'source'}"):
        create_run_dir(out, "sasrec", Path("data"), "none", {}, overwrite=True)
    assert snapshot(out) == before


def test_run_directories_resume_in_place_and_refuse_paths_under_a_file(tmp_path):
    out = create_run_dir(tmp_path / "run", "pretrain", Path("corpus"), "tiny", {"lr": 1.0})
    (out / "deepspeed").mkdir()
    create_run_dir(out, "pretrain", Path("corpus"), "tiny", {"lr": 1.0}, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "deepspeed"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        create_run_dir(tmp_path / "file" / "run", "pretrain", Path("corpus"), "tiny", {}, overwrite=True)


def test_export_refuses_an_existing_table_before_any_work(synthetic_data, tmp_path):
    table = tmp_path / "plm.safetensors"
    table.write_text("an earlier table")
    with pytest.raises(OutputError) as error:
        export_embeddings.main(export_embeddings.Args(checkpoint="no-such-checkpoint", data=synthetic_data, out=table))
    assert str(error.value) == f"{table}: already exists; pass --overwrite to replace it"
    assert table.read_text() == "an earlier table"


# ----------------------------------------------------------------------------------------------------------------------
# caches


def copy_dataset_files(source: Path, target: Path) -> None:
    """Edit the dataset at `target` in place (its caches stay): its json files become those of `source`."""
    for file in source.glob("*.json"):
        shutil.copy(file, target / file.name)


def test_a_changed_dataset_gets_new_negatives_and_a_corrupt_cache_is_rebuilt(tmp_path):
    first, second = tmp_path / "data", tmp_path / "other"
    run(Synthetic(out=first, users=40, items=30, seed=0))
    run(Synthetic(out=second, users=40, items=30, seed=1))  # same shape, other sequences
    sample_negatives(load_dataset(first), 10)
    copy_dataset_files(second, first)
    changed = load_dataset(first)
    negatives = sample_negatives(changed, 10)
    # reference: the negatives of the same content written where no cache exists; none is one of the user's items
    np.testing.assert_array_equal(negatives, sample_negatives(load_dataset(second), 10))
    for row in range(changed.num_users):
        assert not set(negatives[row]) & set(changed.sequence(row).tolist())
    (cache,) = (first / "negatives").iterdir()  # the first dataset's file was removed
    cache.write_bytes(cache.read_bytes()[:50])  # a write cut short
    np.testing.assert_array_equal(sample_negatives(changed, 10), negatives)


def test_a_changed_dataset_gets_new_item_tokens_and_a_corrupt_cache_is_rebuilt(tmp_path):
    text = {"title": "red lamps", "brand": "acme"}
    write_dataset(tmp_path / "data", {"ann": ["x", "y", "z"]}, {"x": text, "y": {"title": "blue cup"}, "z": text})
    tokenizer = RecformerTokenizer(word_piece(), small_config())
    data = load_dataset(tmp_path / "data")
    first = dataset_item_tokens(tokenizer, data)
    data.item_text[2] = {"title": "red cup"}  # the text of item 2 changed
    changed = dataset_item_tokens(tokenizer, data)
    expected = tokenizer.tokenize_items(data.item_text)
    np.testing.assert_array_equal(changed.input_ids, expected.input_ids)
    assert not np.array_equal(changed.input_ids, first.input_ids)
    for cache in (tmp_path / "data" / "recformer_tokens").iterdir():
        cache.write_bytes(b"not an npz file")
    np.testing.assert_array_equal(dataset_item_tokens(tokenizer, data).offsets, expected.offsets)


# ----------------------------------------------------------------------------------------------------------------------
# modes


def write_checkpoint(tmp: Path) -> None:
    tmp.mkdir()
    save_file({"weight": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors creates files 0600


def test_written_files_and_directories_get_the_modes_the_umask_allows(tmp_path):
    umask = os.umask(0o027)
    try:
        run(Synthetic(out=tmp_path / "data", users=20, items=60))
        data = load_dataset(tmp_path / "data")
        sample_negatives(data, 3)
        save_item_embeddings(tmp_path / "plm.safetensors", torch.zeros(data.num_items + 1, 4), data, "tiny")
        save_atomic(tmp_path / "checkpoint", write_checkpoint)
    finally:
        os.umask(umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "data") == 0o750 and mode(tmp_path / "data" / "train.json") == 0o640
    assert {mode(p) for p in (tmp_path / "data" / "negatives").iterdir()} == {0o640}
    assert mode(tmp_path / "plm.safetensors") == 0o640 and mode(tmp_path / "checkpoint" / "model.safetensors") == 0o640
    assert mode(tmp_path / "checkpoint") == 0o750
