"""Two-stage Recformer fine-tuning (finetune_recformer.py): on the built-in synthetic data (conftest's
`synthetic_data`, 300 users), on hand-built datasets, and on a slice of the real Amazon Scientific data (skipped when
../shared/data is absent)."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import finetune_recformer
from common.cli import FlagError
from common.data import load_dataset
from common.embeddings import load_item_embeddings
from common.evaluation import metric_names
from common.recformer_data import build_batch, dataset_item_tokens
from common.run import InputError
from prepare_data import write_dataset
from prepare_data import Lcrec, build_lcrec
from recformer.convert_recformer import load_backbone
from recformer.modeling_recformer import RecformerForSeqRec

SAMPLE_SIZE = 50
STEPS_PER_EPOCH = 38  # ceil(300 users / 8 per step) in the synthetic runs below
WARMUP_STEPS = 5
LR = 1e-3


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def short_run_args(data: Path, out: Path, **changes) -> finetune_recformer.Args:
    """Flags of a short CPU run: two epochs per stage, batches of 8 users, one per optimizer step."""
    flags = dict(
        data=data, backbone="tiny", out=out, epochs=2, patience=2, batch_size=8, grad_accum=1, lr=LR,
        warmup_steps=WARMUP_STEPS, sample_size=SAMPLE_SIZE, device="cpu", seed=0,
    )  # fmt: skip
    return finetune_recformer.Args(**{**flags, **changes})


@pytest.fixture(scope="module")
def two_stage_run(synthetic_data, tmp_path_factory):
    """Two epochs of each stage (38 optimizer steps each), a TensorBoard point after every optimizer step. One
    torch thread, as the tests get (conftest's one_thread starts after module fixtures), so that runs in the tests
    can be compared with it float for float whatever the machine's thread count."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune_recformer.main(short_run_args(synthetic_data, out, log_every=1))
    finally:
        torch.set_num_threads(threads)
    return out, records_of(out)


def random_ndcg10(candidates: int) -> float:
    """Expected NDCG@10 when the target's rank is uniform over `candidates` places."""
    return sum(1 / math.log2(rank + 2) for rank in range(10)) / candidates


def check_improves_over_untrained_and_random(records: list[dict]) -> None:
    untrained = records[0]
    assert (untrained["stage"], untrained["epoch"]) == (0, 0)
    best = max(r["NDCG@10"] for r in records if r["stage"] > 0)
    assert best > untrained["NDCG@10"]
    assert best > 1.5 * random_ndcg10(SAMPLE_SIZE + 1)


def test_finetuning_improves_over_untrained_and_random(two_stage_run):
    out, records = two_stage_run
    check_improves_over_untrained_and_random(records)
    assert [(r["stage"], r["epoch"], r.get("steps")) for r in records] == [
        (0, 0, None), (1, 1, 38), (1, 2, 76), (2, 1, 38), (2, 2, 76),
    ]  # fmt: skip
    for stage in ("stage1", "stage2"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "item_table.safetensors"} <= {
            p.name for p in (out / stage).iterdir()
        }


def test_stage1_refreshes_the_table_and_stage2_keeps_it(two_stage_run):
    out, records = two_stage_run
    stage1 = [r for r in records if r["stage"] == 1]
    stage2 = [r["item_table"] for r in records if r["stage"] == 2]
    assert len({r["item_table"] for r in stage1}) == 2
    assert len(stage2) == 2 and len(set(stage2)) == 1
    table = load_file(str(out / "stage2" / "item_table.safetensors"))["item_embeddings"]
    assert finetune_recformer.table_fingerprint(table) == stage2[0]
    # stage1/ holds the best stage-1 epoch with the table its validation used
    best = max(stage1, key=lambda r: r["NDCG@10"])
    table = load_file(str(out / "stage1" / "item_table.safetensors"))["item_embeddings"]
    assert finetune_recformer.table_fingerprint(table) == best["item_table"]


def fresh_evaluation(stage_dir: Path, data_dir: Path, split: str) -> dict:
    """`split` metrics of a stage directory, loaded afresh (weights and item table) into a new model."""
    data = load_dataset(data_dir, verbose=False)
    model, tokenizer = load_backbone(str(stage_dir), RecformerForSeqRec)
    model.set_item_table(load_item_embeddings(stage_dir / "item_table.safetensors", data))
    args = short_run_args(data_dir, None)
    return finetune_recformer.evaluate_split(finetune_recformer.prepare(args, data, model, tokenizer), split)


def test_the_stage_with_the_better_validation_is_reloaded_and_tested(two_stage_run, synthetic_data):
    out, records = two_stage_run
    best = {stage: max(r["NDCG@10"] for r in records if r["stage"] == stage) for stage in (1, 2)}
    chosen, other = (2, 1) if best[2] > best[1] else (1, 2)
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["stage"] == chosen and test["val_NDCG@10"] == best[chosen]
    fresh = fresh_evaluation(out / f"stage{chosen}", synthetic_data, "test")
    assert {name: test[name] for name in fresh} == fresh
    assert fresh_evaluation(out / f"stage{other}", synthetic_data, "test") != fresh  # the stages are told apart


def test_the_best_epoch_is_tested_when_later_ones_ran(synthetic_data, tmp_path, monkeypatch):
    """Validation NDCG@10 scripted so that stage 1's first epoch is the best of the run: the model in memory at the
    end (stage 2's last epoch) must not be the one tested, but stage1/ reloaded."""
    scripted = iter([0.0, 0.9, 0.1, 0.5, 0.6])  # untrained, stage 1 epochs 1-2, stage 2 epochs 1-2
    evaluate_split = finetune_recformer.evaluate_split

    def scripted_validation(run, split, sample_size=None):
        metrics = evaluate_split(run, split, sample_size)
        return {**metrics, "NDCG@10": next(scripted)} if split == "val" else metrics

    monkeypatch.setattr(finetune_recformer, "evaluate_split", scripted_validation)
    out = tmp_path / "run"
    finetune_recformer.main(short_run_args(synthetic_data, out, batch_size=32, tensorboard=False))
    assert [r["NDCG@10"] for r in records_of(out)] == [0.0, 0.9, 0.1, 0.5, 0.6]
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["stage"] == 1 and test["val_NDCG@10"] == 0.9
    monkeypatch.undo()
    fresh = fresh_evaluation(out / "stage1", synthetic_data, "test")
    assert {name: test[name] for name in fresh} == fresh
    assert fresh_evaluation(out / "stage2", synthetic_data, "test") != fresh


def test_a_validation_tie_tests_stage_1(synthetic_data, tmp_path):
    """With learning rate 0 nothing changes, so both stages validate alike: stage 1 is tested."""
    out = tmp_path / "run"
    finetune_recformer.main(short_run_args(synthetic_data, out, epochs=1, lr=0.0, max_steps=1, tensorboard=False))
    stage1, stage2 = (r["NDCG@10"] for r in records_of(out)[1:])
    assert stage1 == stage2
    assert json.loads((out / "test_metrics.json").read_text())["stage"] == 1


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The schedule's definition, as a fraction of --lr: linear warm-up from 0, then linear decay to 0 at
    total_steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@pytest.mark.parametrize("warmup_steps, total_steps, factors", [
    (3, 10, [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0, 0]),
    (0, 4, [1, 3 / 4, 2 / 4, 1 / 4, 0, 0]),
    (4, 4, [0, 1 / 4, 2 / 4, 3 / 4, 0, 0]),  # warm-up as long as the stage: it never reaches the peak
    (6, 3, [0, 1 / 6, 2 / 6]),  # warm-up longer than the stage: its 3 steps still warm up
])  # fmt: skip
def test_the_schedule_is_linear_warmup_then_decay(warmup_steps, total_steps, factors):
    """The learning rate at each optimizer step, as a fraction of --lr, written out by hand."""
    args = finetune_recformer.Args(lr=0.5, warmup_steps=warmup_steps)
    optimizer, schedule = finetune_recformer.optimizer_and_schedule(torch.nn.Linear(2, 2), args, total_steps)
    for factor in factors:
        assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(0.5 * factor, abs=1e-15)] * 2
        optimizer.step()
        schedule.step()


def test_tensorboard_curves_are_the_runs_metrics(two_stage_run, read_scalars):
    """x is the optimizer step within the stage; the untrained validation is step 0 of stage 1's curves."""
    out, records = two_stage_run
    scalars = read_scalars(out)
    for stage in (1, 2):
        epochs = [r for r in records if r["stage"] == stage]
        start = [(0, records[0])] if stage == 1 else []
        for name in metric_names():
            expected = [(step, r[name]) for step, r in start + [(r["steps"], r) for r in epochs]]
            assert scalars[f"stage{stage}/val/{name}"] == [(x, pytest.approx(y)) for x, y in expected]
        assert [x for x, _ in scalars[f"stage{stage}/train/sequences_per_s"]] == [r["steps"] for r in epochs]
        # one point per optimizer step (--log-every 1): the step's mean loss and the rate it used
        losses = scalars[f"stage{stage}/train/loss"]
        assert [x for x, _ in losses] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
        examples = [8] * (STEPS_PER_EPOCH - 1) + [300 - 8 * (STEPS_PER_EPOCH - 1)]  # per step of an epoch
        for epoch, r in enumerate(epochs):
            step_losses = [y for _, y in losses[epoch * STEPS_PER_EPOCH :][:STEPS_PER_EPOCH]]
            assert np.dot(step_losses, examples) / 300 == pytest.approx(r["train_loss"], rel=1e-6)
        lrs = [(x, y) for x, y in scalars[f"stage{stage}/train/lr"]]
        total = 2 * STEPS_PER_EPOCH
        assert lrs == [(x, pytest.approx(LR * lr_factor(x - 1, WARMUP_STEPS, total))) for x in range(1, total + 1)]
    test = json.loads((out / "test_metrics.json").read_text())
    assert {tag: points for tag, points in scalars.items() if tag.startswith("test/")} == {
        f"test/{name}": [(0, pytest.approx(test[name]))] for name in metric_names()
    }
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_training_examples_are_prefixes_of_their_own_users_training_part(tmp_path):
    """Every user's items are distinct from the others', so a label names its user; the history must be the items
    of that user's training part right before the label (at most max_items, left-padded), every position drawn."""
    lengths = [3, 4, 5, 6, 8, 9]  # training parts of 1 to 7 items (the last two items are val and test)
    write_dataset(tmp_path / "d", {f"u{u}": [f"u{u}-{i}" for i in range(n)] for u, n in enumerate(lengths)}, None)
    data = load_dataset(tmp_path / "d", verbose=False)
    owner = {int(item): row for row in range(data.num_users) for item in data.sequence(row)}
    max_items = 4
    drawn = set()
    for seed in range(60):
        histories, labels = finetune_recformer.training_examples(data, max_items, np.random.default_rng(seed))
        assert sorted(owner[int(label)] for label in labels) == list(range(data.num_users))  # each user once
        for history, label in zip(histories.tolist(), labels.tolist()):
            row = owner[label]
            training_part = data.sequence(row)[: data.train_len[row]].tolist()
            position = training_part.index(label)
            assert history == ([0] * max_items + training_part[:position])[-max_items:]
            drawn.add((row, position))
    assert drawn == {(row, p) for row in range(data.num_users) for p in range(data.train_len[row])}


def test_sequence_token_counts_are_build_batch_row_lengths(synthetic_data):
    data = load_dataset(synthetic_data, verbose=False)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    tokens = dataset_item_tokens(tokenizer, data)
    histories, _ = finetune_recformer.training_examples(data, 50, np.random.default_rng(0))
    batch = build_batch(tokens, histories, model.config)
    counts = finetune_recformer.sequence_token_counts(tokens, histories, model.config)
    assert counts.tolist() == batch["attention_mask"].sum(dim=1).tolist()
    assert batch["input_ids"].shape[1] == counts.max()


def brute_force_cost(lengths, budget, call_tokens):
    """Least padded tokens + call_tokens per chunk over every cut of the sorted lengths into consecutive chunks."""
    ordered = sorted(lengths)
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(ordered)]
        chunks = [ordered[a:b] for a, b in zip(bounds, bounds[1:])]
        if all(len(c) * c[-1] <= budget for c in chunks):
            best = min(best, sum(len(c) * c[-1] + call_tokens for c in chunks))
    return best


def test_token_budget_chunks_are_an_optimal_partition():
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 9)))
        budget, call_tokens = int(rng.integers(40, 120)), int(rng.integers(0, 30))
        chunks = finetune_recformer.token_budget_chunks(lengths, budget, call_tokens)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))
        assert all(len(c) * lengths[c].max() <= budget for c in chunks)
        assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(chunks, chunks[1:]))
        cost = sum(len(c) * lengths[c].max() + call_tokens for c in chunks)
        assert cost == brute_force_cost(lengths.tolist(), budget, call_tokens)
    chunks = finetune_recformer.token_budget_chunks(np.array([50, 3]), budget=10, call_tokens=0)
    assert [c.tolist() for c in chunks] == [[1], [0]]


def without_dropout(model: RecformerForSeqRec) -> None:
    """No dropout, so a gradient is deterministic and two computations of it can be compared."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    for layer in model.longformer.encoder.layer:
        layer.attention.self.dropout = 0.0


def first_step_gradients(run: finetune_recformer.FineTuning, seed: int) -> dict[str, torch.Tensor]:
    """The gradients backward_step leaves for the first optimizer step of an epoch whose training examples are
    drawn with `seed` (averaged over the processes on many)."""
    run.model.train()
    run.model.zero_grad(set_to_none=True)
    histories, labels = finetune_recformer.training_examples(run.data, run.max_items, np.random.default_rng(seed))
    step_rows = np.arange(min(run.examples_per_step, len(labels)))
    finetune_recformer.backward_step(run, histories, labels, step_rows, torch.zeros((), dtype=torch.float64))
    return {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None}


def test_a_step_averages_its_examples_however_they_are_grouped(synthetic_data):
    """One optimizer step's gradient is the gradient of the mean loss over its examples, as one call computes it."""
    data = load_dataset(synthetic_data, verbose=False)
    args = finetune_recformer.Args(data=synthetic_data, batch_size=4, grad_accum=3, device="cpu", seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    without_dropout(model)
    run = finetune_recformer.prepare(args, data, model, tokenizer)
    finetune_recformer.refresh_item_table(run)
    histories, labels = finetune_recformer.training_examples(data, 50, np.random.default_rng(0))
    step_rows = np.arange(12)
    assert len(finetune_recformer.length_groups(run, histories[step_rows])) > 1
    gradients = first_step_gradients(run, seed=0)
    model.zero_grad()
    model.train()
    loss = model.loss(model(**build_batch(run.tokens, histories[step_rows], model.config)),
                      torch.from_numpy(labels[step_rows]), 0)  # fmt: skip
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_max_steps_bounds_each_stage_and_nothing_is_encoded_twice(synthetic_data, tmp_path, monkeypatch):
    encodes = []
    original = finetune_recformer.encode_items
    monkeypatch.setattr(finetune_recformer, "encode_items", lambda *a, **k: encodes.append(1) or original(*a, **k))
    out = tmp_path / "run"
    finetune_recformer.main(short_run_args(synthetic_data, out, epochs=3, patience=3, grad_accum=2, max_steps=2))
    records = records_of(out)
    assert [(r["stage"], r["epoch"], r.get("steps")) for r in records] == [(0, 0, None), (1, 1, 2), (2, 1, 2)]
    # untrained evaluation (its table serves epoch 1 of stage 1 too), then the best stage-1 model's table
    assert len(encodes) == 2
    assert (out / "stage1" / "model.safetensors").exists() and (out / "test_metrics.json").exists()
    with pytest.raises(FlagError, match="--max-steps"):
        finetune_recformer.Args(data=synthetic_data, out=tmp_path / "bad", max_steps=0)


def test_stages_1_runs_and_tests_stage_1_only(synthetic_data, tmp_path, read_scalars):
    """Also the default TensorBoard interval: a training point every 10 optimizer steps of the stage."""
    out = tmp_path / "run"
    finetune_recformer.main(short_run_args(synthetic_data, out, epochs=1, max_steps=25, stages=1))
    records = records_of(out)
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 0), (1, 1)]
    assert (out / "stage1" / "model.safetensors").exists() and not (out / "stage2").exists()
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["stage"] == 1 and test["val_NDCG@10"] == records[1]["NDCG@10"]
    scalars = read_scalars(out)
    assert [x for x, _ in scalars["stage1/train/loss"]] == [x for x, _ in scalars["stage1/train/lr"]] == [10, 20]
    assert not any(tag.startswith("stage2/") for tag in scalars)


def test_a_seed_fixes_a_bounded_run_and_no_tensorboard_writes_none(synthetic_data, tmp_path):
    def metrics(out, tensorboard):
        args = short_run_args(synthetic_data, out, epochs=1, grad_accum=2, seed=5, max_steps=2, tensorboard=tensorboard)
        finetune_recformer.main(args)
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records_of(out)]

    assert metrics(tmp_path / "a", True) == metrics(tmp_path / "b", False)
    assert (tmp_path / "a" / "tensorboard").is_dir() and not (tmp_path / "b" / "tensorboard").exists()


USERS = 60
POPULAR_ITEMS = 150


@pytest.fixture(scope="module")
def scientific_slice(shared_data, tmp_path_factory):
    """LC-Rec Scientific cut to its POPULAR_ITEMS most popular items and the first USERS users left with at least 4
    of them: a slice small enough for a CPU test yet dense enough that two short epochs learn something."""
    folder = shared_data / "scientific"
    sequences, meta = build_lcrec(Lcrec(folder / "Scientific.inter.json", folder / "Scientific.item.json", out=None))
    popular = {item for item, _ in Counter(i for s in sequences.values() for i in s).most_common(POPULAR_ITEMS)}
    kept = ([item for item in sequence if item in popular] for sequence in sequences.values())
    long_enough = itertools.islice((sequence for sequence in kept if len(sequence) >= 4), USERS)
    users = {str(user): sequence for user, sequence in enumerate(long_enough)}
    used = {item for sequence in users.values() for item in sequence}
    out = tmp_path_factory.mktemp("scientific") / "scientific_slice"
    write_dataset(out, users, {key: text for key, text in meta.items() if key in used})
    return out


def test_finetuning_on_real_item_text_improves_over_untrained_and_random(scientific_slice, tmp_path):
    out = tmp_path / "run"
    finetune_recformer.main(short_run_args(scientific_slice, out, batch_size=4, tensorboard=False))
    check_improves_over_untrained_and_random(records_of(out))


TIMING = ("train_seconds", "val_seconds", "test_seconds")


def without_timings(record: dict) -> dict:
    """A metrics.jsonl or test_metrics.json record without its timing fields (nested per protocol too)."""
    return {
        key: without_timings(value) if isinstance(value, dict) else value
        for key, value in record.items()
        if key not in TIMING
    }


class Killed(Exception):
    """Stands for the end of a process: raised from inside the run, caught by the test."""


@pytest.mark.parametrize(
    "kill_at, before_saving",
    [((1, 1), False), ((2, 2), True)],
    ids=["after-stage1-epoch1", "during-stage2-epoch2-before-its-resume-point"],
)
def test_resumed_finetuning_equals_the_uninterrupted_run(
    two_stage_run, synthetic_data, tmp_path, kill_at, before_saving
):
    """A run killed after an epoch (or between an epoch's metrics line and its resume point, which leaves one line
    too many) and resumed gives the uninterrupted run's metrics, test metrics and stage checkpoints."""
    reference, reference_records = two_stage_run
    out = tmp_path / "run"
    save = finetune_recformer.save_resume_point

    def killed_at_point(run, run_dir, point, *rest):
        if (point["stage"], point["epoch"]) == kill_at and before_saving:
            raise Killed
        save(run, run_dir, point, *rest)
        if (point["stage"], point["epoch"]) == kill_at:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_recformer, "save_resume_point", killed_at_point)
        with pytest.raises(Killed):
            finetune_recformer.main(short_run_args(synthetic_data, out, log_every=1))
    assert not (out / "test_metrics.json").exists() and (out / "resume.pt").exists()
    with pytest.raises(InputError, match="other settings than the run's"):
        finetune_recformer.main(short_run_args(synthetic_data, out, resume=True, lr=2 * LR, log_every=1))
    finetune_recformer.main(short_run_args(synthetic_data, out, resume=True, log_every=1))

    assert [without_timings(r) for r in records_of(out)] == [without_timings(r) for r in reference_records]
    test, reference_test = (json.loads((d / "test_metrics.json").read_text()) for d in (out, reference))
    assert without_timings(test) == without_timings(reference_test)
    for stage in ("stage1", "stage2"):
        for name in ("model.safetensors", "item_table.safetensors"):
            got, expected = load_file(out / stage / name), load_file(reference / stage / name)
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), (stage, name)
    assert not (out / "resume.pt").exists()  # a finished run keeps its stage checkpoints only


def test_validation_on_a_seeded_user_subset_and_test_on_every_user(synthetic_data, tmp_path):
    data = load_dataset(synthetic_data)
    subset = finetune_recformer.validation_subset(data, 40, seed=0)
    assert len(set(subset)) == 40 and data.has_val[subset].all() and (np.diff(subset) > 0).all()
    assert np.array_equal(subset, finetune_recformer.validation_subset(data, 40, seed=0))
    assert not np.array_equal(subset, finetune_recformer.validation_subset(data, 40, seed=1))
    assert finetune_recformer.validation_subset(data, data.num_users, seed=0) is None  # every user anyway

    out = tmp_path / "run"
    run = finetune_recformer.main(
        short_run_args(synthetic_data, out, epochs=1, stages=1, val_users=40, test_sample_sizes=(-1,))
    )
    records, test = records_of(out), json.loads((out / "test_metrics.json").read_text())
    assert [r["users"] for r in records] == [40, 40]
    assert np.array_equal(run.val_users, subset)
    assert test["users"] == int(data.has_test.sum())
    assert set(test["by_protocol"]) == {f"sampled-{SAMPLE_SIZE}", "full ranking"}
    assert without_timings(test["by_protocol"][f"sampled-{SAMPLE_SIZE}"]) == without_timings(
        {k: test[k] for k in test if k not in ("stage", "val_NDCG@10", "by_protocol")}
    )
    # the full-ranking test equals a zero-shot evaluation of the chosen model under full ranking
    full = finetune_recformer.evaluate_split(run, "test", -1)
    assert without_timings(test["by_protocol"]["full ranking"]) == full
