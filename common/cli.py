"""Command-line arguments of every script: tyro dataclasses whose fields declare their own constraints.

A field states what it accepts with a marker in its annotation, e.g.

    epochs: Annotated[int, Positive] = 200
    dropout: Annotated[float, between(0, 1, high_open=True)] = 0.5

`Checked` (the base class of every script's Args) checks the markers when the dataclass is constructed, so
`main(Args(...))` called from Python is checked as well as the command line; a field without a marker accepts
whatever its type does. `parse(Args)` replaces `tyro.cli(Args)`: a rejected value prints
`error: --flag-name: problem (got value)` on one line and exits with status 2, before the script does anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import tyro

T = TypeVar("T")

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The one precision flag of every stage: "auto" is bfloat16 on a CUDA device that supports it, else float32."""

USAGE_ERROR = 2  # the exit status of argparse (and so tyro) for a command line it rejects


class FlagError(Exception):
    """A field value its constraint rejects. Not a ValueError on purpose: tyro renders a ValueError raised while it
    constructs the dataclass as a multi-line box, and this one must reach `parse` to print one line."""

    def __init__(self, field: str, problem: str, value: Any):
        self.flag = "--" + field.replace("_", "-")
        shown = str(value) if isinstance(value, Path) else value
        super().__init__(f"{self.flag}: {problem} (got {shown!r})")


@dataclass(frozen=True)
class Check:
    """A constraint: `problem(value)` says what is wrong with a value, or None when the value is valid."""

    problem: Callable[[Any], str | None]


def rule(accepts: Callable[[Any], bool], requirement: str) -> Check:
    """A Check from a predicate and the requirement it tests ("must be ...")."""
    return Check(lambda value: None if accepts(value) else requirement)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Check:
    """A finite number >= low."""
    return rule(lambda v: _finite(v) and v >= low, f"must be a number >= {low}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number in the interval from low to high; *_open excludes that end."""

    def accepts(v) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return _finite(v) and above and below

    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return rule(accepts, f"must be in {interval}")


Positive = rule(lambda v: _finite(v) and v > 0, "must be a number > 0")
NonNegative = at_least(0)


def _device_available(name: str) -> bool:
    import torch  # here, not at import: prepare_data.py never needs torch for its flags

    if name in ("auto", "cpu"):
        return True
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


Device = rule(_device_available, "must be auto, cpu, cuda or cuda:N naming a GPU present here")


def _creation_problem(path: Path) -> str | None:
    """Why `path` (absent) could not be created, or None: its nearest existing ancestor must be a writable
    directory."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"is under {ancestor}, which is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable"
    return None


def _output_dir_problem(path: Path) -> str | None:
    path = Path(path)
    if not path.exists():
        return _creation_problem(path)
    if not path.is_dir():
        return "is a file, not a directory"
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"


def _output_file_problem(path: Path) -> str | None:
    path = Path(path)
    if not path.exists():
        return _creation_problem(path)
    if path.is_dir():
        return "is a directory, not a file"
    return None if os.access(path.parent, os.W_OK | os.X_OK) else f"{path.parent} is not writable"


OutputDir = Check(_output_dir_problem)
"""An output directory: existing and writable, or creatable (not a file, not under a file)."""
OutputFile = Check(_output_file_problem)
"""An output file: absent but creatable, or an existing file in a writable directory."""


def _checks(annotation) -> list[Check]:
    """The Check markers of an Annotated field type (none for a plain one)."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return []
    return [marker for marker in annotation.__metadata__ if isinstance(marker, Check)]


def validate(obj) -> None:
    """Raise FlagError for the first field of dataclass `obj` whose value a Check of its annotation rejects.

    None (an optional field left unset) is always accepted; a tuple or list is checked element by element.
    """
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for check in _checks(hints[field.name]):
            for item in values:
                problem = check.problem(item)
                if problem is not None:
                    raise FlagError(field.name, problem, item)


class Checked:
    """Base class of the scripts' Args dataclasses: constructing one validates its fields (see `validate`)."""

    def __post_init__(self) -> None:
        validate(self)


def parse(cls: type[T], args: Sequence[str] | None = None) -> T:
    """tyro.cli(cls, args=args), with a rejected field value printed as one `error:` line (exit status 2)."""
    try:
        return tyro.cli(cls, args=args)
    except FlagError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
