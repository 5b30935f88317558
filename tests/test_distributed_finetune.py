"""finetune_recformer.py and export_embeddings.py on two processes (gloo on the CPU) against one process, and
zero-shot evaluation (--epochs 0). The two-process runs are subprocesses started as users start them: torchrun for
fine-tuning, the deepspeed launcher (which appends --local_rank=N) for export."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_finetune import without_dropout

import export_embeddings
import finetune_recformer
from common.data import load_dataset
from common.distributed import free_port, parse_launched
from common.recformer_data import build_batch, dataset_item_tokens
from recformer.convert_recformer import load_backbone
from recformer.modeling_recformer import RecformerForSeqRec

PYTHON = sys.executable
SAMPLE_SIZE = 50
GRADIENT_SEED = 7
RUN = ["--backbone", "tiny", "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3", "--warmup-steps", "2",
       "--sample-size", str(SAMPLE_SIZE), "--eval-batch-size", "16", "--encode-batch-size", "16", "--device", "cpu",
       "--seed", "3", "--log-every", "1"]  # fmt: skip

# finetune_recformer.main (--log-every 1: a TensorBoard loss point per step), then this rank's weights and item table
# saved, so the test can compare the ranks; then, without dropout, the averaged gradient of one optimizer step
# (2 x 8 users), which the test recomputes on one process.
WORKER = textwrap.dedent(f"""
    import sys
    sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
    import torch, torch.distributed as dist
    import finetune_recformer
    from common.distributed import leave_process_group, parse_launched
    from test_finetune import first_step_gradients, without_dropout
    args = parse_launched(finetune_recformer.Args)
    run = finetune_recformer.main(args)
    weights = {{name: tensor.detach().cpu() for name, tensor in run.model.state_dict().items()}}
    without_dropout(run.model)
    gradients = first_step_gradients(run, seed=GRADIENT_SEED)
    saved = {{"weights": weights, "item_table": run.model.item_table.cpu(), "gradients": gradients}}
    torch.save(saved, args.out / f"rank{{dist.get_rank()}}.pt")
    leave_process_group()
""").replace("GRADIENT_SEED", str(GRADIENT_SEED))


def launch(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_QUIET="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:4000] + result.stderr[-4000:]
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes(synthetic_data, tmp_path_factory) -> Path:
    """Three epochs of stage 1 (19 optimizer steps of 2 x 8 users each) on two processes started by torchrun."""
    root = tmp_path_factory.mktemp("two")
    worker = root / "worker.py"
    worker.write_text(WORKER)
    out = root / "run"
    launch([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(worker), "--data", str(synthetic_data), "--out", str(out), *RUN, "--epochs", "3", "--patience", "3",
            "--stages", "1"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def zero_shot(synthetic_data, tmp_path_factory) -> tuple[Path, finetune_recformer.FineTuning]:
    """--epochs 0 on one process, in this process, with the same flags and seed (so the same untrained model)."""
    out = tmp_path_factory.mktemp("zero") / "run"
    run = finetune_recformer.main(parse_launched_args([*RUN, "--data", str(synthetic_data), "--out", str(out),
                                                      "--epochs", "0"]))  # fmt: skip
    return out, run


def parse_launched_args(argv: list[str]) -> finetune_recformer.Args:
    """The flags as the script parses them, with the deepspeed launcher's --local_rank=N that it must drop."""
    saved = sys.argv
    sys.argv = ["finetune_recformer.py", *argv, "--local_rank=1"]
    try:
        return parse_launched(finetune_recformer.Args)
    finally:
        sys.argv = saved


def test_two_processes_loss_falls_and_ranks_hold_equal_weights(two_processes):
    stage1 = [r for r in records(two_processes) if r["stage"] == 1]
    assert [r["steps"] for r in stage1] == [19, 38, 57]  # ceil(300 users / 16 per step) per epoch
    assert stage1[-1]["train_loss"] < stage1[0]["train_loss"] - 0.05, [r["train_loss"] for r in stage1]
    rank0 = torch.load(two_processes / "rank0.pt")["weights"]
    rank1 = torch.load(two_processes / "rank1.pt")["weights"]
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    saved = load_file(str(two_processes / "stage1" / "model.safetensors"))
    assert saved.keys() <= rank0.keys()
    test = json.loads((two_processes / "test_metrics.json").read_text())
    assert test["stage"] == 1 and test["users"] == 300


def test_rank_0_alone_writes_tensorboard_scalars_of_both_processes(two_processes, read_scalars):
    """One event file (rank 0's); a step's loss point is the mean over the step's 16 users of both processes, so
    each epoch's points, weighted by the step sizes, average to the epoch's train_loss."""
    assert len(list((two_processes / "tensorboard").iterdir())) == 1
    scalars = read_scalars(two_processes)
    stage1 = [r for r in records(two_processes) if r["stage"] == 1]
    points = [(0, records(two_processes)[0])] + [(r["steps"], r) for r in stage1]  # untrained, then each epoch
    assert scalars["stage1/val/NDCG@10"] == [(step, pytest.approx(r["NDCG@10"])) for step, r in points]
    losses = [y for _, y in scalars["stage1/train/loss"]]
    assert [x for x, _ in scalars["stage1/train/loss"]] == list(range(1, 58))
    users = [16] * 18 + [300 - 16 * 18]  # per step of an epoch
    for epoch, r in enumerate(stage1):
        assert np.dot(losses[19 * epoch :][:19], users) / 300 == pytest.approx(r["train_loss"], rel=1e-6)


def test_a_two_process_step_has_the_gradient_of_its_16_users_mean_loss(two_processes, synthetic_data):
    """Each process runs every second user of the step; the averaged gradient is that of the mean loss over all 16,
    computed here on one process in one encoder call."""
    saved = torch.load(two_processes / "rank0.pt")
    data = load_dataset(synthetic_data, verbose=False)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    model.load_state_dict(saved["weights"])
    model.set_item_table(saved["item_table"])
    without_dropout(model)
    model.train()
    max_items = model.config.max_item_embeddings - 1
    histories, labels = finetune_recformer.training_examples(data, max_items, np.random.default_rng(GRADIENT_SEED))
    step = slice(0, 16)
    pooled = model(**build_batch(dataset_item_tokens(tokenizer, data), histories[step], model.config))
    model.loss(pooled, torch.from_numpy(labels[step]), 0).backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(saved["gradients"][name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(saved["item_table"], torch.load(two_processes / "rank1.pt")["item_table"])


def test_two_process_validation_equals_one_process_exactly(two_processes, zero_shot):
    """The same untrained model, users shared between two processes or scored by one: the same floats."""
    two = records(two_processes)[0]
    one = records(zero_shot[0])[0]
    assert (two["stage"], two["epoch"]) == (one["stage"], one["epoch"]) == (0, 0)
    assert two == one
    assert one["users"] == 300


def test_zero_shot_writes_test_metrics_and_trains_nothing(zero_shot, synthetic_data):
    out, run = zero_shot
    assert [(r["stage"], r["epoch"]) for r in records(out)] == [(0, 0)]
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["stage"] == 0 and test["users"] == 300 and test["val_NDCG@10"] == records(out)[0]["NDCG@10"]
    assert not (out / "stage1").exists() and not (out / "stage2").exists()
    torch.manual_seed(3)  # the run's seed: the same random "tiny" backbone
    untouched, _ = load_backbone("tiny", RecformerForSeqRec, load_dataset(synthetic_data, verbose=False).item_text)
    trained = run.model.state_dict()
    for name, tensor in untouched.state_dict().items():
        if name != "item_table":
            assert torch.equal(trained[name].cpu(), tensor), name


def test_two_process_export_equals_one_process(synthetic_data, tmp_path):
    one = tmp_path / "one.safetensors"
    export_embeddings.main(export_embeddings.Args(checkpoint="tiny", data=synthetic_data, out=one, device="cpu",
                                                  batch_size=16, seed=3))  # fmt: skip
    two = tmp_path / "two.safetensors"
    result = launch([str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                     str(REPO / "export_embeddings.py"), "--checkpoint", "tiny", "--data", str(synthetic_data),
                     "--out", str(two), "--device", "cpu", "--batch-size", "16", "--seed", "3"])  # fmt: skip
    assert result.stdout.count("wrote ") == 1  # rank 0 alone talks and writes
    torch.testing.assert_close(load_file(str(two))["item_embeddings"], load_file(str(one))["item_embeddings"],
                               atol=1e-5, rtol=0)  # fmt: skip
