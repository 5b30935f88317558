"""Small helpers every training stage shares: seeding, device choice, the run directory, atomic writes, early
stopping, TensorBoard scalars.

Helpers, not a trainer: each stage script keeps its own loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import dangling_link_problem

T = TypeVar("T")
INTERRUPTED = 130  # the shell's exit status for a process ended by Ctrl-C (128 + SIGINT)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available, else the CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a --dtype flag asks for, or None for plain float32.

    "auto" is bfloat16 on a CUDA device that supports it, else float32; other names are torch dtypes.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return None if name == "float32" else getattr(torch, name)


def autocast(device: torch.device, dtype: str):
    """Mixed-precision context for a --dtype name (see `precision`); float32 means no autocast."""
    resolved = precision(dtype, device)
    return torch.autocast(device.type, dtype=resolved, enabled=resolved is not None)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class InputError(ValueError):
    """Input a run cannot use: a dataset, table or checkpoint file, a flag that does not fit them, an output path.
    The message names the file or flag and the problem in one line; ending_in_one_line prints it as the run's one
    line (`error: ...`, exit status 1). Every module's error type for bad input derives from it."""


class OutputError(InputError):
    """An output path cannot be used (it holds something else, or lies under a file); one line naming the path."""


class WriteError(OutputError):
    """The file system refused a write (disk full, read-only, no permission); one line naming the path."""


# errno values that mean "this file system will not take the write", as opposed to a bug or a network failure
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})


def _write_refusal(error: BaseException, directory: Path) -> str | None:
    """The OS reason a write into `directory` failed, or None when `error` is not a refused write.

    An OSError says it itself (also when torch wrapped it, as its __context__); torch.save to a path raises a
    RuntimeError without the errno, so then the file system is asked: no space left, or mounted read-only."""
    for cause in (error, error.__context__, error.__cause__):
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
            return os.strerror(cause.errno)
    if not isinstance(error, RuntimeError):
        return None
    try:
        status = os.statvfs(directory)
    except OSError:
        return None
    if status.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    return os.strerror(errno.ENOSPC) if status.f_bavail == 0 else None


def _tmp_prefix(path: Path) -> str:
    """Prefix of the temporary names of writes to `path`; host and pid tell whose write a leftover was."""
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _new_tmp(path: Path) -> Path:
    """A fresh name beside `path` for write(tmp) to create (so files and directories get umask-respecting modes,
    unlike mkstemp's 0600 and mkdtemp's 0700)."""
    return path.with_name(f"{_tmp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def recover(path: Path) -> None:
    """Finish or undo a directory swap into `path` that a killed process left half done, and remove leftovers.

    A swap renames a complete new version to `.<name>.new`, the current one to `.<name>.old`, then the new one in.
    So when `path` is missing, `.new` (complete) or else `.old` is put back; leftovers beside an existing `path`, and
    `.tmp-` writes of dead processes on this host, are deleted.
    """
    path = Path(path)
    new, old = _swap_names(path)
    if not path.exists():
        for complete in (new, old, *_legacy_old_copies(path)):
            if complete.is_dir():
                complete.rename(path)
                break
    for leftover in (new, old):
        _remove(leftover)
    prefix = _tmp_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix) :].partition("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove(tmp)


def _legacy_old_copies(path: Path) -> list[Path]:
    """Where the earlier two-rename swaps left the old directory when killed between their renames, newest first."""
    escaped = glob.escape(path.name)
    copies = [*path.parent.glob(f".{escaped}.tmp-*.old"), *path.parent.glob(f".{escaped}.old-*/{escaped}")]
    return sorted(copies, key=lambda copy: copy.stat().st_mtime, reverse=True)


def _swap_names(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.new"), path.with_name(f".{path.name}.old")


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with a temporary path beside `path` (write creates a file or a directory there), then move
    it onto `path`, so readers never see a half-written file or directory under `path`.

    Files are replaced by one rename. An existing directory is swapped in three renames (new one beside as
    `.<name>.new`, old one away as `.<name>.old`, new one in); an error undoes the swap, and after a kill the next
    call (or `recover`) completes it. One writer per `path` at a time.
    """
    path = Path(path)
    tmp = _new_tmp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        write(tmp)
        _give_default_modes(tmp)
        if path.is_dir() and tmp.is_dir():
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        reason = _write_refusal(error, _nearest_existing(path.parent))
        if reason is None:
            raise
        raise WriteError(f"{path}: cannot write it ({reason})") from None
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _give_default_modes(path: Path) -> None:
    """chmod `path` and everything under it to what the umask allows (0644 / 0755 under umask 022): some writers
    create private files (safetensors writes 0600), but datasets, tables and checkpoints are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _swap_in(tmp: Path, path: Path) -> None:
    new, old = _swap_names(path)
    tmp.rename(new)  # from here on a complete new version exists under a name `recover` knows
    try:
        path.rename(old)
    except BaseException:
        _remove(new)
        raise
    try:
        new.rename(path)
    except BaseException:
        old.rename(path)
        _remove(new)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_torch_file(path: Path):
    """torch.load(path) on the CPU with weights_only=True (no code can run from the file), without the warning
    torch prints for a plain pickle of another protocol, which would precede our one-line error about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def write_json_atomic(path: Path, obj) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")

    save_atomic(path, write)


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"{path}: cannot write it ({os.strerror(error.errno)})") from None


def file_on_the_way(path: Path) -> Path | None:
    """`path` itself or its nearest existing ancestor when that is not a directory (nothing can be created there)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def refuse_file_on_the_way(out: Path, kind: str, error: type[Exception]) -> None:
    """Raise `error` when directory `out` is a file or lies under one (`kind` names what it should be)."""
    if (dangling := dangling_link_problem(out)) is not None:
        raise error(f"{out}: {dangling}")
    blocker = file_on_the_way(out)
    if blocker == out:
        raise error(f"{out}: is a file, not a {kind}")
    if blocker is not None:
        raise error(f"{out}: cannot be a {kind}, {blocker} is a file")


def input_paths(config) -> list[Path]:
    """The existing paths named by the fields of a configuration dataclass other than `out` (Path values, and
    strings such as a backbone directory), flattening tuples of paths."""
    if not dataclasses.is_dataclass(config):
        return []
    values = [getattr(config, field.name) for field in dataclasses.fields(config) if field.name != "out"]
    flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
    paths = [Path(v) for v in flat if isinstance(v, (Path, str)) and str(v)]
    return [path for path in paths if path.exists()]


def protected_path_inside(out: Path, config) -> Path | None:
    """The current directory or an input `config` names when it lies in `out` (or is `out`): what replacing or
    emptying `out` would delete, though no one asked for that; else None."""
    out = Path(out).resolve()
    return next((p for p in [Path.cwd(), *input_paths(config)] if p.resolve().is_relative_to(out)), None)


def check_run_dir(out: Path | None, overwrite: bool, config=None) -> None:
    """Refuse, before any work, a run directory that is a file, lies under a file, or is not empty (unless
    `overwrite`, and then not if it holds the current directory or an input named in `config`): a new run must
    never mix its files with an earlier run's."""
    if out is None:
        return
    out = Path(out)
    refuse_file_on_the_way(out, "run directory", OutputError)
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise OutputError(f"{out}: holds files of an earlier run; choose another --out or pass --overwrite to empty it")
    protected = protected_path_inside(out, config)
    if protected is not None:
        raise OutputError(f"{out}: not emptied, it holds {protected}, which this run reads or runs in")


REPOSITORY = Path(__file__).resolve().parents[1]
PROVENANCE_PACKAGES = ("torch", "transformers", "numpy", "deepspeed", "tyro")


def _git(*arguments: str) -> str | None:
    """Output of a git command in the repository, or None outside a git checkout (or without git)."""
    command = ["git", "-C", str(REPOSITORY), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance(item_table: dict | None = None) -> dict:
    """What made a run besides its flags: the code's git commit, whether tracked files differed from it, the versions
    of the packages that compute, and the PLM item table it started from (common.embeddings.announce_item_table)."""
    changes = _git("status", "--porcelain", "--untracked-files=no")
    record = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if changes is None else bool(changes),
        "packages": {name: _package_version(name) for name in PROVENANCE_PACKAGES},
    }
    if item_table is not None:
        record["item_table"] = item_table
    return record


def create_run_dir(
    out: Path | None,
    stage: str,
    data: Path,
    tag: str,
    config,
    overwrite: bool = False,
    resume: bool = False,
    item_table: dict | None = None,
) -> Path:
    """The run directory (`out`, or runs/<stage>/<dataset>-<tag>-<timestamp>/) with config.json written in it:
    the fields of `config`, plus key "provenance" (see `provenance`; `item_table` for PLM-initialised runs).

    A non-empty `out` is refused (OutputError) unless `overwrite`, which empties it first, or `resume`, which
    continues the run in it.
    """
    if out is None:
        out = Path("runs") / stage / f"{Path(data).name}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if resume:
        out.mkdir(parents=True, exist_ok=True)
        _claimed.run_dir, _claimed.created, _claimed.resumed = out, False, True
    else:
        check_run_dir(out, overwrite, config)
        if overwrite and out.is_dir():  # without it the check found none: emptying could delete a rival's claim
            for entry in list(out.iterdir()):
                _remove(entry)
        _claim(out)
    write_json_atomic(out / "config.json", {**_jsonable(config), "provenance": provenance(item_table)})
    return out


def check_same_run(out: Path, config, may_change: set[str]) -> None:
    """--resume continues the run recorded in <out>/config.json: OutputError when `config` differs from it in a
    field outside `may_change` (flags that bound, log or save a run without changing what each step computes)."""
    saved_file = Path(out) / "config.json"
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputError(f"{saved_file}: cannot read the run's configuration ({type(error).__name__})") from None
    current = _jsonable(config)
    differing = sorted(name for name in current if name not in may_change and saved.get(name) != current[name])
    if differing:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in differing)
        raise OutputError(
            f"{saved_file}: --resume with other settings than the run's ({flags}); resume as it was started"
        )


@dataclasses.dataclass
class _Claim:
    """The run directory this process claimed (a process runs one stage), for ending_in_one_line."""

    run_dir: Path | None = None
    created: bool = False  # made by this run, not given existing (and empty) by the user
    resumed: bool = False  # an earlier run's directory, continued with --resume: never cleared


_claimed = _Claim()


def _claim(out: Path) -> None:
    """Make the empty run directory `out` this run's, atomically: two runs started at once on one --out both pass
    check_run_dir, and only one may win. The claim is creating its config.json with O_EXCL (fails when it exists),
    in the directory made here unless it existed; the loser gets a one-line OutputError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        created = True
        try:
            os.mkdir(out)
        except FileExistsError:
            created = False
        os.close(os.open(out / "config.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise OutputError(f"{out}: another run started in it at the same time; choose another --out") from None
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"{out}: cannot create the run directory ({os.strerror(error.errno)})") from None
    _claimed.run_dir, _claimed.created, _claimed.resumed = out, created, False


@contextlib.contextmanager
def ending_in_one_line(*checkpoints: str, resumable: bool = False, interrupted: str | None = None) -> Iterator[None]:
    """Around a stage's main(): bad input (an InputError: exit status 1), Ctrl-C or SIGTERM (exit status 130) or a
    refused write (a full disk) ends it with one line saying what was kept where. A run directory holds a checkpoint
    (one of `checkpoints`, names inside it) or nothing: with none written yet, the directory the run claimed is
    removed (emptied, if the user gave it existing); otherwise it is kept, unfinished (`resumable`: the line says
    how to go on with --resume). A directory continued with --resume is never cleared. Of many processes, the one
    that claimed the directory (rank 0) is the one that reports and clears it.

    `interrupted`: the line's text for Ctrl-C instead, for a tool that runs stages in its own process (reproduce.py):
    the run directories those claimed are the tool's to redo, so none is reported or cleared."""
    _claimed.run_dir = None
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    if in_main_thread:
        # SIGTERM handled as Ctrl-C: the deepspeed launcher, and `kill`, end a run with SIGTERM
        previous = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        if in_main_thread:  # a launcher sends SIGTERM right after the terminal's SIGINT: let the cleanup finish
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if interrupted is not None:
            left = interrupted
        else:
            left = _what_was_kept(checkpoints, resumable) if _claimed.run_dir else "this process wrote no run directory"
        print(f"interrupted: {left}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except InputError as error:  # bad input, a refused write, or losing the claim on --out (then nothing is ours)
        ours = _claimed.run_dir is not None and interrupted is None
        left = f"; {_what_was_kept(checkpoints, resumable)}" if ours else ""
        raise SystemExit(f"error: {error}{left}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def _what_was_kept(checkpoints: Sequence[str], resumable: bool) -> str:
    """What the run in the claimed directory leaves, in words; removes it when it holds no checkpoint."""
    run_dir = _claimed.run_dir
    kept = [str(run_dir / name) for name in checkpoints if (run_dir / name).exists()]
    if kept or _claimed.resumed:
        what = " and ".join(kept) or str(run_dir)
        if resumable:
            return f"kept {what} (the run did not finish; the same command with --resume --out {run_dir} goes on)"
        return f"kept {what} (no test_metrics.json: the run did not finish)"
    try:
        if _claimed.created:
            _remove(run_dir)
        else:
            for entry in list(run_dir.iterdir()):
                _remove(entry)
    except OSError as error:
        return f"no checkpoint was written yet; {run_dir} could not be cleared ({error.strerror})"
    return f"no checkpoint was written yet, so {run_dir} was {'removed' if _claimed.created else 'emptied'}"


def allocate(build: Callable[[], T], flag: str, value) -> T:
    """build() (a model), with an out-of-memory failure turned into one line naming the flag that sized it."""
    try:
        return build()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        size = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(error))
        if size is None and not isinstance(error, torch.OutOfMemoryError):
            raise
        tried = f": it tried to allocate {size.group(1)}" if size else ""
        raise InputError(f"{flag}: the model does not fit in memory at {value}{tried}") from None


class EarlyStopping:
    """Tracks the best validation value (higher is better) and says when `patience` evaluations brought nothing."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("-inf")
        self.bad_evaluations = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when it is a new best."""
        if value > self.best:
            self.best = value
            self.bad_evaluations = 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience


def progress(iterable: Iterable, **tqdm_kwargs) -> tqdm:
    """A tqdm bar; set RECSYS_QUIET=1 to silence bars (tests, logs)."""
    return tqdm(iterable, disable=os.environ.get("RECSYS_QUIET") == "1" or None, dynamic_ncols=True, **tqdm_kwargs)


class Scalars:
    """Training curves for TensorBoard: event files under <run_dir>/tensorboard/, written on this machine only
    (`tensorboard --logdir runs` shows every run). Disabled (--no-tensorboard, or a process other than rank 0 of a
    multi-process run), every call does nothing, so a stage logs the same way either way."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported on use: it takes a second to load

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def add(self, step: int, **values: float) -> None:
        """One point per value at x = step; names with a slash group curves ("train/loss", "val/NDCG@10")."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, float(value), step)

    def hyperparameters(self, config, metrics: Iterable[str]) -> None:
        """The run's configuration (a dataclass; values other than numbers, strings and booleans as text) in
        TensorBoard's HPARAMS tab, compared across runs by the scalar tags `metrics` (e.g. "test/NDCG@10")."""
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams

            plain = (int, float, str, bool)
            values = {name: v if isinstance(v, plain) else str(v) for name, v in _jsonable(config).items()}
            # add_hparams would write them to a new subdirectory, a run of its own; these summaries join this one
            for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        """Write what is buffered (the writer otherwise flushes every two minutes)."""
        if self.writer is not None:
            self.writer.close()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters for AdamW, with no weight decay on biases and LayerNorm weights (as the paper's code)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
