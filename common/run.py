"""Small helpers every training stage shares: seeding, device choice, the run directory, atomic writes, early
stopping, TensorBoard scalars.

Helpers, not a trainer: each stage script keeps its own loop.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


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


class OutputError(ValueError):
    """An output path cannot be used (it holds something else, or lies under a file); one line naming the path."""


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
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _new_tmp(path)
    try:
        write(tmp)
        _give_default_modes(tmp)
        if path.is_dir() and tmp.is_dir():
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


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


def write_json_atomic(path: Path, obj) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")

    save_atomic(path, write)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


def file_on_the_way(path: Path) -> Path | None:
    """`path` itself or its nearest existing ancestor when that is not a directory (nothing can be created there)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def refuse_file_on_the_way(out: Path, kind: str, error: type[Exception]) -> None:
    """Raise `error` when directory `out` is a file or lies under one (`kind` names what it should be)."""
    blocker = file_on_the_way(out)
    if blocker == out:
        raise error(f"{out}: is a file, not a {kind}")
    if blocker is not None:
        raise error(f"{out}: cannot be a {kind}, {blocker} is a file")


def _input_paths(config) -> list[Path]:
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
    return next((p for p in [Path.cwd(), *_input_paths(config)] if p.resolve().is_relative_to(out)), None)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file path that holds a file (unless `overwrite`) or cannot hold one."""
    path = Path(path)
    blocker = file_on_the_way(path.parent)
    if blocker is not None:
        raise OutputError(f"{path}: cannot be created, {blocker} is a file")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


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
    if not resume:
        check_run_dir(out, overwrite, config)
        if out.is_dir():
            for entry in list(out.iterdir()):
                _remove(entry)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {**_jsonable(config), "provenance": provenance(item_table)})
    return out


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
