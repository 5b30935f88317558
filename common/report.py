"""Print one comparison table from finished run directories (their test_metrics.json), e.g. at the end of the demo.

    python -m common.report NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

COLUMNS = ("HR@1", "HR@10", "NDCG@10", "NDCG@50", "MRR")


def comparison_table(runs: dict[str, Path]) -> str:
    """A fixed-width table: one row per run, the test metrics in COLUMNS."""
    width = max(len(name) for name in runs)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS)]
    for name, run in runs.items():
        metrics_file = Path(run) / "test_metrics.json"
        if not metrics_file.exists():
            raise SystemExit(f"error: {metrics_file}: not found (did the run finish?)")
        metrics = json.loads(metrics_file.read_text())
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metrics[c]:>7.4f}" for c in COLUMNS))
    return "\n".join(lines)


if __name__ == "__main__":
    pairs = [argument.split("=", 1) for argument in sys.argv[1:]]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise SystemExit("usage: python -m common.report NAME=RUN_DIR [NAME=RUN_DIR ...]")
    print(comparison_table({name: Path(run) for name, run in pairs}))
