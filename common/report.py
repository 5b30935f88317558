"""Print one comparison table from finished run directories (their test_metrics.json), e.g. at the end of the demo.

    python -m common.report NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from tyro.conf import Positional, arg

from common.cli import Checked, FlagError, parse, rule

COLUMNS = ("HR@1", "HR@10", "NDCG@10", "NDCG@50", "MRR")

NamedRun = rule(lambda pair: pair.partition("=")[0] != "" and pair.partition("=")[2] != "", "must be NAME=RUN_DIR")


@dataclass
class Args(Checked):
    runs: Annotated[Positional[tuple[str, ...]], arg(metavar="NAME=RUN_DIR"), NamedRun]
    """Rows of the table, in order: a row name, "=", and a run directory holding test_metrics.json."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.runs:
            raise FlagError("runs", "needs at least one NAME=RUN_DIR", self.runs)


def read_metrics(path: Path) -> dict:
    """A run's test_metrics.json with every column of the table; a truncated or foreign file is a one-line error."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {path}: not valid JSON ({error}); was the run's write cut short?") from None
    missing = [c for c in COLUMNS if not isinstance(metrics, dict) or not isinstance(metrics.get(c), (int, float))]
    if missing:
        raise SystemExit(f"error: {path}: no number for {', '.join(missing)}; not a run's test metrics")
    return metrics


def comparison_table(runs: dict[str, Path]) -> str:
    """A fixed-width table: one row per run, the test metrics in COLUMNS."""
    width = max(len(name) for name in runs)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS)]
    for name, run in runs.items():
        metrics_file = Path(run) / "test_metrics.json"
        if not metrics_file.exists():
            raise SystemExit(f"error: {metrics_file}: not found (did the run finish?)")
        metrics = read_metrics(metrics_file)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metrics[c]:>7.4f}" for c in COLUMNS))
    return "\n".join(lines)


if __name__ == "__main__":
    args = parse(Args)
    print(comparison_table({name: Path(run) for name, _, run in (pair.partition("=") for pair in args.runs)}))
