"""The demo's comparison table reads each run's test_metrics.json."""

import json

import pytest

from common.report import COLUMNS, comparison_table


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
