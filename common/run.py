"""Small helpers every training stage shares: seeding, device choice, the run directory, atomic writes, early stopping.

Helpers, not a trainer: each stage script keeps its own loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
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


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with a temporary path beside `path`, then rename it onto `path` (a file or a directory).

    A crash mid-write leaves the previous `path` intact and no half-written file under its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        write(tmp)
        if path.is_dir() and tmp.is_dir():
            old = tmp.with_name(tmp.name + ".old")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_json_atomic(path: Path, obj) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")

    save_atomic(path, write)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


def create_run_dir(out: Path | None, stage: str, data: Path, tag: str, config) -> Path:
    """The run directory (`out`, or runs/<stage>/<dataset>-<tag>-<timestamp>/) with config.json written in it."""
    if out is None:
        out = Path("runs") / stage / f"{Path(data).name}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config)
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
