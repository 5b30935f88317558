"""The paper's grid on one dataset, in one command: item-table start x init transform x model x seed x evaluation
protocol, Recformer itself beside them, then a results table and plots.

Item-table starts (the paper's names; results.md names them after the backbone):

    random       Xavier / N(0, 1), each model's own initialisation (no transform)
    longformer   the raw --backbone's item vectors ("<backbone>, raw" in results.md)
    pretrain     a pre-trained Recformer's vectors (--pretrained; skipped without it)
    finetune     the vectors of --pretrained (else --backbone) after Recformer's two-stage fine-tuning on --data, each
                 stage to its patience (stage 1 model; --finetune-max-steps N bounds it to N steps of stage 1 alone;
                 --finetune-epochs 0 skips it). The fine-tuned Recformer is itself tested under every protocol and
                 has its own rows, "Recformer (fine-tuned)".

Each PLM start is exported once to <out>/tables/<start>.safetensors and run under every --transforms; every
(model, start, transform, protocol, seed) is its own run directory <out>/runs/<name>/, trained by the stage script's
`main`. Each protocol (--sample-sizes: 100 = rank against 100 sampled negatives, -1 = rank against all items) trains
its own models, since SASRec's loss follows the protocol (README: loss coupling) and the best epoch is chosen on it.

Parallel cells: --jobs N runs N tasks (cells, the fine-tuning, exports) at once, each a process with cores // N
threads (on CUDA the N processes share the GPU); a task starts once the table it needs exists, in an order that
answers the main question first (random against finetune, full ranking, both models, then the other starts);
--finetune-processes N runs the fine-tuning as N data-parallel processes (torchrun) in N of those slots. Their
output goes to <out>/logs/<task>.log; the grid's own log (<out>/grid.log and the terminal) says which task of how
many starts and ends when.

Ctrl-C or SIGTERM stops the grid in one line (exit status 130): the running tasks' processes are ended with it
(a worker whose grid process died, even by SIGKILL, ends itself within a second), so no orphan goes on writing into
--out. The grid resumes: a run or table that holds its result is skipped, a run directory left by a crash (no readable
test_metrics.json) is removed and redone, and a killed fine-tuning goes on from its last finished epoch
(finetune_recformer.py --resume). On another machine, --reuse DIR takes the finished cells that --publish DIR
copied there (their config.json, metrics.jsonl and test_metrics.json; the fine-tuning, whose checkpoints are not
published, starts over). Outputs in --out: results.md (mean ± std over seeds, change against random init,
convergence, inference cost), results.json (every run and the summary), test_ndcg10.png (test NDCG@10 by model and
start), val_ndcg10.png (validation NDCG@10 per epoch, mean over seeds: convergence).

    python reproduce.py --data data/scientific --backbone minilm --out runs/reproduce/scientific --jobs 2
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import export_embeddings
import finetune_recformer
import train_bert4rec
import train_sasrec
from common.cli import Checked, Device, NonNegative, Positive, Seed, parse, rule
from common.data import SeqDataset, load_dataset
from common.embeddings import STAGE_TABLE_FILE, table_values_sha256
from common.evaluation import check_sample_size, protocol
from common.run import INTERRUPTED, REPOSITORY, InputError, ending_in_one_line, progress, save_atomic, write_json_atomic
from recformer.convert_recformer import MINILM

TRAINERS = {"sasrec": train_sasrec, "bert4rec": train_bert4rec}
MODEL_CLASSES = {"sasrec": train_sasrec.SASRec, "bert4rec": train_bert4rec.BERT4Rec}
MODEL_NAMES = {"sasrec": "SASRec", "bert4rec": "BERT4Rec", "recformer": "Recformer (fine-tuned)"}
TABLE_METRICS = ("NDCG@10", "HR@10", "MRR")
START_ORDER = ("random", "finetune", "longformer", "pretrain")  # scheduling: the paper's question first
GRID_FILE = "grid.json"
FINETUNE_BATCH_SIZE = finetune_recformer.Args.batch_size  # sequences per forward pass of one fine-tuning process
DividesFinetuneBatch = rule(lambda n: isinstance(n, int) and n >= 1 and FINETUNE_BATCH_SIZE % n == 0,
                            f"must divide the fine-tuning's batch of {FINETUNE_BATCH_SIZE} sequences")  # fmt: skip


@dataclass
class Args(Checked):
    data: Path
    """Dataset directory with item text (written by prepare_data.py)."""
    backbone: str
    """The raw language model: a Hugging Face Longformer / BERT / RoBERTa directory or hub name, or "tiny"."""
    out: Path
    """Directory for tables, runs and results; a second call with the same --out resumes."""
    backbone_name: str | None = None
    """The backbone's name in results.md (e.g. "all-MiniLM-L6-v2"); default the last part of --backbone's path
    (the folder above when that is "model"), all-MiniLM-L6-v2 for "minilm"."""
    pretrained: str | None = None
    """A pre-trained Recformer checkpoint (pretrain_recformer.py best/ or final/, or the paper's .bin): adds the
    "pretrain" start and is what "finetune" fine-tunes; without it, "finetune" fine-tunes --backbone."""
    finetune_epochs: Annotated[int, NonNegative] = 16
    """Maximum epochs of each Recformer fine-tuning stage for the "finetune" start; 0 skips that start."""
    finetune_max_steps: Annotated[int | None, Positive] = None
    """Optimizer steps of that fine-tuning at most (finetune_recformer.py --max-steps, stage 1 only); None: no
    limit, and both stages run to their patience as in the paper (the "finetune" table is the stage-1 model's)."""
    finetune_lr: Annotated[float, NonNegative] = 5e-5
    """AdamW peak learning rate of that fine-tuning."""
    finetune_warmup_steps: Annotated[int, NonNegative] = 100
    """Its linear warm-up steps (finetune_recformer.py --warmup-steps)."""
    finetune_sample_size: int = 100
    """The protocol that fine-tuning picks its best epoch and stage on (the paper's Recformer: 100 negatives); its
    model is then tested under every --sample-sizes."""
    finetune_val_users: Annotated[int | None, Positive] = None
    """Validate the fine-tuning on this many users, a fixed subset drawn with the first seed
    (finetune_recformer.py --val-users; a deviation for CPU budgets); None: every user."""
    finetune_processes: Annotated[int, DividesFinetuneBatch] = 1
    """Processes of that fine-tuning: N > 1 launches it data-parallel (torchrun --nproc_per_node N, cores // N
    threads each) with --batch-size 16 / N per process, so that an optimizer step still averages the same 128
    sequences; it then takes N of the --jobs slots. Its results equal one process's up to float rounding only, so
    keep one value across the calls of a grid."""
    models: tuple[Literal["sasrec", "bert4rec"], ...] = ("sasrec", "bert4rec")
    """Recommenders to train."""
    transforms: tuple[Literal["none", "center", "whiten"], ...] = ("none", "center", "whiten")
    """--init-transform values each PLM start runs with ("none" = the paper's copy)."""
    seeds: Annotated[tuple[int, ...], Seed] = (42, 43)
    """One run per seed; the table reports mean and std over them. The fine-tuning runs once, with the first."""
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
    jobs: Annotated[int, Positive] = 1
    """Tasks run at once, each a process with (CPU cores // jobs) threads; 1 runs them one by one in this process."""
    report_only: bool = False
    """Train and export nothing: summarise the finished runs of the grid (results.md lists the missing ones), e.g.
    while other processes are still working through it."""
    reuse: Path | None = None
    """A directory holding finished runs of this grid made elsewhere, as --publish writes them (runs/<name>/ with
    config.json, metrics.jsonl, test_metrics.json): each cell not finished in --out is copied from it first, then
    checked like any finished run (other settings are refused). A grid goes on on a machine that lost its --out."""
    publish: Path | None = None
    """After the report, copy results.md, results.json, the plots and every finished cell's config.json,
    metrics.jsonl and test_metrics.json (no checkpoints) to this directory, e.g. results/<dataset> to commit them."""


@dataclass(frozen=True)
class Cell:
    """One recommender run of the grid."""

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


@dataclass(frozen=True)
class Task:
    """One unit of work for the scheduler: export a table ("table", start), fine-tune ("finetune"), or train a cell."""

    kind: Literal["table", "finetune", "cell"]
    start: str
    cell: Cell | None = None

    @property
    def name(self) -> str:
        return self.cell.name if self.cell else "finetune" if self.kind == "finetune" else f"table-{self.start}"

    @property
    def needs(self) -> tuple[str, ...]:
        """Names of the tasks whose results this one reads (every cell reads the raw table's width)."""
        if self.kind == "table":
            return ("finetune",) if self.start == "finetune" else ()
        if self.kind == "cell":
            own = [] if self.start == "random" else [f"table-{self.start}"]
            return tuple(dict.fromkeys(["table-longformer", *own]))
        return ()


def finished(run_dir: Path) -> bool:
    """A run directory holds its result: a readable test_metrics.json (one cut by a kill counts as missing)."""
    try:
        json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def redo_if_crashed(directory: Path) -> bool:
    """True when `directory` needs its run (then what a crashed attempt left there is removed); False if finished."""
    if finished(directory):
        return False
    if directory.exists():
        print(f"{directory}: no readable test_metrics.json, left by an interrupted run; removing it and running again")
        shutil.rmtree(directory)
    return True


def table_path(args: Args, start: str) -> Path:
    return args.out / "tables" / f"{start}.safetensors"


def table_width(path: Path) -> int:
    """The vector width of an exported table, read from the file's header."""
    with safe_open(str(path), framework="pt") as table:
        return table.get_slice(next(iter(table.keys()))).get_shape()[1]


def finetune_args(args: Args, resume: bool) -> finetune_recformer.Args:
    """The fine-tuning of the "finetune" start: both stages to their patience unless --finetune-max-steps."""
    return finetune_recformer.Args(
        data=args.data,
        backbone=args.pretrained or args.backbone,
        out=args.out / "finetune",
        epochs=args.finetune_epochs,
        max_steps=args.finetune_max_steps,
        stages=2 if args.finetune_max_steps is None else 1,
        lr=args.finetune_lr,
        warmup_steps=args.finetune_warmup_steps,
        sample_size=args.finetune_sample_size,
        test_sample_sizes=tuple(s for s in args.sample_sizes if s != args.finetune_sample_size),
        val_users=args.finetune_val_users,
        batch_size=FINETUNE_BATCH_SIZE // args.finetune_processes,
        seed=args.seeds[0],
        device=args.device,
        resume=resume,
    )


def finetune(args: Args) -> None:
    """Recformer fine-tuning on --data, resumed where a killed one stopped (a directory without config.json,
    killed before it began, is started over); in this process, or launched as --finetune-processes processes."""
    run_dir = args.out / "finetune"
    resume = (run_dir / "config.json").is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    if args.finetune_processes == 1:
        finetune_recformer.main(finetune_args(args, resume))
    else:
        launch_finetune(args, finetune_args(args, resume))


def command_line(config) -> list[str]:
    """The flags that give a stage's Args `config` on its command line: every field that differs from its
    default (tuples as one value each, booleans as --flag / --no-flag)."""
    flags = []
    for field in fields(config):
        value = getattr(config, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += [flag, *map(str, value if isinstance(value, tuple) else [value])]
    return flags


LAUNCHED: list[subprocess.Popen] = []
"""The fine-tuning launcher of this process, if any: ended with the process (see start_worker)."""


def launch_finetune(args: Args, config: finetune_recformer.Args) -> None:
    """`torchrun --nproc_per_node N finetune_recformer.py <config's flags>`, its output passed on line by line; a
    failure ends the task with its exit status, Ctrl-C or SIGTERM end the launch too (the run stays resumable)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.finetune_processes}", str(REPOSITORY / "finetune_recformer.py"),
               *command_line(config)]  # fmt: skip
    threads = threads_per_process(args.finetune_processes)
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
    LAUNCHED.append(launcher)
    try:
        for line in launcher.stdout:
            sys.stdout.write(line)
        status = launcher.wait()
    except KeyboardInterrupt:
        launcher.terminate()
        launcher.wait()
        raise
    finally:
        LAUNCHED.remove(launcher)
    if status != 0:
        raise SystemExit(f"error: the fine-tuning's processes failed (exit status {status}; its output is above)")


def export_table(args: Args, start: str) -> None:
    checkpoint = {"longformer": args.backbone, "pretrain": args.pretrained}.get(start)
    checkpoint = checkpoint or str(args.out / "finetune" / "stage1")
    export_embeddings.main(
        export_embeddings.Args(checkpoint=checkpoint, data=args.data, out=table_path(args, start), device=args.device)
    )


def model_width(args: Args) -> int:
    return args.hidden_size or table_width(table_path(args, "longformer"))


def stage_args(args: Args, cell: Cell):
    """The stage script's Args for one cell: tables wider than the model are reduced by PCA (--project pca)."""
    trainer = TRAINERS[cell.model]
    width = model_width(args)
    table = None if cell.start == "random" else table_path(args, cell.start)
    plm = {}
    if table is not None:
        project = "pca" if width < table_width(table) else "none"
        plm = dict(embeddings=table, init_transform=cell.transform, project=project)
    return trainer.Args(
        data=args.data,
        out=args.out / "runs" / cell.name,
        init_type="none" if table is None else "plm",
        hidden_size=width,
        sample_size=cell.sample_size,
        epochs=epoch_cap(args, cell.model),
        patience=args.patience,
        lr=args.sasrec_lr if cell.model == "sasrec" else args.bert4rec_lr,
        seed=cell.seed,
        device=args.device,
        **plm,
    )


def epoch_cap(args: Args, model: str) -> int:
    return args.epochs if model == "sasrec" or args.bert4rec_epochs is None else args.bert4rec_epochs


def is_done(args: Args, task: Task) -> bool:
    if task.kind == "table":
        return table_path(args, task.start).exists()  # export writes atomically: an existing file is complete
    if task.kind == "finetune":
        return finished(args.out / "finetune")
    return finished(args.out / "runs" / task.cell.name)


def perform(args: Args, task: Task) -> None:
    """Do one task in this process."""
    if task.kind == "table":
        export_table(args, task.start)
    elif task.kind == "finetune":
        finetune(args)
    elif redo_if_crashed(args.out / "runs" / task.cell.name):
        TRAINERS[task.cell.model].main(stage_args(args, task.cell))


def failure_of(args: Args, task: Task) -> str | None:
    """perform() in this process; the one-line reason when the task failed on bad input or a stage's own exit."""
    try:
        perform(args, task)
    except InputError as error:
        return f"error: {error}"
    except SystemExit as stop:
        return str(stop.code)
    return None


def perform_in_child(args: Args, task: Task, threads: int, log: Path) -> str | None:
    """failure_of() in a worker process of --jobs, its output into `log`; any other error is a failure too."""
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1, encoding="utf-8") as stream:  # line-buffered: the log can be followed
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                return failure_of(args, task)
            except Exception as error:  # noqa: BLE001 - reported as the task's failure, the grid goes on
                traceback.print_exc()
                return f"{type(error).__name__}: {error}"


def cells(args: Args, starts: list[str]) -> list[Cell]:
    """Every recommender run in the tables' order: random once per model, protocol and seed; each PLM start under
    every transform."""
    grid = []
    for model in args.models:
        for sample_size in args.sample_sizes:
            for start in starts:
                for transform in ("none",) if start == "random" else args.transforms:
                    grid.extend(Cell(model, start, transform, sample_size, seed) for seed in args.seeds)
    return grid


def schedule_order(args: Args, cell: Cell) -> tuple:
    """What finishes first answers most: per seed, random and finetune before the other starts, full ranking
    before sampled, both models, then the transforms in flag order."""
    return (
        args.seeds.index(cell.seed),
        START_ORDER.index(cell.start) >= 2,
        cell.sample_size > 0,
        START_ORDER.index(cell.start),
        args.transforms.index(cell.transform) if cell.start != "random" else -1,
        args.models.index(cell.model),
    )


def tasks_of(args: Args, starts: list[str]) -> list[Task]:
    """Fine-tuning first (the longest), the tables, then the cells in schedule order."""
    tasks = [Task("finetune", "finetune")] if "finetune" in starts else []
    tasks += [Task("table", start) for start in starts if start != "random"]
    ordered = sorted(cells(args, starts), key=lambda cell: schedule_order(args, cell))
    return tasks + [Task("cell", cell.start, cell) for cell in ordered]


class GridLog:
    """Timestamped lines about the grid's tasks, on the terminal and appended to <out>/grid.log."""

    def __init__(self, out: Path, total: int):
        self.file = out / "grid.log"
        self.total = total
        self.bar = progress(range(total), desc="grid tasks", unit="task")

    def line(self, text: str) -> None:
        stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        self.bar.write(stamped)
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(stamped + "\n")

    def advance(self, running: int, left: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix(running=running, left=left)

    def close(self) -> None:
        self.bar.close()


def start_worker(grid_pid: int) -> None:
    """Initializer of a --jobs worker: Ctrl-C is the grid process's to handle (it ends the workers), and a worker
    whose grid process is gone (killed, even with SIGKILL) exits instead of going on alone. tqdm's bars take a
    thread lock here, not their default interprocess one, which a worker ended by SIGTERM could not release (the
    resource tracker would then warn of a leaked semaphore)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())

    def end(*_) -> None:
        for launcher in LAUNCHED:  # a launched fine-tuning (torchrun) ends its own processes on SIGTERM
            launcher.terminate()
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGTERM, end)

    def exit_when_orphaned() -> None:
        while os.getppid() == grid_pid:
            time.sleep(1)
        end()

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


@contextlib.contextmanager
def ending_workers_on_interrupt():
    """On Ctrl-C or SIGTERM end the workers too (SIGTERM: a cell dies at once, its directory is redone on the next
    call; a fine-tuning goes on from its last finished epoch), before the pool would wait for their tasks."""
    try:
        yield
    except KeyboardInterrupt:
        for worker in active_children():
            worker.terminate()
        raise


def slots(args: Args, task: Task) -> int:
    """How many of the --jobs slots a task takes: a fine-tuning its processes (at most all of them), others one."""
    return min(args.finetune_processes, args.jobs) if task.kind == "finetune" else 1


def threads_per_process(processes: int) -> int:
    """Threads each of `processes` processes may use without oversubscribing the cores."""
    return max(1, (os.cpu_count() or 1) // processes)


def threads_per_job(args: Args) -> int:
    return threads_per_process(args.jobs)


@contextlib.contextmanager
def worker_environment(threads: int):
    """Environment the --jobs workers start with (spawned processes copy it): `threads` OpenMP threads, so N
    workers do not oversubscribe the cores, and no progress bars (they would interleave; the grid has its own)."""
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "RECSYS_QUIET")}
    os.environ.update(OMP_NUM_THREADS=str(threads), RECSYS_QUIET="1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_tasks(args: Args, tasks: list[Task]) -> dict[str, str]:
    """Every task not yet done, at most --jobs at a time, each once the tasks it needs are done; returns
    {task name: why it failed} (a failed task's dependants are not started)."""
    pending = [task for task in tasks if not is_done(args, task)]
    threads = threads_per_job(args)
    log = GridLog(args.out, len(tasks))
    log.bar.update(len(tasks) - len(pending))
    log.line(f"{len(tasks) - len(pending)} of {len(tasks)} tasks done; {len(pending)} to run, {args.jobs} at a time"
             + (f" with {threads} thread(s) each" if args.jobs > 1 else ""))  # fmt: skip
    number = {task.name: i for i, task in enumerate(tasks, start=1)}
    done = {task.name for task in tasks if task not in pending}
    failed: dict[str, str] = {}
    running: dict = {}  # future -> (task, start time)
    durations: list[float] = []  # seconds of each task finished in this call

    def ready(task: Task) -> bool:
        return all(need in done or need not in number for need in task.needs)

    def blocked(task: Task) -> bool:
        return any(need in failed for need in task.needs)

    def finish(task: Task, began: float, error: str | None) -> None:
        if error is None:
            done.add(task.name)
        else:
            failed[task.name] = error
        verb = "done" if error is None else f"FAILED ({error}; see {args.out / 'logs' / task.name}.log)"
        durations.append(time.time() - began)
        left = len(pending) + len(running)
        eta = time.strftime("%H:%M", time.localtime(time.time() + np.mean(durations) * left / args.jobs))
        log.line(f"{verb} {number[task.name]}/{len(tasks)} {task.name} in {durations[-1]:.0f} s; {len(running)} "
                 f"running, {len(pending)} waiting, ETA {eta} at the mean task time so far")  # fmt: skip
        log.advance(len(running), len(pending))

    if args.jobs == 1:
        for task in list(pending):
            pending.remove(task)
            if blocked(task):
                failed[task.name] = "a task it needs failed"
                continue
            log.line(f"start {number[task.name]}/{len(tasks)} {task.name}")
            began = time.time()
            finish(task, began, failure_of(args, task))
        log.close()
        return failed

    pool = ProcessPoolExecutor(
        args.jobs, mp_context=get_context("spawn"), initializer=start_worker, initargs=(os.getpid(),)
    )
    with worker_environment(threads), pool, ending_workers_on_interrupt():
        while pending or running:
            for task in [t for t in pending if blocked(t)]:
                pending.remove(task)
                failed[task.name] = "a task it needs failed"
            free = args.jobs - sum(slots(args, task) for task, _ in running.values())
            for task in [t for t in pending if ready(t)]:
                if slots(args, task) > free:
                    break  # tasks start in schedule order: the next one waits for its slots
                free -= slots(args, task)
                pending.remove(task)
                log.line(f"start {number[task.name]}/{len(tasks)} {task.name}")
                log_file = args.out / "logs" / f"{task.name}.log"
                running[pool.submit(perform_in_child, args, task, threads, log_file)] = (task, time.time())
            if not running:
                break  # what is left waits on tasks that failed
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished_now:
                task, began = running.pop(future)
                finish(task, began, future.result())
    log.close()
    return failed


# Flags that change where a run writes or what it logs, not what it computes: a finished run is reused whatever they
# were (runs finished before a logging flag existed have none recorded).
NOT_SETTINGS = {"out", "tensorboard", "log_every"}


def grid_relative(config: dict) -> dict:
    """A cell's settings with its item table named relative to its grid (<grid>/runs/<cell> is its --out): a grid
    reused elsewhere (--reuse) has its tables in its own <grid>/tables/."""
    grid = Path(config["out"]).parent.parent
    table = config.get("embeddings")
    if table is not None and Path(table).is_relative_to(grid):
        return {**config, "embeddings": str(Path(table).relative_to(grid))}
    return config


def check_settings(run_dir: Path, settings) -> None:
    """A finished run is reused only if its config.json holds the settings this call would give it."""
    recorded = grid_relative(json.loads((run_dir / "config.json").read_text()))
    wanted = grid_relative(json.loads(json.dumps(asdict(settings), default=str)))  # paths as strings, as stored
    differing = sorted(key for key in wanted if key not in NOT_SETTINGS and recorded.get(key) != wanted[key])
    if differing:
        raise InputError(
            f"{run_dir}: finished with other settings ({', '.join(differing)}); use another --out or remove it"
        )


def finished_cells(args: Args, starts: list[str]) -> list[Cell]:
    """The grid's finished cells, each checked to hold the settings this call would give it."""
    done = [cell for cell in cells(args, starts) if finished(args.out / "runs" / cell.name)]
    for cell in done:
        check_settings(args.out / "runs" / cell.name, stage_args(args, cell))
    return done


RUN_RECORD_FILES = ("config.json", "metrics.jsonl", "test_metrics.json")
"""A finished cell's record: what the report reads from it, and what --publish and --reuse carry."""
TABLES_FILE = "tables.json"
"""The digests of the grid's item tables (see table_digests), beside the report."""
PUBLISHED_FILES = ("results.md", "results.json", TABLES_FILE, "test_ndcg10.png", "val_ndcg10.png")


def reuse_finished_cells(args: Args, starts: list[str]) -> None:
    """Copy each cell finished in --reuse but not in --out into --out: its record files, as one directory written
    atomically (save_atomic), so a kill leaves no half-copied run."""
    reused = 0
    for cell in cells(args, starts):
        source, target = args.reuse / "runs" / cell.name, args.out / "runs" / cell.name
        if finished(target) or not finished(source):
            continue
        redo_if_crashed(target)
        save_atomic(target, lambda tmp, source=source: copy_record_files(source, tmp))
        reused += 1
    print(f"reused {reused} finished run(s) from {args.reuse}")


def copy_record_files(source: Path, directory: Path) -> None:
    directory.mkdir()
    for name in RUN_RECORD_FILES:
        shutil.copyfile(source / name, directory / name)


def publish(args: Args, done: list[Cell]) -> None:
    """The report and every finished cell's record files into --publish (each file written atomically)."""
    copies = [(args.out / name, args.publish / name) for name in PUBLISHED_FILES if (args.out / name).exists()]
    copies += [(args.out / "runs" / cell.name / name, args.publish / "runs" / cell.name / name)
               for cell in done for name in RUN_RECORD_FILES]  # fmt: skip
    for source, target in copies:
        save_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    print(f"published the report and {len(done)} finished run(s) to {args.publish}")


def table_digests(path: Path) -> dict:
    """sha256 of a table file's bytes and of its values alone (both recorded in a run's config.json): two exports of
    the same vectors differ in bytes (safetensors writes its metadata in no fixed order) but not in values."""
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "values_sha256": table_values_sha256(path)}


def table_mismatches(args: Args, records: list[dict], tables: dict[str, dict]) -> int:
    """PLM runs that started from other vectors than <out>/tables/ holds now (runs reused from a grid whose export
    gave other values, e.g. another machine's arithmetic). A run's config.json records its table's values digest;
    for runs made before it did, the --reuse directory's tables.json says which values their files held."""
    reused = args.reuse / TABLES_FILE if args.reuse is not None else None
    known = [*tables.values(), *(json.loads(reused.read_text()).values() if reused and reused.exists() else [])]
    values_of = {digests["sha256"]: digests["values_sha256"] for digests in known}

    def values(record: dict) -> str | None:
        return record["item_table_values_sha256"] or values_of.get(record["item_table_sha256"])

    return sum(values(record) != tables.get(record["start"], {}).get("values_sha256")
               for record in records if record["start"] not in ("random", "recformer"))  # fmt: skip


def parameter_count(args: Args, model_name: str, num_items: int) -> int:
    """Parameters `model_name` uses to score a user (all of them, the item table included): the same for every
    start and transform, since the tables only initialise the model."""
    cell = Cell(model_name, "random", "none", args.sample_sizes[0], args.seeds[0])
    model = MODEL_CLASSES[model_name](num_items, stage_args(args, cell))
    return sum(parameter.numel() for parameter in model.parameters())


def read_run(args: Args, cell: Cell, parameters: int) -> dict:
    """One finished run's record: its cell, test metrics, validation curve, training seconds, convergence and cost."""
    run_dir = args.out / "runs" / cell.name
    test = json.loads((run_dir / "test_metrics.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    table = json.loads((run_dir / "config.json").read_text()).get("provenance", {}).get("item_table") or {}
    cap = epoch_cap(args, cell.model)
    return {
        **asdict(cell),
        "protocol": cell.protocol,
        "run_dir": str(run_dir),
        "item_table_sha256": table.get("sha256"),
        "item_table_values_sha256": table.get("values_sha256"),
        "test": test,
        "val_ndcg10": [epoch["NDCG@10"] for epoch in epochs],
        "train_seconds": sum(epoch["train_seconds"] for epoch in epochs),
        "epoch_cap": cap,
        "converged": test["best_epoch"] <= cap - args.patience,
        "parameters": parameters,
        "users_per_s": test["users"] / test["test_seconds"] if test.get("test_seconds") else None,
    }


def recformer_records(args: Args, num_items: int) -> list[dict]:
    """The fine-tuned Recformer's own test metrics, one record per protocol of --sample-sizes it was tested under."""
    run_dir = args.out / "finetune"
    if not finished(run_dir):
        return []
    test = json.loads((run_dir / "test_metrics.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [line["NDCG@10"] for line in lines if line["stage"] == test["stage"]]
    patience = json.loads((run_dir / "config.json").read_text())["patience"]
    converged = len(curve) - (int(np.argmax(curve)) + 1) >= patience  # the stage stopped on its patience
    stage = run_dir / f"stage{test['stage']}" / "model.safetensors"
    with safe_open(str(stage), framework="pt") as weights:
        encoder = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())
    width = table_width(run_dir / f"stage{test['stage']}" / STAGE_TABLE_FILE)
    records = []
    for sample_size in args.sample_sizes:
        metrics = test.get("by_protocol", {}).get(protocol(sample_size))
        if metrics is None:
            continue
        cell = Cell("recformer", "recformer", "none", sample_size, args.seeds[0])
        records.append({
            **asdict(cell), "protocol": cell.protocol, "run_dir": str(run_dir), "test": metrics, "val_ndcg10": [],
            "train_seconds": sum(line.get("train_seconds", 0.0) for line in lines), "converged": converged,
            "parameters": encoder + (num_items + 1) * width,
            "users_per_s": metrics["users"] / metrics["test_seconds"],
        })  # fmt: skip
    return records


def summarise(records: list[dict]) -> list[dict]:
    """One entry per (model, start, transform, protocol): mean and std over seeds of the test metrics (std None for
    one seed), the change of mean test NDCG@10 against the same model and protocol from random init, the mean
    validation curve and where each seed's curve ends, convergence and inference cost."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["model"], record["start"], record["transform"], record["protocol"])
        groups.setdefault(key, []).append(record)
    summary = []
    for (model, start, transform, protocol_name), members in groups.items():
        metrics = {}
        for metric in TABLE_METRICS:
            values = np.array([m["test"][metric] for m in members])
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            metrics[metric] = {"mean": float(values.mean()), "std": std}
        speeds = [m["users_per_s"] for m in members if m["users_per_s"]]
        summary.append(
            {
                "model": model,
                "start": start,
                "transform": transform,
                "protocol": protocol_name,
                "seeds": [m["seed"] for m in members],
                "test": metrics,
                "best_epochs": [m["test"].get("best_epoch") for m in members],
                "not_converged": sum(not m["converged"] for m in members),
                "val_ndcg10_mean": mean_curve([m["val_ndcg10"] for m in members]),
                "val_epochs": [len(m["val_ndcg10"]) for m in members],
                "parameters": members[0]["parameters"],
                "users_per_s": float(np.mean(speeds)) if speeds else None,
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


def backbone_name(args: Args) -> str:
    if args.backbone_name:
        return args.backbone_name
    if args.backbone == MINILM:
        return "all-MiniLM-L6-v2"
    path = Path(args.backbone)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def start_label(entry: dict, backbone: str) -> str:
    """The item table a row starts from, named after what it is (the paper's start names in the footnote)."""
    labels = {
        "random": "random",
        "longformer": f"{backbone}, raw",
        "pretrain": "Recformer, pre-trained",
        "finetune": f"{backbone}, Recformer fine-tuned",
        "recformer": "(the model itself)",
    }
    label = labels[entry["start"]]
    return label if entry["start"] in ("random", "recformer") else f"{label} ({entry['transform']})"


def metric_cell(value: dict) -> str:
    return f"{value['mean']:.4f}" if value["std"] is None else f"{value['mean']:.4f} ± {value['std']:.4f}"


def cost_cells(entry: dict) -> list[str]:
    speed = entry["users_per_s"]
    return [f"{entry['parameters'] / 1e6:.2f} M", "" if speed is None else f"{speed:,.0f}"]


def results_markdown(summary: list[dict], records: list[dict], args: Args, missing: list[str],
                     mismatched_tables: int) -> str:  # fmt: skip
    """The paper-style table, one section per protocol; convergence and cost per row; then the missing runs."""
    hours = sum(record["train_seconds"] for record in records) / 3600
    backbone = backbone_name(args)
    not_converged = sum(not record["converged"] for record in records)
    lines = [
        f"# Results on {args.data.name}",
        "",
        f"Backbone {backbone} ({args.backbone}); width {model_width(args)}; seeds {' '.join(map(str, args.seeds))}; "
        f"at most {args.epochs} epochs (BERT4Rec {epoch_cap(args, 'bert4rec')}), patience {args.patience}; "
        f"lr SASRec {args.sasrec_lr:g}, BERT4Rec {args.bert4rec_lr:g}; {len(records)} runs, {hours:.2f} h of "
        "training epochs in all (validation and test not counted). "
        f"**{not_converged} of {len(records)} runs not converged** (best epoch within --patience {args.patience} of "
        "the epoch cap, marked * in \"best epochs\"). Test metrics: mean ± std over the seeds (n = number of seeds; "
        "a single seed has no ± ); the change is that of mean test NDCG@10 against random init. Cost: parameters "
        f"used to score a user, and users/s of test scoring on this machine ({threads_per_job(args)} CPU thread(s) "
        "per run unless on CUDA).",
    ]
    if mismatched_tables:
        lines[-1] += (f" **{mismatched_tables} PLM runs started from other item vectors than tables/ holds now** "
                      "(reused from a grid whose export gave other values).")  # fmt: skip
    for protocol_name in dict.fromkeys(entry["protocol"] for entry in summary):
        lines += ["", f"## {protocol_name}", ""]
        columns = ["model", "item table (transform)", *TABLE_METRICS, "n", "vs random", "best epochs", "params",
                   "users/s"]  # fmt: skip
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for entry in (e for e in summary if e["protocol"] == protocol_name):
            change = entry["ndcg10_vs_random"]
            change = "" if entry["start"] in ("random", "recformer") or change is None else f"{change:+.1%}"
            members = [r for r in records if (r["model"], r["start"], r["transform"], r["protocol"]) == (
                entry["model"], entry["start"], entry["transform"], protocol_name)]  # fmt: skip
            epochs = " ".join(f"{r['test']['best_epoch']}{'' if r['converged'] else '*'}"
                              for r in members if "best_epoch" in r["test"])  # fmt: skip
            row = [MODEL_NAMES[entry["model"]], start_label(entry, backbone),
                   *(metric_cell(entry["test"][m]) for m in TABLE_METRICS), str(len(entry["seeds"])), change, epochs,
                   *cost_cells(entry)]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Item tables: \"{backbone}, raw\" is the paper's \"longformer\" start (the raw language model's "
              "item vectors; the paper's backbone is Longformer); \"Recformer fine-tuned\" is its \"finetune\" "
              "start; \"Recformer (fine-tuned)\" rows are the fine-tuned Recformer's own test metrics (one run, the "
              "first seed)."]  # fmt: skip
    if missing:
        lines += ["", f"Not finished, so not in the table ({len(missing)} runs): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot_results(summary: list[dict], args: Args) -> None:
    """test_ndcg10.png (bars, std error bars for several seeds) and val_ndcg10.png (mean validation curves, a cross
    where a seed's run stopped): one panel per model (rows) and protocol (columns)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    backbone = backbone_name(args)
    models = [m for m in dict.fromkeys(entry["model"] for entry in summary) if m != "recformer"]
    protocols = list(dict.fromkeys(entry["protocol"] for entry in summary))
    for filename, draw in (("test_ndcg10.png", _bars), ("val_ndcg10.png", _curves)):
        figure, axes = plt.subplots(
            len(models), len(protocols), figsize=(6 * len(protocols), 4.5 * len(models)), squeeze=False
        )
        for row, model in enumerate(models):
            for column, protocol_name in enumerate(protocols):
                entries = [e for e in summary if e["model"] == model and e["protocol"] == protocol_name]
                if draw is _bars:
                    entries += [e for e in summary if e["model"] == "recformer" and e["protocol"] == protocol_name]
                if entries:
                    draw(axes[row, column], entries, backbone)
                else:
                    axes[row, column].text(0.5, 0.5, "no finished run yet", ha="center", va="center")
                axes[row, column].set_title(f"{args.data.name}: {MODEL_NAMES[model]}, {protocol_name}")
        figure.tight_layout()
        save_atomic(args.out / filename, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
        plt.close(figure)


def _bars(axis, entries: list[dict], backbone: str) -> None:
    labels = [start_label(e, backbone) if e["model"] != "recformer" else "Recformer itself" for e in entries]
    means = [e["test"]["NDCG@10"]["mean"] for e in entries]
    stds = [e["test"]["NDCG@10"]["std"] or 0.0 for e in entries]
    several = [e["test"]["NDCG@10"]["std"] is not None for e in entries]
    axis.bar(range(len(entries)), means, color=[f"C{i}" for i in range(len(entries))])
    shown = [i for i in range(len(entries)) if several[i]]
    axis.errorbar(shown, [means[i] for i in shown], yerr=[stds[i] for i in shown], fmt="none", ecolor="k", capsize=3)
    axis.set_xticks(range(len(entries)), labels, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel("test NDCG@10 (mean ± std over seeds where n > 1)")


def _curves(axis, entries: list[dict], backbone: str) -> None:
    for i, entry in enumerate(entries):
        curve = entry["val_ndcg10_mean"]
        axis.plot(range(1, len(curve) + 1), curve, color=f"C{i}", label=start_label(entry, backbone))
        ends = [epochs for epochs in entry["val_epochs"] if epochs]
        axis.plot(ends, [curve[epochs - 1] for epochs in ends], "x", color=f"C{i}", markersize=7)
    axis.set_xlabel("epoch (×: a seed's run stopped; later points average the seeds left)")
    axis.set_ylabel("validation NDCG@10 (mean over seeds)")
    axis.legend(fontsize=7)


def check_flags(args: Args) -> SeqDataset:
    """Every flag checked before anything is trained or exported: an InputError (one line) for the first problem.
    Returns the dataset it loaded to check them."""
    if not args.seeds or not args.models or not args.transforms or not args.sample_sizes:
        raise InputError("--seeds, --models, --transforms and --sample-sizes each need at least one value")
    if args.pretrained and not Path(args.pretrained).exists():
        raise InputError(f"--pretrained: {args.pretrained} not found")
    if args.reuse is not None and not (args.reuse / "runs").is_dir():
        raise InputError(f"--reuse: {args.reuse} holds no runs/ directory (reproduce.py --publish writes one)")
    for flag, path in (("--reuse", args.reuse), ("--publish", args.publish)):
        if path is not None and path.resolve() == args.out.resolve():
            raise InputError(f"{flag}: {path} is --out itself; name another directory")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out: {args.out} is a file, not a grid directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / GRID_FILE).exists():
        if not (args.out / "results.json").exists():  # grids written before grid.json existed have results.json
            raise InputError(
                f"--out: {args.out} is not empty and holds no grid of reproduce.py ({GRID_FILE}); "
                "choose an empty or new directory"
            )
    data = load_dataset(args.data)
    for sample_size in {*args.sample_sizes, args.finetune_sample_size if args.finetune_epochs else 0}:
        check_sample_size(data, sample_size)
    return data


def main(args: Args) -> dict:
    num_items = check_flags(args).num_items
    began = time.time()
    starts = ["random", "longformer", *(["pretrain"] if args.pretrained else []),
              *(["finetune"] if args.finetune_epochs > 0 else [])]  # fmt: skip
    tasks = tasks_of(args, starts)
    if args.reuse is not None:
        reuse_finished_cells(args, starts)
    if table_path(args, "longformer").exists():
        finished_cells(args, starts)  # refuses finished runs made with other settings before anything runs
    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / GRID_FILE, {"args": args})
        failed = run_tasks(args, tasks)
    elif not table_path(args, "longformer").exists():
        raise InputError(f"--report-only: {args.out} holds no tables/longformer.safetensors yet")
    done = finished_cells(args, starts)
    parameters = {model: parameter_count(args, model, num_items) for model in {cell.model for cell in done}}
    records = [read_run(args, cell, parameters[cell.model]) for cell in done]
    missing = [cell.name for cell in cells(args, starts) if cell not in done]
    records += recformer_records(args, num_items) if "finetune" in starts else []
    if "finetune" in starts and not finished(args.out / "finetune"):
        missing.append("finetune (Recformer's own rows)")
    summary = summarise(records) if records else []
    write_json_atomic(
        args.out / "results.json",
        {"args": args, "width": model_width(args), "runs": records, "missing": missing, "summary": summary},
    )
    tables = {start: table_digests(table_path(args, start)) for start in starts if table_path(args, start).exists()}
    write_json_atomic(args.out / TABLES_FILE, tables)
    markdown = results_markdown(summary, records, args, missing, table_mismatches(args, records, tables))
    save_atomic(args.out / "results.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    if summary:
        plot_results(summary, args)
    print(markdown)
    print(f"wrote {args.out}/results.md, results.json, test_ndcg10.png, val_ndcg10.png in {time.time() - began:.0f} s")
    if args.publish is not None:
        publish(args, done)
    if not args.report_only and failed:
        raise SystemExit(f"error: {len(failed)} task(s) failed: {', '.join(failed)} (logs in {args.out / 'logs'})")
    return {"runs": records, "summary": summary}


if __name__ == "__main__":
    arguments = parse(Args)
    stopped = (f"the grid in {arguments.out} stopped; its finished tasks are kept, and the same command goes on "
               "from them")  # fmt: skip
    with ending_in_one_line(interrupted=stopped):
        main(arguments)
