"""Pre-training under DeepSpeed on CPU (gloo): one and two processes, ZeRO 0-3, exact resume, the global contrastive
loss, TensorBoard scalars, the pairs drawn from the corpus. Runs are subprocesses started the ways users start them:
python (one process), torchrun and the deepspeed launcher (two processes)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED_DATA
from test_faults import default_sigint, interrupted_once

import pretrain_recformer as P
from common.data import PAD, DatasetError, Sequences
from common.distributed import free_port, parse_launched
from common.run import OutputError, write_json_atomic

PYTHON = sys.executable
WINDOW = 4  # items per corpus sequence: short sequences keep every encoder pass cheap
RUN = ["--backbone", "tiny", "--batch-size", "4", "--grad-accum", "1", "--lr", "2e-3", "--warmup-steps", "2",
       "--eval-every", "1000", "--log-every", "1"]  # fmt: skip

# Runs pretrain_recformer.main, then stores this rank's weights so the test can compare ranks; then, in the same
# process group, this rank's share of the global contrastive loss on a fixed 8-pair batch and the gradient that the
# data-parallel average makes of it (the contrastive test compares both with one process on the whole batch).
WORKER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    import torch, torch.distributed as dist
    import pretrain_recformer as P
    from common.distributed import parse_launched
    out, engine = P.main(parse_launched(P.Args))
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = {{name: t.detach().float().cpu() for name, t in engine.module.model.state_dict().items()}}
    torch.save(weights, out / f"rank{{rank}}.pt")
    name_of = {{id(p): name for name, p in engine.module.model.named_parameters()}}
    masters = P.zero0_fp32_masters(engine.optimizer)  # empty unless ZeRO 0 with mixed precision
    torch.save({{name_of[i]: t.detach().cpu().clone() for i, t in masters.items()}}, out / f"masters{{rank}}.pt")

    torch.manual_seed(0)
    x_a, x_b, weight = torch.randn(8, 5), torch.randn(8, 5), torch.randn(5, 6, requires_grad=True)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss, correct = P.contrastive_loss(x_a[rows] @ weight, x_b[rows] @ weight, temp=0.05)
    (world * loss).backward()  # as train_step scales it
    dist.all_reduce(weight.grad)
    weight.grad /= world  # the data-parallel average
    torch.save({{"loss": loss.detach(), "correct": correct, "grad": weight.grad}}, out / f"contrastive{{rank}}.pt")
""")


def sequence_windows(data, rows) -> list[list[str]]:
    """Consecutive WINDOW-item pieces of the given users' sequences, as item keys."""
    windows = []
    for row in rows:
        items = data.sequence(row)
        starts = range(0, len(items) - WINDOW + 1, WINDOW)
        windows += [[data.item_keys[i] for i in items[s : s + WINDOW]] for s in starts]
    return windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus in the paper's layout: MovieLens-100k (short item text) from ../shared/data when present,
    else the built-in synthetic data; 96 training and 16 dev sequences of WINDOW items from disjoint users."""
    from common.data import load_dataset
    from prepare_data import write_dataset

    root = tmp_path_factory.mktemp("pretrain")
    if (SHARED_DATA / "ml-100k").is_dir():
        import prepare_data

        prepare_data.run(prepare_data.Recbole(dir=SHARED_DATA / "ml-100k", name="ml-100k", out=root / "source"))
    else:
        from prepare_data import synthetic_catalogue

        write_dataset(root / "source", *synthetic_catalogue(num_users=200, num_items=100, seed=0))
    data = load_dataset(root / "source", verbose=False)
    train = sequence_windows(data, range(0, 40))[:96]
    dev = sequence_windows(data, range(40, 60))[:16]
    key_id = {key: i for i, key in enumerate(data.item_keys)}
    used = dict.fromkeys(key for sequence in train + dev for key in sequence)
    out = root / "corpus"
    out.mkdir()
    for name, obj in (("train.json", train), ("dev.json", dev),
                      ("meta_data.json", {key: data.item_text[key_id[key]] for key in used})):  # fmt: skip
        (out / name).write_text(json.dumps(obj), encoding="utf-8")
    assert len(train) == 96 and len(dev) == 16
    return out


def launch(corpus: Path, out: Path, *extra: str, processes: int = 1, launcher: str = "worker") -> list[dict]:
    """Run a pre-training and return its metrics (see `launch_printing`)."""
    return launch_printing(corpus, out, *extra, processes=processes, launcher=launcher)[0]


def launch_printing(
    corpus: Path, out: Path, *extra: str, processes: int = 1, launcher: str = "worker"
) -> tuple[list[dict], str]:
    """Run a pre-training and return its metrics and what it printed on stdout. launcher: "cli"
    (pretrain_recformer.py itself; torchrun for several processes), "worker" (the same plus each rank's weights
    saved), "deepspeed" (the worker under the deepspeed launcher, which appends --local_rank=N)."""
    script = REPO / "pretrain_recformer.py"
    if launcher in ("worker", "deepspeed"):
        out.mkdir(parents=True, exist_ok=True)
        script = out.parent / f"{out.name}-worker.py"
        script.write_text(WORKER)
    args = [str(script), "--data", str(corpus), "--out", str(out), *RUN, *extra]
    if launcher == "deepspeed":
        command = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(processes), *args]
    elif processes > 1:
        command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *args]  # fmt: skip
    else:
        command = [PYTHON, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:6000] + result.stderr[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result.stdout


# TensorBoard tag -> the metrics.jsonl value it plots
TAGS = {"train/loss": "loss", "train/contrastive_loss": "contrastive_loss", "train/mlm_loss": "mlm_loss",
        "train/accuracy": "train_accuracy", "train/lr": "lr", "train/tokens_per_s": "tokens_per_s",
        "dev/accuracy": "dev_accuracy", "dev/loss": "dev_loss"}  # fmt: skip


def assert_scalars_mirror_metrics(scalars: dict, metrics: list[dict]) -> None:
    """Every tag holds its metrics.jsonl value (stored as float32) at x = the line's optimizer step, nothing more."""
    assert scalars.keys() == TAGS.keys()
    for tag, name in TAGS.items():
        expected = [(line["step"], line[name]) for line in metrics if name in line]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in expected], rtol=1e-6, err_msg=tag)


def losses(metrics: list[dict]) -> np.ndarray:
    return np.array([m["loss"] for m in metrics if "loss" in m])


def assert_loss_falls(metrics: list[dict]) -> None:
    values = losses(metrics)
    assert len(values) >= 20
    assert values[-5:].mean() < values[:5].mean() - 0.2, values


def assert_loads_in_export(checkpoint: Path, dataset: Path, capsys) -> None:
    """export_embeddings.py reads the directory as is (every tensor found), and its table is what the checkpoint's
    weights give when Hugging Face's own loader reads them (RecformerModel.from_pretrained, not our load_backbone)."""
    from transformers import AutoTokenizer

    import export_embeddings
    from common.data import load_dataset
    from common.recformer_data import dataset_item_tokens, encode_items
    from recformer.modeling_recformer import RecformerModel
    from recformer.tokenization_recformer import RecformerTokenizer

    target = checkpoint.parent / f"{checkpoint.name}.safetensors"
    capsys.readouterr()
    export_embeddings.main(export_embeddings.Args(checkpoint=str(checkpoint), data=dataset, out=target))
    assert "new 0 tensors" in capsys.readouterr().out
    table = load_file(str(target))["item_embeddings"]
    encoder = RecformerModel.from_pretrained(str(checkpoint)).float()
    tokenizer = RecformerTokenizer(AutoTokenizer.from_pretrained(str(checkpoint)), encoder.config)
    tokens = dataset_item_tokens(tokenizer, load_dataset(dataset, verbose=False))
    expected = encode_items(encoder, tokens, batch_size=64, device=torch.device("cpu"))
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)
    assert table[1:].abs().sum() > 0


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory) -> Path:
    """The corpus's dev sequences as a dataset directory (export reads datasets)."""
    from prepare_data import write_dataset

    meta = json.loads((corpus / "meta_data.json").read_text())
    dev = json.loads((corpus / "dev.json").read_text())
    out = tmp_path_factory.mktemp("dataset") / "dev"
    write_dataset(out, {str(i): sequence for i, sequence in enumerate(dev)}, meta)
    return out


def test_one_process_loss_falls_and_resume_is_exact(corpus, tmp_path, read_scalars):
    """ZeRO-2, plain python: 24 steps in one go == 9 steps, stop, resume, 15 steps; TensorBoard holds what
    metrics.jsonl holds, the resumed run's points added to the same directory. Into a pipe, where no progress bar
    is drawn, every logged step prints a line; the default --save-every saves the last step."""
    whole, printed = launch_printing(corpus, tmp_path / "whole", "--epochs", "1")  # 24 steps
    assert_loss_falls(whole)
    progress_lines = [line for line in printed.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert [line.split(",")[0] for line in progress_lines] == [
        f"step {m['step']}/24: loss {m['loss']:.4f}" for m in whole if "loss" in m
    ]
    assert (tmp_path / "whole" / "deepspeed" / "latest").read_text() == "step00000024"
    assert_scalars_mirror_metrics(read_scalars(tmp_path / "whole"), whole)
    launch(corpus, tmp_path / "split", "--epochs", "1", "--max-steps", "9", "--save-every", "4")
    assert (tmp_path / "split" / "deepspeed" / "latest").read_text() == "step00000009"
    resumed = launch(corpus, tmp_path / "split", "--epochs", "1", "--resume", "--save-every", "4")
    assert np.allclose(losses(resumed), losses(whole), atol=1e-5)
    assert len(list((tmp_path / "split" / "tensorboard").iterdir())) == 2  # one event file per launch
    assert_scalars_mirror_metrics(read_scalars(tmp_path / "split"), resumed)  # steps 1-9, then 10-24
    final_whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    final_resumed = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        torch.testing.assert_close(final_resumed[name], final_whole[name], atol=1e-6, rtol=0)
    kept = sorted(p.name for p in (tmp_path / "split" / "deepspeed").glob("step*"))
    assert kept == ["step00000020", "step00000024"]  # --keep-checkpoints 2


def test_ctrl_c_under_the_deepspeed_launcher_ends_in_one_line(corpus, tmp_path):
    """Ctrl-C reaches the launcher and its worker (one process group, as a terminal sends it); the launcher then
    terminates the worker. stderr holds the worker's one line naming what it kept and how to go on; besides it only
    DeepSpeed's log lines and the KeyboardInterrupt traceback of DeepSpeed's runner, which does not catch it
    (deepspeed/launcher/runner.py, around `result.wait()`). The checkpoint stays."""
    out = tmp_path / "run"
    command = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "1", str(REPO / "pretrain_recformer.py"),
               "--data", str(corpus), "--out", str(out), *RUN, "--epochs", "100", "--save-every", "2",
               "--no-tensorboard"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1")
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    stderr = interrupted_once(launcher, out / "deepspeed" / "latest", lambda: os.killpg(launcher.pid, signal.SIGINT))
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[20")]
    ours = [line for line in lines if line.startswith("interrupted:")]
    assert launcher.returncode != 0 and ours == [
        f"interrupted: kept {out}/deepspeed (the run did not finish; the same command with --resume --out {out} "
        "goes on)"
    ], stderr
    runners = [line for line in lines if line not in ours]
    assert not runners or (runners[0] == "Traceback (most recent call last):" and runners[-1] == "KeyboardInterrupt"
                           and any("deepspeed/launcher/runner.py" in line for line in runners)), stderr  # fmt: skip
    assert (out / "deepspeed" / "latest").is_file() and not (out / "final").exists()


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """One epoch (24 steps) with ZeRO-2 on two processes started by the deepspeed launcher."""
    out = tmp_path_factory.mktemp("two") / "run"
    metrics = launch(corpus, out, "--epochs", "1", "--batch-size", "2", "--zero-stage", "2", processes=2,
                     launcher="deepspeed")  # fmt: skip
    return out, metrics


def test_two_processes_zero2_loss_falls_and_ranks_agree(two_processes, dataset, capsys):
    out, metrics = two_processes
    assert_loss_falls(metrics)
    rank0 = torch.load(out / "rank0.pt")
    rank1 = torch.load(out / "rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final.keys() == rank0.keys()
    for name in final:
        torch.testing.assert_close(final[name], rank0[name], atol=1e-6, rtol=0)
    assert_loads_in_export(out / "final", dataset, capsys)


def test_two_process_contrastive_loss_equals_one_process_on_the_whole_batch(two_processes):
    out, _ = two_processes
    # One process, the whole batch (no process group here: nothing to gather).
    torch.manual_seed(0)
    x_a, x_b, weight = torch.randn(8, 5), torch.randn(8, 5), torch.randn(5, 6, requires_grad=True)
    loss, correct = P.contrastive_loss(x_a @ weight, x_b @ weight, temp=0.05)
    loss.backward()
    # Independent reference for the loss itself, written out with numpy.
    a, b = (x_a @ weight).detach().numpy(), (x_b @ weight).detach().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / 0.05
    assert abs(loss.item() - np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))) < 1e-4
    for rank in (0, 1):
        half = torch.load(out / f"contrastive{rank}.pt")
        torch.testing.assert_close(half["loss"], loss.detach(), atol=1e-6, rtol=0)
        assert int(half["correct"]) == int(correct)
        torch.testing.assert_close(half["grad"], weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stage, processes, launcher, tensorboard",
                         [(0, 1, "cli", False), (1, 1, "worker", True), (3, 2, "cli", True)])  # fmt: skip
def test_zero_stages_0_1_3_write_checkpoints_export_reads(corpus, dataset, tmp_path, capsys, read_scalars, stage,
                                                         processes, launcher, tensorboard):
    """(ZeRO-2 is covered above.) Two steps, evaluated after each, so best/ and final/ both get written. TensorBoard
    files come from rank 0 alone, and none at all under --no-tensorboard."""
    out = tmp_path / f"zero{stage}"
    metrics = launch(corpus, out, "--epochs", "1", "--max-steps", "2", "--eval-every", "1", "--zero-stage", str(stage),
                     "--tensorboard" if tensorboard else "--no-tensorboard", processes=processes, launcher=launcher)
    if tensorboard:
        assert len(list((out / "tensorboard").iterdir())) == 1
        assert_scalars_mirror_metrics(read_scalars(out), metrics)
    else:
        assert not (out / "tensorboard").exists()
    assert (out / "best" / "model.safetensors").exists()
    assert_loads_in_export(out / "final", dataset, capsys)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_zero0_bf16_saves_the_fp32_masters_and_resume_skips_a_cut_save(corpus, tmp_path):
    """ZeRO 0 + bf16 on the CPU: best/ and final/ hold the optimizer's fp32 master weights, not the module's bf16
    copies; a save cut by a kill (its model file half written, `latest` still naming the step before, as a kill
    leaves them) is passed over: --resume continues from the step before and redoes the cut one."""
    out = tmp_path / "bf16"
    # three steps: the warm-up schedule gives the first step learning rate 0
    launch(corpus, out, "--epochs", "1", "--max-steps", "3", "--eval-every", "1", "--save-every", "1",
           "--zero-stage", "0", "--dtype", "bfloat16")  # fmt: skip
    masters = torch.load(out / "masters0.pt")
    module = torch.load(out / "rank0.pt")
    assert len(masters) > 10 and all(m.dtype == torch.float32 for m in masters.values())
    final = load_file(str(out / "final" / "model.safetensors"))
    for name, master in masters.items():
        assert final[name].dtype == torch.float32
        assert torch.equal(final[name], master), name
        assert torch.equal(master.bfloat16().float(), module[name]), name  # the module holds the rounded master
    assert any(not torch.equal(t, t.bfloat16().float()) for t in final.values()), "final/ holds bf16-rounded values"
    best = load_file(str(out / "best" / "model.safetensors"))  # written by the same function, at an earlier step
    assert best.keys() == final.keys() and all(t.dtype == torch.float32 for t in best.values())

    step3 = out / "deepspeed" / "step00000003" / "mp_rank_00_model_states.pt"
    step3.write_bytes(step3.read_bytes()[: step3.stat().st_size // 2])
    (out / "deepspeed" / "latest").write_text("step00000002")
    metrics = launch(corpus, out, "--epochs", "1", "--max-steps", "4", "--save-every", "1", "--zero-stage", "0",
                     "--dtype", "bfloat16", "--resume")  # fmt: skip
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 3, 4]  # the resumed run redid step 3
    assert (out / "deepspeed" / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in (out / "deepspeed").glob("step*")) == ["step00000003", "step00000004"]


def test_resume_without_a_complete_step_says_so(tmp_path):
    """No `latest` (no save finished), a `latest` naming a step that is gone, or one whose model file is: one line,
    before any work."""
    (tmp_path / "deepspeed" / "step00000004").mkdir(parents=True)  # a save cut before `latest` was written
    write_json_atomic(tmp_path / "config.json", P.Args(data=tmp_path / "corpus", out=tmp_path))
    with pytest.raises(P.InputError, match=r"deepspeed: no checkpoint to resume from \(no `latest`: no step was"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path, resume=True))
    (tmp_path / "deepspeed" / "latest").write_text("step00000005")
    with pytest.raises(P.InputError, match=r"\(`latest` names step00000005, which is missing\)$"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path, resume=True))
    (tmp_path / "deepspeed" / "latest").write_text("step00000004")  # named, but its files lost since
    with pytest.raises(P.InputError, match=r"\(step00000004 has no mp_rank_00_model_states.pt\)$"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path, resume=True))


def test_pairs_follow_the_papers_rule():
    sequences = Sequences.from_lists([[5, 6], [1, 2, 3, 4, 9]])
    rng = np.random.default_rng(0)
    draws = [rng.random(2) for _ in range(300)]  # one uniform draw per sequence, as an epoch plan gives
    pairs = [P.sample_pairs(sequences, np.array([0, 1]), d, history=3) for d in draws]
    side_a = np.concatenate([a for a, _ in pairs])
    side_b = np.concatenate([b for _, b in pairs])
    rows = np.tile([0, 1], len(draws))
    seen = {}
    for a, b, row in zip(side_a.tolist(), side_b[:, 0].tolist(), rows):
        seen.setdefault(row, set()).add((tuple(a), b))
    # length 2: targets at positions 0 or 1; length 5: positions 2, 3 or 4, with the (up to 3) items before.
    assert seen[0] == {((0, 0, 0), 5), ((0, 0, 5), 6)}
    assert seen[1] == {((0, 1, 2), 3), ((1, 2, 3), 4), ((2, 3, 4), 9)}


def test_corpus_is_csr_and_side_a_is_the_items_before_the_target(tmp_path):
    """A hand-built corpus: its sequences load into common.data's CSR storage in file order, and for any draw side a
    holds exactly the `history` items before the drawn target (PAD on the left), side b the target."""
    train = [["a", "b"], ["c", "d", "e", "f", "g"], ["g", "a", "c"]]
    (tmp_path / "meta_data.json").write_text(json.dumps({key: {"title": key} for key in "gfedcba"}))
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "dev.json").write_text(json.dumps([["b", "a"]]))
    corpus = P.load_corpus(tmp_path)
    item_id = {key: i for i, key in enumerate(corpus.item_keys)}
    assert corpus.item_keys == ["", *"gfedcba"]  # ids follow meta_data.json
    assert isinstance(corpus.train, Sequences) and isinstance(corpus.dev, Sequences)
    assert corpus.train.offsets.tolist() == [0, 2, 7, 10]
    assert corpus.train.items.tolist() == [item_id[key] for sequence in train for key in sequence]
    assert corpus.dev.items.tolist() == [item_id["b"], item_id["a"]]

    rows = np.array([2, 0, 1])
    targets_seen = set()
    for draws in np.random.default_rng(0).random((40, 3)):
        for history in (1, 3, 6):
            side_a, side_b = P.sample_pairs(corpus.train, rows, draws, history)
            assert side_a.shape == (3, history) and side_b.shape == (3, 1)
            for row, a, b in zip(rows, side_a.tolist(), side_b.tolist()):
                sequence = [item_id[key] for key in train[row]]
                first = (len(sequence) - 1) // 2
                position = first + int(draws[row] * (len(sequence) - first))
                before = sequence[:position][-history:]
                assert a == [PAD] * (history - len(before)) + before
                assert b == [sequence[position]]
                targets_seen.add((row, position))
    assert targets_seen == {(0, 0), (0, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)}


def test_bad_corpus_fails_with_one_line_naming_the_file(tmp_path):
    (tmp_path / "meta_data.json").write_text(json.dumps({"a": {"title": "x"}, "b": {"title": "y"}}))
    (tmp_path / "train.json").write_text(json.dumps([["a", "b", "c"]]))
    (tmp_path / "dev.json").write_text(json.dumps([["a", "b"]]))
    with pytest.raises(DatasetError) as error:
        P.main(P.Args(data=tmp_path, out=tmp_path / "run"))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "train.json") in message and "'c'" in message, message
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_never_overwrites_a_previous_one(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match="--overwrite"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path))
    with pytest.raises(P.InputError, match="exclude each other"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path, resume=True, overwrite=True))
    with pytest.raises(P.InputError, match="holding deepspeed/"):
        P.main(P.Args(data=tmp_path / "corpus", out=tmp_path / "elsewhere", resume=True))


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain_recformer.py", "--local_rank=1", "--zero-stage", "3"])
    assert parse_launched(P.Args).zero_stage == 3


def test_resume_refuses_settings_that_make_another_run(tmp_path):
    (tmp_path / "deepspeed").mkdir()
    started = P.Args(data=tmp_path / "corpus", out=tmp_path, max_steps=9)
    write_json_atomic(tmp_path / "config.json", started)
    with pytest.raises(OutputError, match=r"config.json: --resume with other settings .*\(--lr, --seed\)"):
        P.main(dataclasses.replace(started, resume=True, max_steps=0, lr=1.0, seed=7))
    with pytest.raises(P.InputError, match="no checkpoint to resume from"):  # bounds and logs may change: it passes
        P.main(dataclasses.replace(started, resume=True, max_steps=0, save_every=3, tensorboard=False))


@pytest.mark.parametrize(("sequence", "problem"), [(["a", "zz"], "item 'zz' has no entry in meta_data.json"),
                                                   (["a"], "sequence 1 is not a list of at least 2 item keys")])
def test_a_bad_corpus_sequence_is_a_one_line_error(tmp_path, sequence, problem):
    (tmp_path / "meta_data.json").write_text(json.dumps({"a": {"title": "a"}, "b": {"title": "b"}}))
    (tmp_path / "train.json").write_text(json.dumps([["a", "b"], sequence]))
    (tmp_path / "dev.json").write_text(json.dumps([["b", "a"]]))
    with pytest.raises(DatasetError) as error:
        P.load_corpus(tmp_path)
    assert str(error.value) == f"{tmp_path / 'train.json'}: {problem}"
