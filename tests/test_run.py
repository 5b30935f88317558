"""Run utilities: atomic writes keep the old file on failure, early stopping, run directories."""

import json
from dataclasses import dataclass
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
class Config:
    data: Path = Path("data/synthetic")
    lr: float = 1e-3


def test_run_dir_and_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = create_run_dir(None, "sasrec", Path("data/synthetic"), "none", Config())
    assert run.parent == Path("runs/sasrec") and run.name.startswith("synthetic-none-")
    assert json.loads((run / "config.json").read_text()) == {"data": "data/synthetic", "lr": 1e-3}
    append_jsonl(run / "metrics.jsonl", {"epoch": 1})
    append_jsonl(run / "metrics.jsonl", {"epoch": 2})
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    write_json_atomic(run / "test_metrics.json", {"NDCG@10": 0.5})
    assert json.loads((run / "test_metrics.json").read_text()) == {"NDCG@10": 0.5}


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
