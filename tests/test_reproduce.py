"""reproduce.py on the synthetic data with the tiny backbone: the grid runs once, writes results.md, results.json and
the plots, summarises the runs' own test_metrics.json files, and resumes (nothing new on a second call; a crashed run,
and only it, again; finished runs made with other settings are refused)."""

import dataclasses
import json

import pytest

import export_embeddings
import finetune_recformer
import reproduce
import train_bert4rec
import train_sasrec

STAGES = (train_sasrec, train_bert4rec, export_embeddings, finetune_recformer)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def stage_calls(monkeypatch):
    """Counts calls of every stage's main (the calls still run)."""
    calls = []
    for stage in STAGES:

        def counted(args, main=stage.main, name=stage.__name__):
            calls.append(name)
            return main(args)

        monkeypatch.setattr(stage, "main", counted)
    return calls


def tiny_grid(data, out):
    return reproduce.Args(
        data=data,
        backbone="tiny",
        out=out,
        finetune_epochs=1,
        transforms=("none", "center"),
        seeds=(42,),
        sample_sizes=(20,),
        epochs=1,
        device="cpu",
    )


def test_grid_writes_results_and_resumes(synthetic_data, tmp_path, stage_calls):
    out = tmp_path / "grid"
    args = tiny_grid(synthetic_data, out)
    reproduce.main(args)
    # starts: random + longformer, finetune under 2 transforms = 5 runs per model; tables: longformer, finetune
    assert sorted(stage_calls) == sorted(
        ["finetune_recformer"] + ["export_embeddings"] * 2 + ["train_sasrec"] * 5 + ["train_bert4rec"] * 5
    )
    assert {path.name for path in out.iterdir()} >= {"results.md", "results.json", "test_ndcg10.png", "val_ndcg10.png"}
    for plot in ("test_ndcg10.png", "val_ndcg10.png"):
        assert (out / plot).read_bytes().startswith(PNG_SIGNATURE)

    results = json.loads((out / "results.json").read_text())
    summary = {(e["model"], e["start"], e["transform"]): e for e in results["summary"]}
    plm_cells = [(start, transform) for start in ("longformer", "finetune") for transform in ("none", "center")]
    cells = [("random", "none"), *plm_cells]
    assert set(summary) == {(model, start, transform) for model in ("sasrec", "bert4rec") for start, transform in cells}

    def run_file(model, start, transform, name):
        return json.loads((out / "runs" / f"{model}-{start}-{transform}-sampled-20-seed42" / name).read_text())

    for (model, start, transform), entry in summary.items():
        ndcg = run_file(model, start, transform, "test_metrics.json")["NDCG@10"]
        random_ndcg = run_file(model, "random", "none", "test_metrics.json")["NDCG@10"]
        assert entry["test"]["NDCG@10"] == {"mean": pytest.approx(ndcg), "std": 0.0}
        assert entry["ndcg10_vs_random"] == pytest.approx(ndcg / random_ndcg - 1)
        config = run_file(model, start, transform, "config.json")
        assert config["init_type"] == ("none" if start == "random" else "plm")
        assert config["init_transform"] == transform and config["sample_size"] == 20
    markdown = (out / "results.md").read_text()
    assert "| SASRec | longformer (center) |" in markdown and "| BERT4Rec | random |" in markdown

    stage_calls.clear()
    reproduce.main(args)
    assert stage_calls == []
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    crashed = out / "runs" / "bert4rec-longformer-center-sampled-20-seed42"
    (crashed / "test_metrics.json").unlink()
    (crashed / "stray").write_text("left by a crash")
    reproduce.main(args)
    assert stage_calls == ["train_bert4rec"]
    assert not (crashed / "stray").exists() and (crashed / "test_metrics.json").exists()

    config_file = out / "runs" / "sasrec-random-none-sampled-20-seed42" / "config.json"
    config = json.loads(config_file.read_text())
    for flag in reproduce.NOT_SETTINGS - {"out"}:  # as in a run finished before the logging flags existed
        del config[flag]
    config_file.write_text(json.dumps(config))
    stage_calls.clear()
    reproduce.main(args)
    assert stage_calls == []

    with pytest.raises(SystemExit, match=r"finished with other settings \(epochs\)"):
        reproduce.main(dataclasses.replace(args, epochs=2))
    assert stage_calls == []


def test_bounded_finetuning_and_per_model_epochs(synthetic_data, tmp_path):
    out = tmp_path / "grid"
    args = dataclasses.replace(
        tiny_grid(synthetic_data, out), transforms=("none",), finetune_max_steps=1, finetune_warmup_steps=0,
        bert4rec_epochs=2,
    )  # fmt: skip
    reproduce.main(args)
    finetune = json.loads((out / "finetune" / "config.json").read_text())
    assert (finetune["max_steps"], finetune["stages"], finetune["warmup_steps"]) == (1, 1, 0)
    assert (out / "finetune" / "stage1").is_dir() and not (out / "finetune" / "stage2").exists()
    for model, epochs in (("sasrec", 1), ("bert4rec", 2)):
        config = json.loads((out / "runs" / f"{model}-finetune-none-sampled-20-seed42" / "config.json").read_text())
        assert config["epochs"] == epochs


def test_report_only_trains_nothing_and_lists_the_missing_runs(synthetic_data, tmp_path, stage_calls):
    out = tmp_path / "grid"
    args = dataclasses.replace(
        tiny_grid(synthetic_data, out), models=("sasrec",), transforms=("none",), finetune_epochs=0
    )  # fmt: skip
    reproduce.main(args)
    unfinished = out / "runs" / "sasrec-longformer-none-sampled-20-seed42"
    (unfinished / "test_metrics.json").unlink()  # as if another process were still training it
    stage_calls.clear()
    results = reproduce.main(dataclasses.replace(args, report_only=True, finetune_epochs=1))
    assert stage_calls == [] and (unfinished / "metrics.jsonl").exists()
    assert [(r["start"], r["transform"]) for r in results["runs"]] == [("random", "none")]
    saved = json.loads((out / "results.json").read_text())
    assert saved["missing"] == ["sasrec-longformer-none-sampled-20-seed42", "sasrec-finetune-none-sampled-20-seed42"]
    assert "Not finished, so not in the table (2 runs)" in (out / "results.md").read_text()
