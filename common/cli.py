"""Command-line arguments of every script: tyro dataclasses whose fields declare their own constraints.

A field states what it accepts with a marker in its annotation, e.g.

    epochs: Annotated[int, Positive] = 200
    dropout: Annotated[float, between(0, 1, high_open=True)] = 0.5

`Checked` (the base class of every script's Args) checks the markers when the dataclass is constructed, so
`main(Args(...))` called from Python is checked as well as the command line; a field without a marker accepts
whatever its type does. `parse(Args)` replaces `tyro.cli(Args)`: a rejected value prints
`error: --flag-name: problem (got value)` on one line and exits with status 2, before the script does anything;
so does a command line tyro itself rejects (a value it cannot read, an unknown flag with tyro's suggestion, a bad
choice, a missing value or subcommand), through tyro's parse-error hook instead of its multi-line box.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import tyro
from tyro import _errors as _tyro_errors  # private but pinned (requirements.txt): structured parse errors
from tyro import _strings as _tyro_strings

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
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; a larger one fails only once the script seeds, after loading
Seed = rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
            f"must be an integer in [0, {MAX_SEED}]")  # fmt: skip


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


def dangling_link_problem(path: Path) -> str | None:
    """A symlink whose target is missing exists for mkdir and rename but not for exists(): name it."""
    if path.is_symlink() and not path.exists():
        return f"is a symlink to {os.readlink(path)}, which does not exist"
    return None


def _output_dir_problem(path: Path) -> str | None:
    path = Path(path)
    if (dangling := dangling_link_problem(path)) is not None:
        return dangling
    if not path.exists():
        return _creation_problem(path)
    if not path.is_dir():
        return "is a file, not a directory"
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"


def _output_file_problem(path: Path) -> str | None:
    path = Path(path)
    if (dangling := dangling_link_problem(path)) is not None:
        return dangling
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
    """tyro.cli(cls, args=args) with the script's docstring as the --help description, help texts without hard line
    breaks, and every rejected command line (a value tyro cannot read, an unknown flag, a bad choice, a missing
    value or subcommand, a value a Check rejects) printed as one `error:` line, exit status 2."""
    given = list(sys.argv[1:] if args is None else args)
    captured = io.StringIO()
    unrecognized: list[str] = []
    try:
        with _flowing_help(), _tyro_errors.on_parse_error(_one_line_hook(given, unrecognized)):
            with contextlib.redirect_stderr(captured):
                return tyro.cli(cls, args=given, description=_description(cls))
    except (_ParseFailure, FlagError) as error:
        _exit_with(str(error))
    except SystemExit as stop:
        if stop.code == USAGE_ERROR and unrecognized:
            _exit_with(_unrecognized_line(unrecognized, captured.getvalue()))
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        if sys.exc_info()[0] is None:  # parsed: tyro's warnings, if any, still reach the user
            sys.stderr.write(captured.getvalue())


def _exit_with(line: str) -> NoReturn:
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR) from None


class _ParseFailure(Exception):
    """Raised from tyro's parse-error hook to take over its multi-line error box; the message is our one line."""


def _description(cls) -> str:
    """The first line of the docstring of the script that defines `cls` (a Union of subcommands: of __main__)."""
    module = sys.modules.get(cls.__module__ if isinstance(cls, type) else "__main__")
    doc = (getattr(module, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _value_given(args: list[str], flags: Sequence[str]) -> str | None:
    """What the command line gave one of `flags` (the token after it, or after "="), or None."""
    for index, token in enumerate(args):
        name, equals, value = token.partition("=")
        if name in flags:
            return value if equals else (args[index + 1] if index + 1 < len(args) else None)
    return None


def _expected(metavar: str) -> str:
    """What a value of tyro's `metavar` ("INT", "{None}|FLOAT", "PATH", ...) must be, in words."""
    kinds = set(metavar.split("|"))
    if "INT" in kinds:
        return "must be an integer"
    if "FLOAT" in kinds:
        return "must be a number"
    return f"must be {metavar}"


def _one_line_hook(args: list[str], unrecognized: list[str]) -> Callable[[Any], None]:
    """A tyro parse-error hook raising _ParseFailure with our line; unknown flags are only recorded, because the
    "did you mean" suggestions exist only in tyro's rendered box (see _unrecognized_line)."""

    def hook(event) -> None:
        argument = getattr(event, "argument", None)
        flag = argument.display_name() if argument is not None else None
        if isinstance(event, _tyro_errors.InstantiationFailure) and argument is not None:
            value = _value_given(args, argument.lowered.name_or_flags)
            raise _ParseFailure(f"{flag}: {_expected(str(argument.lowered.metavar))} (got {value!r})")
        if isinstance(event, _tyro_errors.InvalidChoice):
            raise _ParseFailure(f"{flag}: must be one of {', '.join(map(str, event.choices))} (got {event.value!r})")
        if isinstance(event, _tyro_errors.BadValue):
            raise _ParseFailure(f"{flag}: needs a value (got none)")
        if isinstance(event, _tyro_errors.MissingArgs):
            names = [missing.arg.display_name() for missing in event.missing_arguments]
            others = f", and so are {', '.join(names[1:])}" if len(names) > 1 else ""
            raise _ParseFailure(f"{names[0]}: required{others} (got none)")
        if isinstance(event, _tyro_errors.MissingSubcommand):
            names = ", ".join(event.subcommand_spec.parser_from_name)
            script, _, subcommands = event.prog.partition(" ")
            prog = " ".join(filter(None, [Path(script).name, subcommands]))
            raise _ParseFailure(f"{prog}: needs a subcommand, one of {names} (got none)")
        if isinstance(event, _tyro_errors.UnrecognizedArgs):
            unrecognized.extend(event.tokens)

    return hook


def _unrecognized_line(tokens: list[str], box: str) -> str:
    """One line for unknown command-line tokens, keeping the first of tyro's "Perhaps you meant" suggestions."""
    lines = [line.strip("│ ") for line in box.splitlines()]
    suggested = next((lines[i + 1].split() for i, line in enumerate(lines[:-1]) if line == "Perhaps you meant:"), [])
    suggestion = suggested[0] if suggested else None
    flag = next((token for token in tokens if token.startswith("-")), tokens[0])
    if suggestion == flag:
        hint = ", it belongs after a subcommand"
    elif suggestion is not None:
        hint = f", did you mean {suggestion}?"
    else:
        hint = ""
    return f"{flag}: not an option here{hint} (got {' '.join(tokens)!r})"


def _joined_lines(helptext: str) -> str:
    """A help text with its paragraphs (split by blank lines) each on one line. tyro keeps a line break before a
    line that starts with anything but a letter (a quote, a digit, "<="), which breaks sentences in --help."""
    paragraphs = re.split(r"\n\s*\n", helptext)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


@contextlib.contextmanager
def _flowing_help():
    """tyro's help texts joined by _joined_lines while parsing (tyro 1.0.17's private line-break helper)."""
    original = _tyro_strings.remove_single_line_breaks
    _tyro_strings.remove_single_line_breaks = _joined_lines
    try:
        yield
    finally:
        _tyro_strings.remove_single_line_breaks = original
