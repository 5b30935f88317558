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
from common.cli import FlagError, parse
from common.run import InputError

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
    recformer = summary.pop(("recformer", "recformer", "none"))
    finetuned = json.loads((out / "finetune" / "test_metrics.json").read_text())["by_protocol"]["sampled-20"]
    assert {m: recformer["test"][m]["mean"] for m in reproduce.TABLE_METRICS} == {
        m: finetuned[m] for m in reproduce.TABLE_METRICS
    }  # Recformer's rows are the fine-tuning run's own test metrics
    assert recformer["users_per_s"] == finetuned["users"] / finetuned["test_seconds"]
    plm_cells = [(start, transform) for start in ("longformer", "finetune") for transform in ("none", "center")]
    cells = [("random", "none"), *plm_cells]
    assert set(summary) == {(model, start, transform) for model in ("sasrec", "bert4rec") for start, transform in cells}

    def run_file(model, start, transform, name):
        return json.loads((out / "runs" / f"{model}-{start}-{transform}-sampled-20-seed42" / name).read_text())

    for (model, start, transform), entry in summary.items():
        ndcg = run_file(model, start, transform, "test_metrics.json")["NDCG@10"]
        random_ndcg = run_file(model, "random", "none", "test_metrics.json")["NDCG@10"]
        assert entry["test"]["NDCG@10"] == {"mean": pytest.approx(ndcg), "std": None}  # one seed: n = 1, no std
        assert entry["ndcg10_vs_random"] == pytest.approx(ndcg / random_ndcg - 1)
        config = run_file(model, start, transform, "config.json")
        assert config["init_type"] == ("none" if start == "random" else "plm")
        assert config["init_transform"] == transform and config["sample_size"] == 20
    markdown = (out / "results.md").read_text()
    assert "| SASRec | tiny, raw (center) | " in markdown and "| BERT4Rec | random | " in markdown
    assert "| Recformer (fine-tuned) | (the model itself) | " in markdown and "±" not in markdown.split("## ")[1]
    assert "**11 of 11 runs not converged**" in markdown  # one epoch, patience 10 (fine-tuning 5): all at the cap

    stage_calls.clear()
    reproduce.main(args)
    assert stage_calls == []
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    crashed = out / "runs" / "bert4rec-longformer-center-sampled-20-seed42"
    (crashed / "test_metrics.json").unlink()
    (crashed / "stray").write_text("left by a crash")
    truncated = out / "runs" / "sasrec-random-none-sampled-20-seed42" / "test_metrics.json"
    truncated.write_text(truncated.read_text()[:20])  # cut by a kill mid-write (not by our atomic writes)
    reproduce.main(args)
    assert sorted(stage_calls) == ["train_bert4rec", "train_sasrec"]
    assert not (crashed / "stray").exists() and (crashed / "test_metrics.json").exists()
    assert json.loads(truncated.read_text())["best_epoch"] == 1

    config_file = out / "runs" / "sasrec-random-none-sampled-20-seed42" / "config.json"
    config = json.loads(config_file.read_text())
    for flag in reproduce.NOT_SETTINGS - {"out"}:  # as in a run finished before the logging flags existed
        del config[flag]
    config_file.write_text(json.dumps(config))
    stage_calls.clear()
    reproduce.main(args)
    assert stage_calls == []

    with pytest.raises(InputError, match=r"finished with other settings \(epochs\)"):
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
    assert saved["missing"] == [
        "sasrec-longformer-none-sampled-20-seed42", "sasrec-finetune-none-sampled-20-seed42",
        "finetune (Recformer's own rows)",
    ]  # fmt: skip
    assert "Not finished, so not in the table (3 runs)" in (out / "results.md").read_text()


def test_parallel_cells_give_the_results_of_one_job(synthetic_data, tmp_path):
    """--jobs 2 runs the tasks in two worker processes and writes the results.json of --jobs 1, timings aside."""
    args = dataclasses.replace(tiny_grid(synthetic_data, tmp_path / "one"), models=("sasrec",), transforms=("center",))
    one = reproduce.main(args)
    two = reproduce.main(dataclasses.replace(args, out=tmp_path / "two", jobs=2))
    assert comparable(two) == comparable(one)
    grid_log = (tmp_path / "two" / "grid.log").read_text()
    assert "0 of 6 tasks done; 6 to run, 2 at a time with 1 thread(s) each" in grid_log
    assert "start 1/6 finetune" in grid_log and "done 6/6" not in grid_log.splitlines()[0]
    assert (tmp_path / "two" / "logs" / "finetune.log").read_text().count("stage 1 epoch 1") == 1


def test_finetuning_launched_on_two_processes_matches_one(synthetic_data, tmp_path):
    """--finetune-processes 2 launches the fine-tuning with torchrun at half the batch per process, so a step
    averages the same sequences: its Recformer rows equal those of one process up to float rounding."""
    args = dataclasses.replace(tiny_grid(synthetic_data, tmp_path / "one"), models=("sasrec",), transforms=("none",))
    one = reproduce.main(args)
    two = reproduce.main(dataclasses.replace(args, out=tmp_path / "two", jobs=2, finetune_processes=2))
    config = json.loads((tmp_path / "two" / "finetune" / "config.json").read_text())
    assert config["batch_size"] == 8  # 16 / 2
    assert "2 process(es)" in (tmp_path / "two" / "logs" / "finetune.log").read_text()
    rows = [[run for run in results["runs"] if run["model"] == "recformer"] for results in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 1
    for metric, value in comparable(rows[0][0]["test"]).items():
        assert rows[1][0]["test"][metric] == pytest.approx(value, abs=1e-4), metric


def test_a_launched_finetuning_gets_its_own_settings(synthetic_data, tmp_path):
    """The command line the launch passes parses back to the Args the grid means (flags, tuples, booleans)."""
    grid = dataclasses.replace(tiny_grid(synthetic_data, tmp_path), finetune_processes=4, finetune_val_users=5,
                               sample_sizes=(20, -1), finetune_max_steps=3)  # fmt: skip
    config = reproduce.finetune_args(grid, resume=True)
    assert parse(finetune_recformer.Args, reproduce.command_line(config)) == config
    assert "--resume" in reproduce.command_line(config) and config.batch_size == 4  # 16 / 4


# Timings, paths, and the digest of a table file's bytes (two exports of equal vectors differ in metadata order)
NOT_COMPARED = {"train_seconds", "test_seconds", "users_per_s", "run_dir", "item_table_sha256"}


def comparable(results: dict):
    """results (runs and summary) without timings, paths and file digests."""
    if isinstance(results, dict):
        return {key: comparable(value) for key, value in results.items() if key not in NOT_COMPARED}
    if isinstance(results, list):
        return [comparable(value) for value in results]
    return results


def test_published_runs_are_reused_on_a_machine_without_the_grid(synthetic_data, tmp_path, stage_calls):
    """--publish copies the report and each finished cell's record files (no checkpoints); a grid on a fresh --out
    with --reuse trains none of those cells again and reports what the original grid reported; a reused PLM run
    whose table values differ from the re-exported one's is flagged; reused runs of other settings are refused."""
    args = dataclasses.replace(tiny_grid(synthetic_data, tmp_path / "first"), models=("sasrec",),
                               transforms=("none",), finetune_epochs=0, publish=tmp_path / "published")  # fmt: skip
    first = reproduce.main(args)
    published = tmp_path / "published"
    assert sorted(p.name for p in published.iterdir()) == sorted([*reproduce.PUBLISHED_FILES, "runs"])
    cells = ["sasrec-longformer-none-sampled-20-seed42", "sasrec-random-none-sampled-20-seed42"]
    assert sorted(p.name for p in (published / "runs").iterdir()) == cells
    for cell in cells:
        assert sorted(p.name for p in (published / "runs" / cell).iterdir()) == sorted(reproduce.RUN_RECORD_FILES)

    stage_calls.clear()
    fresh = dataclasses.replace(args, out=tmp_path / "second", publish=None, reuse=published)
    second = reproduce.main(fresh)
    assert stage_calls == ["export_embeddings"]  # the table is exported again; no cell is trained
    assert comparable(second) == comparable(first)
    assert "other item vectors" not in (tmp_path / "second" / "results.md").read_text()  # same values, new bytes

    config_file = tmp_path / "second" / "runs" / cells[0] / "config.json"
    config = json.loads(config_file.read_text())
    table = config["provenance"]["item_table"]
    for changed in ({"values_sha256": "0" * 64}, {"sha256": "0" * 64, "values_sha256": None}):
        # other values recorded, as if exported on another machine; then a run recorded before values digests
        # existed, whose file tables.json does not know
        config["provenance"]["item_table"] = {**table, **changed}
        config_file.write_text(json.dumps(config))
        reproduce.main(dataclasses.replace(fresh, report_only=True))
        assert "**1 PLM runs started from other item vectors than tables/ holds now**" in (
            tmp_path / "second" / "results.md").read_text()  # fmt: skip

    with pytest.raises(InputError, match=r"finished with other settings \(epochs\)"):
        reproduce.main(dataclasses.replace(fresh, out=tmp_path / "third", epochs=2))
    with pytest.raises(InputError, match=r"^--reuse: .* holds no runs/ directory"):
        reproduce.main(dataclasses.replace(fresh, reuse=tmp_path))


def test_not_converged_exactly_when_the_best_epoch_is_within_patience_of_the_cap(synthetic_data, tmp_path):
    out = tmp_path / "grid"
    args = dataclasses.replace(
        tiny_grid(synthetic_data, out), models=("sasrec",), transforms=("none",), finetune_epochs=0, seeds=(42, 43),
        epochs=3, patience=1,
    )  # fmt: skip
    reproduce.main(args)
    best_epochs = {"random-none-sampled-20-seed42": 2, "random-none-sampled-20-seed43": 3,
                   "longformer-none-sampled-20-seed42": 3, "longformer-none-sampled-20-seed43": 1}  # fmt: skip
    for name, epoch in best_epochs.items():  # as if the runs had peaked there: cap 3, patience 1
        metrics_file = out / "runs" / f"sasrec-{name}" / "test_metrics.json"
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "best_epoch": epoch}))
    results = reproduce.main(dataclasses.replace(args, report_only=True))
    assert [(r["seed"], r["converged"]) for r in results["runs"]] == [(42, True), (43, False), (42, False), (43, True)]
    markdown = (out / "results.md").read_text()
    assert "**2 of 4 runs not converged**" in markdown
    assert "| SASRec | random | " in markdown and " | 2 3* | " in markdown and " | 3* 1 | " in markdown


def test_flags_and_out_are_checked_before_anything_runs(synthetic_data, tmp_path, stage_calls):
    args = tiny_grid(synthetic_data, tmp_path / "grid")
    for changes, message in [
        (dict(sample_sizes=(20, 500)), "--sample-size"),  # more negatives than the catalogue has
        (dict(seeds=(42, 2**32)), "--seeds"),  # a flag rule: refused when the Args are built
        (dict(pretrained=str(tmp_path / "missing")), "--pretrained"),
    ]:
        with pytest.raises((InputError, FlagError), match=message):
            reproduce.main(dataclasses.replace(args, **changes))
        assert stage_calls == [] and not (tmp_path / "grid").exists()
    finished_run = tmp_path / "someone's run"
    finished_run.mkdir()
    (finished_run / "best.pt").write_text("a finished checkpoint")
    with pytest.raises(InputError, match="holds no grid of reproduce.py"):
        reproduce.main(dataclasses.replace(args, out=finished_run))
    assert stage_calls == [] and [p.name for p in finished_run.iterdir()] == ["best.pt"]
