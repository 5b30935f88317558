"""Bad inputs to the stage scripts end in one line of our own, never a traceback, and leave nothing behind.

One table: each row runs a script's command line (its `if __name__ == "__main__"` block, in this process: a
subprocess per row would spend most of a minute importing torch) and expects a non-zero exit, a last stderr line
`error: <name>: ...` naming the flag or file, no traceback, and an output location that is unchanged or absent.
A few rows also run as real subprocesses, to show the in-process reading of the exit matches the interpreter's.
"""

import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def inputs(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the synthetic dataset (120 items) and broken files of every kind, by short name."""
    from common.run import write_json_atomic
    from pretrain_recformer import Args as PretrainArgs
    from recformer.configuration_recformer import RecformerConfig

    root = tmp_path_factory.mktemp("bad_inputs")
    data = root / "data"
    shutil.copytree(synthetic_data, data)
    config = RecformerConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, attention_window=4, max_position_embeddings=40)  # fmt: skip
    paths = {"data": data, "file": root / "a-file.txt"}
    paths["file"].write_text("not a directory\n")
    for name in ("corrupt-safetensors", "corrupt-config", "missing-field", "gpt2"):
        paths[name] = root / name
        config.save_pretrained(str(paths[name]))
        (paths[name] / "model.safetensors").write_bytes(os.urandom(500))
    (paths["corrupt-config"] / "config.json").write_text('{"model_type": "recformer", ')
    hf_config = config.to_dict() | {"model_type": "bert"}
    del hf_config["max_position_embeddings"]
    (paths["missing-field"] / "config.json").write_text(json.dumps(hf_config))
    (paths["gpt2"] / "config.json").write_text(json.dumps(config.to_dict() | {"model_type": "gpt2"}))
    paths["no-words"] = root / "no-words.bin"
    torch.save({"encoder.layer.0.weight": torch.zeros(2)}, paths["no-words"])
    paths["random-bytes"] = root / "random.bin"
    paths["random-bytes"].write_bytes(os.urandom(3000))
    paths["broken-run"] = root / "broken-run"  # a pre-training run whose only checkpoint lost its model file
    (paths["broken-run"] / "deepspeed" / "step00000002").mkdir(parents=True)
    (paths["broken-run"] / "deepspeed" / "latest").write_text("step00000002")
    write_json_atomic(paths["broken-run"] / "config.json", PretrainArgs(data=paths["data"], out=paths["broken-run"]))
    paths.update(source_files(root, data))
    paper_files(root, paths)
    return paths


def source_files(root: Path, data: Path) -> dict[str, Path]:
    """Inputs that used to pass and give silently wrong results or tracebacks, by short name."""
    import pickle

    from common.data import load_dataset
    from common.embeddings import save_item_embeddings
    from common.recformer_data import item_texts
    from recformer.convert_recformer import load_backbone, save_checkpoint
    from recformer.modeling_recformer import RecformerModel

    paths = {name: root / name for name in ("colliding-users", "recformer-says-bert", "dangling")}
    shutil.copytree(data, paths["colliding-users"])  # "1" and "01" are both user 1
    train = json.loads((data / "train.json").read_text())
    (paths["colliding-users"] / "train.json").write_text(json.dumps({**train, "01": train["2"]}))
    dataset = load_dataset(data)
    model, tokenizer = load_backbone("tiny", RecformerModel, item_texts(dataset))
    save_checkpoint(paths["recformer-says-bert"], model, tokenizer)
    config_file = paths["recformer-says-bert"] / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"model_type": "bert"}))
    paths["dangling"].symlink_to(root / "nowhere")
    texts = {
        "lcrec-twice": '{"u1": ["0", "1", "0"], "u1": ["1", "0", "1"]}',
        "lcrec-boolean": '{"u1": [true, false, true]}',
        "lcrec-items": '{"0": {"title": "a"}, "1": {"title": "b"}, "True": {"title": "c"}}',
        "amazon-reviews": '{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}\n',
        "amazon-list-user": '{"reviewerID": ["u"], "asin": "A", "unixReviewTime": 1}\n',
        "amazon-meta": '{"asin": "A", "title": "x"}\n',
        "amazon-object-title": '{"asin": "A", "title": {"en": "x"}}\n',
    }
    for name, text in texts.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(text)
    rows = dataset.num_items + 1
    for name, table in (("equal-table", torch.ones(rows, 8)), ("huge-table", torch.randn(rows, 8) * 1e37)):
        paths[name] = root / f"{name}.safetensors"
        save_item_embeddings(paths[name], table, dataset, "test")
    paths["pickle"] = root / "table.pt"  # a plain pickle of protocol 4, the kind torch warns about
    paths["pickle"].write_bytes(pickle.dumps({"table": [1.0, 2.0]}, protocol=4))
    paths["truncated-run"] = root / "truncated-run"
    paths["truncated-run"].mkdir()
    (paths["truncated-run"] / "test_metrics.json").write_text('{"HR@1": 0.1, "HR@')
    return paths


class RunsCode:
    """Pickled, its reduce would create the directory "code-ran" in the working directory (the test's tmp_path)."""

    def __reduce__(self):
        return os.mkdir, ("code-ran",)


def paper_files(root: Path, paths: dict[str, Path]) -> None:
    """The paper's files, broken: a dataset.pkl whose unpickling would run code, one holding a float, negatives
    missing a user, and a bare-tensor table for the synthetic dataset (whose numbering is not an imported smap's)."""
    dataset = {"train": {1: [1, 2]}, "val": {1: [3]}, "test": {1: [4]}, "smap": {k: i for i, k in enumerate("abcd", 1)}}
    for name, obj in (("code-pickle", {"train": RunsCode()}), ("float-pickle", dataset | {"train": {1: [1.0]}}),
                      ("paper-pickle", dataset), ("short-negatives", {2: [1]})):  # fmt: skip
        paths[name] = root / f"{name}.pkl"
        paths[name].write_bytes(pickle.dumps(obj))
    paths["bare-tensor"] = root / "item_embeddings_synthetic"
    torch.save(torch.zeros(121, 8), paths["bare-tensor"])


SASREC, BERT4REC, FINETUNE, EXPORT, PRETRAIN, PREPARE, REPORT = (
    "train_sasrec.py", "train_bert4rec.py", "finetune_recformer.py", "export_embeddings.py", "pretrain_recformer.py",
    "prepare_data.py", "common/report.py",
)  # fmt: skip

# (script, arguments, the name the error line must start with); {name} is a path from `inputs`, {out} the output
# location of the row (a fresh path, unless the arguments give --out themselves).
CASES = [
    (SASREC, "--hidden-size 0", "--hidden-size"),
    (BERT4REC, "--mask-prob -0.5", "--mask-prob"),
    (SASREC, "--max-len 0", "--max-len"),
    (BERT4REC, "--max-len -1", "--max-len"),
    (SASREC, "--epochs 0", "--epochs"),
    (BERT4REC, "--batch-size 0", "--batch-size"),
    (SASREC, "--chunk-rows 0", "--chunk-rows"),
    (BERT4REC, "--eval-batch-size 0", "--eval-batch-size"),
    (SASREC, "--lr nan", "--lr"),
    (FINETUNE, "--lr inf", "--lr"),
    (PRETRAIN, "--lr -1", "--lr"),
    (SASREC, "--dropout 1.5", "--dropout"),
    (SASREC, "--device cuda:7", "--device"),
    (EXPORT, "--checkpoint tiny --device gpu", "--device"),
    (FINETUNE, "--epochs -1", "--epochs"),  # 0 is zero-shot evaluation
    (EXPORT, "--checkpoint tiny --batch-size 0", "--batch-size"),
    (PRETRAIN, "--local_rank=0 --grad-accum 0", "--grad-accum"),
    (PRETRAIN, "--mlm-probability 1", "--mlm-probability"),
    (PREPARE, "synthetic --users 0", "--users"),
    (SASREC, "--sample-size 500", "--sample-size"),  # the catalogue has 120 items
    (FINETUNE, "--sample-size 500", "--sample-size"),
    (SASREC, "--out {file}", "--out"),
    (BERT4REC, "--out {file}/run", "--out"),
    (FINETUNE, "--out {file}", "--out"),
    (EXPORT, "--checkpoint tiny --out {data}", "--out"),
    (PRETRAIN, "--out {file}/run", "--out"),
    (SASREC, "--init-type plm --embeddings {random-bytes}", "{random-bytes}"),
    (EXPORT, "--checkpoint {corrupt-safetensors}", "{corrupt-safetensors}/model.safetensors"),
    (EXPORT, "--checkpoint {corrupt-config}", "{corrupt-config}/config.json"),
    (FINETUNE, "--backbone {missing-field}", "{missing-field}/config.json"),
    (EXPORT, "--checkpoint {gpt2}", "{gpt2}/config.json"),
    (FINETUNE, "--backbone {no-words}", "{no-words}"),
    (PRETRAIN, "--resume --out {broken-run}", "{broken-run}/deepspeed"),
    (PREPARE, "paper --pkl {code-pickle}", "{code-pickle}: refused global"),
    (PREPARE, "paper --pkl {float-pickle}", "{float-pickle}"),
    (PREPARE, "paper --pkl {paper-pickle} --negatives {short-negatives}", "{short-negatives}"),
    (SASREC, "--init-type plm --embeddings {bare-tensor}", "{bare-tensor}: a bare tensor"),
    (EXPORT, "--checkpoint tiny --table stored", "--table stored"),
    # command lines tyro cannot read: a bad number, an empty value, an unknown flag, a bad choice, no subcommand
    (SASREC, "--epochs 1.5", "--epochs"),
    (BERT4REC, "--lr=", "--lr"),
    (FINETUNE, "--epoch 3", "--epoch"),
    (SASREC, "--loss hinge", "--loss"),
    (PREPARE, "", "prepare_data.py"),
    (EXPORT, "--checkpoint tiny --seed 4294967296", "--seed"),  # numpy seeds are 32-bit
    # an output that is one of the command's own inputs, even with --overwrite
    (EXPORT, "--checkpoint tiny --out {data}/train.json --overwrite", "{data}/train.json"),
    (EXPORT, "--checkpoint {recformer-says-bert} --out {recformer-says-bert}/model.safetensors --overwrite",
     "{recformer-says-bert}/model.safetensors"),
    # inputs that used to give silently wrong results
    (PREPARE, "recformer --dir {colliding-users}", "{colliding-users}/train.json"),
    (SASREC, "--data {colliding-users}", "{colliding-users}/train.json"),
    (PREPARE, "lcrec --inter {lcrec-twice} --items {lcrec-items}", "{lcrec-twice}"),
    (PREPARE, "lcrec --inter {lcrec-boolean} --items {lcrec-items}", "{lcrec-boolean}"),
    (PREPARE, "amazon --reviews {amazon-reviews} --meta {amazon-object-title}",
     "{amazon-object-title}:1"),
    (PREPARE, "amazon --reviews {amazon-list-user} --meta {amazon-meta}", "{amazon-list-user}:1"),
    (EXPORT, "--checkpoint {recformer-says-bert}", "{recformer-says-bert}/config.json"),
    # inputs that used to end in a traceback or NaN scores after an epoch
    (SASREC, "--init-type plm --embeddings {equal-table} --init-transform center", "{equal-table}"),
    (BERT4REC, "--init-type plm --embeddings {huge-table} --init-transform whiten", "{huge-table}"),
    (SASREC, "--init-type plm --embeddings {pickle}", "{pickle}"),
    (BERT4REC, "--out {dangling}", "--out"),
    (PREPARE, "synthetic --out {dangling}", "{dangling}"),
    (REPORT, "row={truncated-run}", "{truncated-run}/test_metrics.json"),
    (PREPARE, "amazon --category Gone --base-url http://127.0.0.1:9/", "http://127.0.0.1:9/"),  # port 9: refused
    # flags --init-type none would ignore
    (SASREC, "--project pca", "--project"),
    (BERT4REC, "--init-transform center", "--init-transform"),
    (SASREC, "--embeddings {equal-table}", "--embeddings"),
    (BERT4REC, "--embeddings-smap {equal-table}", "--embeddings-smap"),
]


def command_line(script: str, arguments: str, paths: dict[str, Path], out: Path) -> list[str]:
    args = arguments.format(**paths).split()
    if script not in (PREPARE, REPORT) and "--data" not in args:
        args += ["--data", str(paths["data"])]
    if script != REPORT and args and "--out" not in args:  # an empty command line stays empty
        args += ["--out", str(out)]
    return args


def run_in_process(script: str, args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python script args`, run here: SystemExit(text) means text on stderr and status
    1, as the interpreter does it."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        status, message = 0, ""
    except SystemExit as stop:
        status, message = (1, f"{stop.code}\n") if isinstance(stop.code, str) else (stop.code or 0, "")
    finally:
        sys.argv = argv
    return status, capsys.readouterr().err + message


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` (or `path` itself) with its content; None when nothing is there."""
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line_error(status: int, stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), stderr


@pytest.mark.parametrize("script, arguments, name", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_bad_input_ends_in_one_line_and_leaves_nothing(script, arguments, name, inputs, tmp_path, capsys,
                                                       monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a default run directory would appear under runs/ here
    out = tmp_path / "out"
    args = command_line(script, arguments, inputs, out)
    given_out = Path(args[args.index("--out") + 1]) if "--out" in args else out
    watched = (inputs["data"], given_out, inputs["broken-run"], inputs["recformer-says-bert"])
    before = {path: snapshot(path) for path in watched}
    status, stderr = run_in_process(script, args, capsys)
    assert_one_line_error(status, stderr, name.format(**inputs))
    assert {path: snapshot(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the failed start created files"


@pytest.mark.parametrize("script, arguments, name, status", [
    (SASREC, "--dropout 1.5", "--dropout", 2),
    (BERT4REC, "--sample-size 500", "--sample-size", 1),
    (PREPARE, "synthetic --items 0", "--items", 2),
])  # fmt: skip
def test_subprocess_exit_and_stderr_match(script, arguments, name, status, inputs, tmp_path):
    args = command_line(script, arguments, inputs, tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == status
    assert_one_line_error(result.returncode, result.stderr, name)
    assert not (tmp_path / "out").exists()


# (script, arguments, the command the error must name); {absent} is a path where nothing is.
MISSING_INPUTS = [
    (SASREC, "--data {absent}", "python prepare_data.py synthetic --out {absent}"),
    (FINETUNE, "--data {absent}", "python prepare_data.py synthetic --out {absent}"),
    (BERT4REC, "--data {data} --init-type plm --embeddings {absent}", "python export_embeddings.py --checkpoint"),
    (PRETRAIN, "--data {absent}", "python prepare_data.py pretrain-corpus --from <dataset dirs> --out {absent}"),
]


@pytest.mark.parametrize("script, arguments, command", MISSING_INPUTS, ids=[f"{c[0]} {c[1]}" for c in MISSING_INPUTS])
def test_a_missing_input_names_the_command_that_makes_it(script, arguments, command, inputs, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    paths = {**inputs, "absent": tmp_path / "absent"}
    status, stderr = run_in_process(script, arguments.format(**paths).split(), capsys)
    assert_one_line_error(status, stderr, str(paths["absent"]))
    assert command.format(**paths) in stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the failed start created files"


def test_args_built_in_python_are_checked_too():
    """The checks run when an Args is constructed, so main(Args(...)) never sees a rejected value; a field without
    a marker accepts anything its type does."""
    from dataclasses import dataclass
    from typing import Annotated

    import train_bert4rec
    from common.cli import Checked, FlagError, Positive, between

    with pytest.raises(FlagError, match=r"^--mask-prob: must be in \(0, 1\] \(got 1.5\)$"):
        train_bert4rec.Args(mask_prob=1.5)

    @dataclass
    class Args(Checked):
        count: Annotated[int, Positive] = 1
        share: Annotated[float, between(0, 1)] = 0.5
        free: int = -7

    assert Args(count=3, share=1.0, free=-100).free == -100
    with pytest.raises(FlagError, match="^--count: "):
        Args(count=-2)


def test_unknown_flag_keeps_tyros_suggestion(capsys):
    status, stderr = run_in_process(SASREC, ["--epoch", "3"], capsys)
    assert status == 2
    assert stderr.splitlines() == ["error: --epoch: not an option here, did you mean --epochs? (got '--epoch 3')"]


def test_help_opens_with_the_description_and_keeps_sentences_on_one_line():
    """--help shows the first line of the script's docstring, and a help text whose source lines start with a
    quote or a digit is still one sentence (at a width where every help text fits one line)."""
    shown = subprocess.run([sys.executable, str(REPO / SASREC), "--help"], capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="1000", PYTHONPATH=str(REPO)), timeout=120)  # fmt: skip
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert lines[2] == "SASRec (Kang & McAuley, 2018) whose item table can start from a language model's item vectors."
    assert any('"center" minus the mean item vector, "whiten" PCA-whitened' in line for line in lines)
    sentence = "(the paper uses 100 or -1; 100 in every stage); <= 0 ranks the target against"
    assert any(sentence in line for line in lines)


def test_seeds_are_32_bit():
    import train_sasrec
    from common.cli import FlagError

    assert train_sasrec.Args(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(FlagError, match=r"^--seed: must be an integer in \[0, 4294967295\] \(got 4294967296\)$"):
        train_sasrec.Args(seed=2**32)
