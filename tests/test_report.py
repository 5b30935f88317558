"""The demo's comparison table reads each run's test_metrics.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.report import COLUMNS, comparison_table

REPO = Path(__file__).resolve().parents[1]


def test_table_rows_follow_the_runs(tmp_path):
    runs = {}
    for name, value in (("SASRec", 0.25), ("SASRec+PLM", 0.5)):
        run = tmp_path / name
        run.mkdir()
        (run / "test_metrics.json").write_text(json.dumps({column: value for column in COLUMNS}))
        runs[name] = run
    header, first, second = comparison_table(runs).splitlines()
    assert header.split() == ["model", *COLUMNS]
    assert first.split() == ["SASRec"] + ["0.2500"] * len(COLUMNS)
    assert second.split() == ["SASRec+PLM"] + ["0.5000"] * len(COLUMNS)


def test_unfinished_run_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="test_metrics.json: not found"):
        comparison_table({"BERT4Rec": tmp_path})


def run_report(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.report", *argv], cwd=REPO, capture_output=True, text=True)


def test_command_line_prints_the_rows_in_order(tmp_path):
    for name, value in (("b", 0.25), ("a", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test_metrics.json").write_text(json.dumps({column: value for column in COLUMNS}))
    result = run_report(f"Second={tmp_path / 'b'}", f"First={tmp_path / 'a'}")
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
    assert rows == [["Second", "0.2500"], ["First", "0.5000"]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [((), "error: --runs: needs at least one NAME=RUN_DIR"), (("SASRec",), "error: --runs: must be NAME=RUN_DIR"),
     (("=runs/x",), "error: --runs: must be NAME=RUN_DIR")],
)  # fmt: skip
def test_command_line_rejects_malformed_rows_in_one_line(argv, message):
    result = run_report(*argv)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
