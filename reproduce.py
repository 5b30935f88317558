"""The paper's experiment grid on one dataset, in one command: item-table start x init transform x model x seed x
evaluation protocol, then a results table and plots.

Item-table starts (the paper's names):

    random       Xavier / N(0, 1), each model's own initialisation (no transform)
    longformer   the raw --backbone's item vectors
    pretrain     a pre-trained Recformer's vectors (--pretrained; skipped without it)
    finetune     the vectors of --pretrained (else --backbone) after Recformer's fine-tuning on --data (stage 1 model;
                 --finetune-max-steps N bounds it to N steps of stage 1 alone; --finetune-epochs 0 skips it)

Each PLM start is exported once to <out>/tables/<start>.safetensors and run under every --transforms; every
(model, start, transform, protocol, seed) is its own run directory <out>/runs/<name>/, trained by the stage script's
`main`. Each protocol (--sample-sizes: 100 = rank against 100 sampled negatives, -1 = rank against all items) trains
its own models, since SASRec's loss follows the protocol (README: loss coupling) and the best epoch is chosen on it.

The grid resumes: a run, table or fine-tuning directory that already holds its result is skipped; one left by a crash
(directory without its result) is removed and redone. Outputs in --out: results.md (mean +- std over seeds, change
against random init), results.json (every run and the summary), test_ndcg10.png (test NDCG@10 by model and start),
val_ndcg10.png (validation NDCG@10 per epoch, mean over seeds: convergence).

    python reproduce.py --data data/scientific --backbone all-MiniLM-L6-v2 --out runs/reproduce/scientific
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

import export_embeddings
import finetune_recformer
import train_bert4rec
import train_sasrec
from common.cli import Checked, Device, NonNegative, Positive, parse
from common.data import load_dataset
from common.embeddings import load_item_embeddings
from common.run import save_atomic, write_json_atomic

TRAINERS = {"sasrec": train_sasrec, "bert4rec": train_bert4rec}
MODEL_NAMES = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}
TABLE_METRICS = ("NDCG@10", "HR@10", "MRR")


@dataclass
class Args(Checked):
    data: Path
    """Dataset directory with item text (written by prepare_data.py)."""
    backbone: str
    """The raw language model: a Hugging Face Longformer / BERT / RoBERTa directory or hub name, or "tiny"."""
    out: Path
    """Directory for tables, runs and results; a second call with the same --out resumes."""
    pretrained: str | None = None
    """A pre-trained Recformer checkpoint (pretrain_recformer.py best/ or final/, or the paper's .bin): adds the
    "pretrain" start and is what "finetune" fine-tunes; without it, "finetune" fine-tunes --backbone."""
    finetune_epochs: Annotated[int, NonNegative] = 16
    """Maximum epochs of each Recformer fine-tuning stage for the "finetune" start; 0 skips that start."""
    finetune_max_steps: Annotated[int | None, Positive] = None
    """Optimizer steps of that fine-tuning at most (finetune_recformer.py --max-steps, stage 1 only); None: no
    limit, and both stages run as in the paper (the "finetune" table is the stage-1 model's either way)."""
    finetune_lr: Annotated[float, NonNegative] = 5e-5
    """AdamW peak learning rate of that fine-tuning."""
    finetune_warmup_steps: Annotated[int, NonNegative] = 100
    """Its linear warm-up steps (finetune_recformer.py --warmup-steps)."""
    models: tuple[Literal["sasrec", "bert4rec"], ...] = ("sasrec", "bert4rec")
    """Recommenders to train."""
    transforms: tuple[Literal["none", "center", "whiten"], ...] = ("none", "center", "whiten")
    """--init-transform values each PLM start runs with ("none" = the paper's copy)."""
    seeds: tuple[int, ...] = (42, 43)
    """One run per seed; the table reports mean and std over them."""
    sample_sizes: tuple[int, ...] = (100, -1)
    """Evaluation protocols, each trained separately: N > 0 ranks against N sampled negatives, <= 0 all items."""
    epochs: Annotated[int, Positive] = 200
    """Maximum epochs of each recommender run."""
    bert4rec_epochs: Annotated[int | None, Positive] = None
    """Maximum epochs of each BERT4Rec run, where it should differ from --epochs (BERT4Rec epochs cost more)."""
    patience: Annotated[int, Positive] = 10
    """Validations without a new best NDCG@10 before a recommender run stops."""
    hidden_size: Annotated[int | None, Positive] = None
    """Recommender width; default the backbone's vector width. Narrower than the vectors: --project pca."""
    sasrec_lr: Annotated[float, NonNegative] = 1e-4
    """SASRec's Adam learning rate (the paper's 1e-4)."""
    bert4rec_lr: Annotated[float, NonNegative] = 1e-4
    """BERT4Rec's Adam learning rate (the paper's 1e-4)."""
    device: Annotated[str, Device] = "auto"
    """"auto" (CUDA if available), "cpu", "cuda", ... for every stage."""
    report_only: bool = False
    """Train and export nothing: summarise the finished runs of the grid (results.md lists the missing ones), e.g.
    while other processes are still working through it."""


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    model: str
    start: str
    transform: str
    sample_size: int
    seed: int

    @property
    def protocol(self) -> str:
        return f"sampled-{self.sample_size}" if self.sample_size > 0 else "full"

    @property
    def name(self) -> str:
        return f"{self.model}-{self.start}-{self.transform}-{self.protocol}-seed{self.seed}"


def redo_if_crashed(directory: Path, result: Path) -> bool:
    """True when `result` already exists (skip); otherwise removes what a crashed attempt left in `directory`."""
    if result.exists():
        return False
    if directory.exists():
        print(f"{directory}: no {result.name}, left by an interrupted run; removing it and running again")
        shutil.rmtree(directory)
    return True


def export_table(args: Args, start: str, checkpoint: Callable[[], str]) -> Path | None:
    """<out>/tables/<start>.safetensors, exported from checkpoint() unless it exists (export writes atomically, so
    an existing file is complete; checkpoint() is only called, and so trained, when the table is missing); None
    for a missing table under --report-only."""
    path = args.out / "tables" / f"{start}.safetensors"
    if not path.exists():
        if args.report_only:
            return None
        export_embeddings.main(
            export_embeddings.Args(checkpoint=checkpoint(), data=args.data, out=path, device=args.device)
        )
    return path


def finetuned_checkpoint(args: Args) -> str:
    """The stage-1 model of Recformer fine-tuning on --data (from --pretrained, else --backbone), trained if needed."""
    run_dir = args.out / "finetune"
    if redo_if_crashed(run_dir, run_dir / "test_metrics.json"):
        finetune_recformer.main(
            finetune_recformer.Args(
                data=args.data,
                backbone=args.pretrained or args.backbone,
                out=run_dir,
                epochs=args.finetune_epochs,
                max_steps=args.finetune_max_steps,
                stages=2 if args.finetune_max_steps is None else 1,
                lr=args.finetune_lr,
                warmup_steps=args.finetune_warmup_steps,
                seed=args.seeds[0],
                device=args.device,
            )
        )
    return str(run_dir / "stage1")


def item_tables(args: Args) -> dict[str, Path | None]:
    """{start: embedding file} for every PLM start the flags ask for (None: missing, under --report-only)."""
    tables = {"longformer": export_table(args, "longformer", lambda: args.backbone)}
    if args.pretrained:
        tables["pretrain"] = export_table(args, "pretrain", lambda: args.pretrained)
    if args.finetune_epochs > 0:
        tables["finetune"] = export_table(args, "finetune", lambda: finetuned_checkpoint(args))
    return tables


def grid(args: Args, starts: list[str]) -> list[Run]:
    """Every run: random once per model, protocol and seed; each PLM start under every transform."""
    runs = []
    for model in args.models:
        for sample_size in args.sample_sizes:
            for start in starts:
                for transform in ("none",) if start == "random" else args.transforms:
                    runs.extend(Run(model, start, transform, sample_size, seed) for seed in args.seeds)
    return runs


def stage_args(args: Args, run: Run, run_dir: Path, table: Path | None, width: int, table_width: int | None):
    """The stage script's Args for one run: tables wider than the model are reduced by PCA (--project pca)."""
    trainer = TRAINERS[run.model]
    plm = dict(embeddings=table, init_transform=run.transform, project="pca" if width < (table_width or 0) else "none")
    return trainer.Args(
        data=args.data,
        out=run_dir,
        init_type="none" if table is None else "plm",
        hidden_size=width,
        sample_size=run.sample_size,
        epochs=args.epochs if run.model == "sasrec" or args.bert4rec_epochs is None else args.bert4rec_epochs,
        patience=args.patience,
        lr=args.sasrec_lr if run.model == "sasrec" else args.bert4rec_lr,
        seed=run.seed,
        device=args.device,
        **({} if table is None else plm),
    )


# Flags that change where a run writes or what it logs, not what it computes: a finished run is reused whatever they
# were (runs finished before a logging flag existed have none recorded).
NOT_SETTINGS = {"out", "tensorboard", "log_every"}


def check_settings(run_dir: Path, settings) -> None:
    """A finished run is reused only if its config.json holds the settings this call would give it."""
    recorded = json.loads((run_dir / "config.json").read_text())
    wanted = json.loads(json.dumps(asdict(settings), default=str))  # as config.json stores it: paths as strings
    differing = sorted(key for key in wanted if key not in NOT_SETTINGS and recorded.get(key) != wanted[key])
    if differing:
        raise SystemExit(
            f"error: {run_dir}: finished with other settings ({', '.join(differing)}); use another --out or remove it"
        )


def read_run(run: Run, run_dir: Path) -> dict:
    """One finished run's record: its cell, test metrics, validation curve and training seconds (metrics.jsonl)."""
    test = json.loads((run_dir / "test_metrics.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        **asdict(run),
        "protocol": run.protocol,
        "run_dir": str(run_dir),
        "test": test,
        "val_ndcg10": [epoch["NDCG@10"] for epoch in epochs],
        "train_seconds": sum(epoch["train_seconds"] for epoch in epochs),
    }


def summarise(records: list[dict]) -> list[dict]:
    """One entry per (model, start, transform, protocol): mean and std over seeds of the test metrics, the change of
    mean test NDCG@10 against the same model and protocol from random init, and the mean validation curve."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["model"], record["start"], record["transform"], record["protocol"])
        groups.setdefault(key, []).append(record)
    summary = []
    for (model, start, transform, protocol), members in groups.items():
        metrics = {}
        for metric in TABLE_METRICS:
            values = np.array([m["test"][metric] for m in members])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            metrics[metric] = {"mean": float(values.mean()), "std": std}
        summary.append(
            {
                "model": model,
                "start": start,
                "transform": transform,
                "protocol": protocol,
                "seeds": [m["seed"] for m in members],
                "test": metrics,
                "best_epochs": [m["test"]["best_epoch"] for m in members],
                "val_ndcg10_mean": mean_curve([m["val_ndcg10"] for m in members]),
            }
        )
    random_ndcg = {(s["model"], s["protocol"]): s["test"]["NDCG@10"]["mean"] for s in summary if s["start"] == "random"}
    for entry in summary:
        base = random_ndcg.get((entry["model"], entry["protocol"]))
        entry["ndcg10_vs_random"] = None if not base else entry["test"]["NDCG@10"]["mean"] / base - 1.0
    return summary


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Per-epoch mean over the seeds' curves, at each epoch over the runs that reached it (early stopping)."""
    return [float(np.mean([c[epoch] for c in curves if len(c) > epoch])) for epoch in range(max(map(len, curves)))]


def start_label(entry: dict) -> str:
    return entry["start"] if entry["start"] == "random" else f"{entry['start']} ({entry['transform']})"


def results_markdown(summary: list[dict], records: list[dict], args: Args, width: int, missing: list[str]) -> str:
    """The paper-style table, one section per protocol; then the runs of the grid not finished (--report-only)."""
    hours = sum(record["train_seconds"] for record in records) / 3600
    lines = [
        f"# Results on {args.data}",
        "",
        f"Backbone {args.backbone}; width {width}; seeds {' '.join(map(str, args.seeds))}; at most {args.epochs} "
        f"epochs (BERT4Rec {args.bert4rec_epochs or args.epochs}), patience {args.patience}; "
        f"lr SASRec {args.sasrec_lr:g}, BERT4Rec {args.bert4rec_lr:g}; "
        f"{len(records)} runs, {hours:.2f} h of training epochs in all (validation and test not counted). "
        "Test metrics: mean ± std over seeds; the change is that of mean test NDCG@10 against random init.",
    ]
    for protocol in dict.fromkeys(entry["protocol"] for entry in summary):
        lines += ["", f"## {protocol}", ""]
        lines.append("| model | item table (transform) | " + " | ".join(TABLE_METRICS) + " | vs random | best epochs |")
        lines.append("|---" * (len(TABLE_METRICS) + 4) + "|")
        for entry in (e for e in summary if e["protocol"] == protocol):
            cells = [f"{entry['test'][m]['mean']:.4f} ± {entry['test'][m]['std']:.4f}" for m in TABLE_METRICS]
            change = entry["ndcg10_vs_random"]
            change = "" if entry["start"] == "random" or change is None else f"{change:+.1%}"
            epochs = " ".join(map(str, entry["best_epochs"]))
            row = [MODEL_NAMES[entry["model"]], start_label(entry), *cells, change, epochs]
            lines.append("| " + " | ".join(row) + " |")
    if missing:
        lines += ["", f"Not finished, so not in the table ({len(missing)} runs): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot_results(summary: list[dict], out: Path) -> None:
    """test_ndcg10.png (bars with std error bars) and val_ndcg10.png (mean validation curves): one panel per model
    (rows) and protocol (columns)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(entry["model"] for entry in summary))
    protocols = list(dict.fromkeys(entry["protocol"] for entry in summary))
    for filename, draw in (("test_ndcg10.png", _bars), ("val_ndcg10.png", _curves)):
        figure, axes = plt.subplots(
            len(models), len(protocols), figsize=(6 * len(protocols), 4.5 * len(models)), squeeze=False
        )
        for row, model in enumerate(models):
            for column, protocol in enumerate(protocols):
                entries = [e for e in summary if e["model"] == model and e["protocol"] == protocol]
                draw(axes[row, column], entries)
                axes[row, column].set_title(f"{MODEL_NAMES[model]}, {protocol}")
        figure.tight_layout()
        save_atomic(out / filename, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
        plt.close(figure)


def _bars(axis, entries: list[dict]) -> None:
    labels = [start_label(e) for e in entries]
    means = [e["test"]["NDCG@10"]["mean"] for e in entries]
    stds = [e["test"]["NDCG@10"]["std"] for e in entries]
    axis.bar(range(len(entries)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(entries))])
    axis.set_xticks(range(len(entries)), labels, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel("test NDCG@10 (mean ± std over seeds)")


def _curves(axis, entries: list[dict]) -> None:
    for i, entry in enumerate(entries):
        curve = entry["val_ndcg10_mean"]
        axis.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, color=f"C{i}", label=start_label(entry))
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation NDCG@10 (mean over seeds)")
    axis.legend(fontsize=7)


def main(args: Args) -> dict:
    if not args.seeds or not args.models or not args.transforms or not args.sample_sizes:
        raise SystemExit("error: --seeds, --models, --transforms and --sample-sizes each need at least one value")
    began = time.time()
    tables = item_tables(args)
    if tables["longformer"] is None:
        raise SystemExit(f"error: --report-only: {args.out} holds no tables/longformer.safetensors yet")
    data = load_dataset(args.data)
    table_widths = {start: load_item_embeddings(path, data).shape[1] for start, path in tables.items() if path}
    width = args.hidden_size or table_widths["longformer"]
    records, missing = [], []
    for run in grid(args, ["random", *tables]):
        run_dir = args.out / "runs" / run.name
        if args.report_only and not (run_dir / "test_metrics.json").exists():
            missing.append(run.name)
            continue
        settings = stage_args(args, run, run_dir, tables.get(run.start), width, table_widths.get(run.start))
        if redo_if_crashed(run_dir, run_dir / "test_metrics.json"):
            print(f"== {run.name}")
            TRAINERS[run.model].main(settings)
        check_settings(run_dir, settings)
        records.append(read_run(run, run_dir))
    summary = summarise(records)
    write_json_atomic(
        args.out / "results.json",
        {"args": args, "width": width, "runs": records, "missing": missing, "summary": summary},
    )
    markdown = results_markdown(summary, records, args, width, missing)
    save_atomic(args.out / "results.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    plot_results(summary, args.out)
    print(markdown)
    print(f"wrote {args.out}/results.md, results.json, test_ndcg10.png, val_ndcg10.png in {time.time() - began:.0f} s")
    return {"runs": records, "summary": summary}


if __name__ == "__main__":
    main(parse(Args))
