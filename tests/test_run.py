"""Run utilities: atomic writes keep the old file on failure, early stopping, run directories and their
provenance."""

import hashlib
import importlib
import json
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy
import pytest
import torch
import transformers
import tyro

import common.run
from common.embeddings import save_item_embeddings
from common.run import EarlyStopping, Scalars, append_jsonl, create_run_dir, save_atomic, write_json_atomic

REPOSITORY = Path(__file__).resolve().parents[1]


def test_save_atomic_keeps_previous_file_on_failure(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("finished checkpoint")

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomic(target, crash)
    assert target.read_text() == "finished checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_save_atomic_replaces_directories(tmp_path):
    target = tmp_path / "ckpt"

    def write_dir(text):
        def write(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "weights").write_text(text)

        return write

    save_atomic(target, write_dir("one"))
    save_atomic(target, write_dir("two"))
    assert (target / "weights").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_early_stopping():
    stopper = EarlyStopping(patience=2)
    assert [stopper.update(v) for v in (0.1, 0.3, 0.2, 0.3)] == [True, True, False, False]
    assert stopper.should_stop and stopper.best == 0.3


@dataclass
class Inner:
    path: Path = Path("a/b")


@dataclass
class Config:
    data: Path = Path("data/synthetic")
    lr: float = 1e-3
    dirs: tuple[Path, ...] = (Path("x"), Path("y/z"))
    inner: Inner = field(default_factory=Inner)
    embeddings: Path | None = None


def git(directory: Path, *arguments: str) -> str:
    result = subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_run_dir_records_the_configuration_as_plain_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = create_run_dir(None, "sasrec", Path("data/synthetic"), "none", Config())
    assert run.parent == Path("runs/sasrec") and run.name.startswith("synthetic-none-")
    saved = json.loads((run / "config.json").read_text())
    provenance = saved.pop("provenance")
    assert saved == {
        "data": "data/synthetic", "lr": 1e-3, "dirs": ["x", "y/z"], "inner": {"path": "a/b"}, "embeddings": None,
    }  # fmt: skip
    assert provenance["packages"] == {module.__name__: module.__version__
                                      for module in (torch, transformers, numpy, deepspeed, tyro)}  # fmt: skip
    if (REPOSITORY / ".git").exists():
        assert provenance["git_commit"] == git(REPOSITORY, "rev-parse", "HEAD")
        assert provenance["git_dirty"] == bool(git(REPOSITORY, "diff", "HEAD", "--name-only"))
    assert "item_table" not in provenance


def test_provenance_names_the_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    repository = tmp_path / "code"
    repository.mkdir()
    git(repository, "init", "-q")
    (repository / "model.py").write_text("lr = 1\n")
    (repository / "notes.txt").write_text("untracked files do not make a tree dirty\n")
    git(repository, "add", "model.py")
    git(repository, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git(repository, "rev-parse", "HEAD")
    assert len(commit) == 40
    monkeypatch.setattr(common.run, "REPOSITORY", repository)
    assert (common.run.provenance()["git_commit"], common.run.provenance()["git_dirty"]) == (commit, False)
    (repository / "model.py").write_text("lr = 2\n")
    assert (common.run.provenance()["git_commit"], common.run.provenance()["git_dirty"]) == (commit, True)
    monkeypatch.setattr(common.run, "REPOSITORY", tmp_path / "not-a-checkout")
    assert (common.run.provenance()["git_commit"], common.run.provenance()["git_dirty"]) == (None, None)


@pytest.mark.parametrize("script", ["train_sasrec", "train_bert4rec"])
@pytest.mark.parametrize("transform", ["none", "center"])
def test_plm_runs_record_and_print_their_item_table(script, transform, synthetic_data, tmp_path, monkeypatch, capsys):
    """The table file's sha256 and its values' sha256, its resolved path and the transform: in config.json, on the
    first line of output, and (the transform) in the default run directory's name."""
    from common.data import load_dataset

    data = load_dataset(synthetic_data)
    table = tmp_path / "tables" / "plm.safetensors"
    vectors = torch.randn(data.num_items + 1, 8, generator=torch.Generator().manual_seed(0))
    vectors[0] = 0.0  # the padding row, as the file stores it
    save_item_embeddings(table, vectors, data, checkpoint="test")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    module.main(module.Args(data=synthetic_data, init_type="plm", embeddings=Path("tables/plm.safetensors"),
                            init_transform=transform, num_heads=2, epochs=1, sample_size=20, device="cpu",
                            tensorboard=False))  # fmt: skip
    (run,) = (tmp_path / "runs" / script.removeprefix("train_")).iterdir()
    assert run.name.startswith(f"{synthetic_data.name}-plm-{transform}-")
    recorded = json.loads((run / "config.json").read_text())["provenance"]["item_table"]
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    values_digest = hashlib.sha256(vectors.numpy().tobytes()).hexdigest()
    expected = {"path": str(table.resolve()), "sha256": digest, "values_sha256": values_digest, "transform": transform}
    assert recorded == expected
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line == f"item table {expected['path']} (sha256 {expected['sha256']}), --init-transform {transform}"


@pytest.mark.parametrize("script", ["train_sasrec", "train_bert4rec", "finetune_recformer", "pretrain_recformer"])
def test_config_json_rebuilds_the_stage_arguments(tmp_path, script):
    """config.json holds every flag of a stage, so the run can be told apart from another (reproduce.py and --resume
    compare it) and started again: Args rebuilt from it equal the Args that wrote it."""
    module = importlib.import_module(script)
    args = module.Args(data=tmp_path / "data", out=tmp_path / "run", seed=7, lr=0.5)
    run = create_run_dir(args.out, script, args.data, "tag", args)
    saved = json.loads((run / "config.json").read_text())
    assert set(saved.pop("provenance")) == {"git_commit", "git_dirty", "packages"}
    hints = typing.get_type_hints(module.Args)
    paths = {name for name, hint in hints.items() if "Path" in str(hint)}
    def as_given(name, value):  # JSON has no paths and no tuples
        if isinstance(value, list):
            return tuple(value)
        return Path(value) if name in paths and value is not None else value

    rebuilt = module.Args(**{name: as_given(name, value) for name, value in saved.items()})
    assert rebuilt == args


def test_metrics_files_append_and_replace(tmp_path):
    append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 1, "path": Path("p")})
    append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 2})
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"epoch": 1, "path": "p"}, {"epoch": 2},
    ]  # fmt: skip
    write_json_atomic(tmp_path / "test_metrics.json", {"NDCG@10": 0.5})
    write_json_atomic(tmp_path / "test_metrics.json", {"NDCG@10": 0.25})
    assert json.loads((tmp_path / "test_metrics.json").read_text()) == {"NDCG@10": 0.25}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "test_metrics.json"]


def test_scalars_reach_tensorboard_event_files(tmp_path, read_scalars):
    scalars = Scalars(tmp_path)
    scalars.add(1, **{"train/loss": 2.5, "lr": 0.1})
    scalars.add(2, **{"train/loss": 1.5})
    scalars.close()
    assert read_scalars(tmp_path) == {"train/loss": [(1, 2.5), (2, 1.5)], "lr": [(1, pytest.approx(0.1))]}


def test_disabled_scalars_write_nothing(tmp_path):
    scalars = Scalars(tmp_path, enabled=False)
    scalars.add(1, loss=1.0)
    scalars.close()
    assert list(tmp_path.iterdir()) == []
