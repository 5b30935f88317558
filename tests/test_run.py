"""Run utilities: atomic writes keep the old file on failure, early stopping, run directories."""

import importlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.run import EarlyStopping, Scalars, append_jsonl, create_run_dir, save_atomic, write_json_atomic


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


def test_run_dir_records_the_configuration_as_plain_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = create_run_dir(None, "sasrec", Path("data/synthetic"), "none", Config())
    assert run.parent == Path("runs/sasrec") and run.name.startswith("synthetic-none-")
    assert json.loads((run / "config.json").read_text()) == {
        "data": "data/synthetic", "lr": 1e-3, "dirs": ["x", "y/z"], "inner": {"path": "a/b"}, "embeddings": None,
    }  # fmt: skip


@pytest.mark.parametrize("script", ["train_sasrec", "train_bert4rec", "finetune_recformer", "pretrain_recformer"])
def test_config_json_rebuilds_the_stage_arguments(tmp_path, script):
    """config.json holds every flag of a stage, so the run can be told apart from another (reproduce.py and --resume
    compare it) and started again: Args rebuilt from it equal the Args that wrote it."""
    module = importlib.import_module(script)
    args = module.Args(data=tmp_path / "data", out=tmp_path / "run", seed=7, lr=0.5)
    run = create_run_dir(args.out, script, args.data, "tag", args)
    saved = json.loads((run / "config.json").read_text())
    hints = typing.get_type_hints(module.Args)
    paths = {name for name, hint in hints.items() if "Path" in str(hint)}
    rebuilt = module.Args(**{k: Path(v) if k in paths and v is not None else v for k, v in saved.items()})
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
