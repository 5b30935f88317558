"""The training loop of train_sasrec.py and train_bert4rec.py: the test metrics are those of the best validation
epoch's checkpoint, and the TensorBoard scalars are the values metrics.jsonl and test_metrics.json hold."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_bert4rec
import train_sasrec
from common.data import load_dataset
from common.evaluation import metric_names

SCRIPTS = {"sasrec": (train_sasrec, train_sasrec.SASRec), "bert4rec": (train_bert4rec, train_bert4rec.BERT4Rec)}

# The validation NDCG@10 each epoch reports: the best is epoch 2 of 5, whatever the trajectory (the other metrics
# are the model's real ones). Patience = epochs lets the run go on after it.
VAL_NDCG10 = [0.2, 0.5, 0.3, 0.4, 0.1]
BEST_EPOCH = 1 + VAL_NDCG10.index(max(VAL_NDCG10))


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(SCRIPTS))
def best_not_last(request, synthetic_data, tmp_path_factory):
    """(script, model class, Args, weights) of a finished 5-epoch run that trains for real but whose validation
    NDCG@10 follows VAL_NDCG10. weights: the model's weights at each epoch's validation ({epoch: state}) and at
    the test ({"test": state}). 300 users / batch 128 = 3 steps per epoch = log_every, so each train/loss point is
    the mean loss of one epoch."""
    script, model_class = SCRIPTS[request.param]
    args = script.Args(
        data=synthetic_data,
        out=tmp_path_factory.mktemp(request.param) / "run",
        hidden_size=16,
        num_heads=2,
        epochs=len(VAL_NDCG10),
        patience=len(VAL_NDCG10),
        batch_size=128,
        sample_size=20,
        log_every=3,
        lr=1e-2,
        max_len=10,
        device="cpu",
    )
    evaluate_split, weights, epochs = script.evaluate_split, {}, iter(range(1, len(VAL_NDCG10) + 1))

    def scripted_validation(model, data, split, *rest):
        metrics = evaluate_split(model, data, split, *rest)
        if split == "test":
            weights["test"] = copy_state(model)
            return metrics
        epoch = next(epochs)
        weights[epoch] = copy_state(model)
        return {**metrics, "NDCG@10": VAL_NDCG10[epoch - 1]}

    # One thread as in the test functions (conftest's one_thread runs after module fixtures), so the test's
    # re-evaluation of best.pt sums in the same order as the run's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(script, "evaluate_split", scripted_validation)
        script.main(args)
    torch.set_num_threads(threads)
    return script, model_class, args, weights


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl's records and test_metrics.json."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((run_dir / "test_metrics.json").read_text())


def as_logged(value: float) -> float:
    """A value as a TensorBoard event stores it (float32)."""
    return float(np.float32(value))


def test_test_metrics_come_from_the_reloaded_best_checkpoint(best_not_last):
    script, model_class, args, weights = best_not_last
    lines, test = read_run(args.out)
    assert [line["NDCG@10"] for line in lines] == VAL_NDCG10  # the run went on after its best epoch
    assert test["best_epoch"] == BEST_EPOCH
    assert test["val_NDCG@10"] == max(VAL_NDCG10)
    checkpoint = torch.load(args.out / "best.pt", weights_only=True)
    assert checkpoint["epoch"] == BEST_EPOCH
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(tensor, weights[BEST_EPOCH][name])  # best.pt holds the best epoch's weights
        assert torch.equal(tensor, weights["test"][name])  # and the test scored them
    last = weights[len(VAL_NDCG10)]
    assert any(not torch.equal(tensor, last[name]) for name, tensor in checkpoint["model"].items())
    data = load_dataset(args.data)
    model = model_class(data.num_items, args)
    model.load_state_dict(checkpoint["model"])
    expected = script.evaluate_split(model, data, "test", args, torch.device("cpu"))
    assert {name: test[name] for name in expected} == expected


def test_tensorboard_holds_the_logged_values(best_not_last, read_scalars):
    _, _, args, _ = best_not_last
    lines, test = read_run(args.out)
    scalars = read_scalars(args.out)
    data = load_dataset(args.data)
    assert (data.train_len >= 2).all()  # every user is a training sequence of both models
    assert math.ceil(data.num_users / args.batch_size) == args.log_every
    # Every curve's x is the global optimizer step: epoch e ends at step e * log_every here. Each train/loss point
    # is the mean loss since the previous one, here one epoch's.
    end_of = {line["epoch"]: line["epoch"] * args.log_every for line in lines}
    for name in metric_names():
        assert scalars[f"val/{name}"] == [(end_of[line["epoch"]], as_logged(line[name])) for line in lines]
        assert scalars[f"test/{name}"] == [(end_of[test["best_epoch"]], as_logged(test[name]))]
    assert scalars["train/loss"] == [(end_of[line["epoch"]], as_logged(line["train_loss"])) for line in lines]
    assert scalars["train/lr"] == [(step, as_logged(args.lr)) for step, _ in scalars["train/loss"]]
    throughput = scalars["train/sequences_per_s"]
    assert [step for step, _ in throughput] == [end_of[line["epoch"]] for line in lines]
    assert all(value > 0 for _, value in throughput)
    assert hyperparameters(args.out) == {"lr": args.lr, "epochs": args.epochs, "data": str(args.data),
                                         "embeddings": "None", "tensorboard": True}  # fmt: skip


def hyperparameters(run_dir: Path) -> dict:
    """A few of the hyperparameters in the run's TensorBoard events (HPARAMS tab), as numbers, text or booleans."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = HParamsPluginData.FromString(content).session_start_info.hparams
    return {name: getattr(values[name], values[name].WhichOneof("kind"))
            for name in ("lr", "epochs", "data", "embeddings", "tensorboard")}  # fmt: skip


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_loss_points_count_steps_across_epochs(name, synthetic_data, tmp_path, read_scalars):
    script = SCRIPTS[name][0]
    args = script.Args(
        data=synthetic_data,
        out=tmp_path / "run",
        hidden_size=8,
        num_blocks=1,
        num_heads=2,
        epochs=2,
        batch_size=64,
        sample_size=20,
        log_every=4,
        device="cpu",
    )
    script.main(args)
    # 300 users / 64 = 5 steps per epoch; points at steps 4 and 8, the second spanning both epochs.
    assert [step for step, _ in read_scalars(args.out)["train/loss"]] == [4, 8]
