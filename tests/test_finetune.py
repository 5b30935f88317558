"""Two-stage Recformer fine-tuning (finetune_recformer.py) on a slice of the real Amazon Scientific data."""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import export_embeddings
import finetune_recformer
from common.cli import FlagError
from common.convert_recformer import load_backbone
from common.data import load_dataset, write_dataset
from common.modeling_recformer import RecformerForSeqRec
from common.tokenization_recformer import build_batch, dataset_item_tokens, sequence_token_counts, token_budget_chunks
from prepare_data import Lcrec, build_lcrec

USERS = 60
POPULAR_ITEMS = 150
SAMPLE_SIZE = 50


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


@pytest.fixture(scope="module")
def run(scientific_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    args = finetune_recformer.Args(
        data=scientific_slice, backbone="tiny", out=out, epochs=2, patience=2, batch_size=4, grad_accum=1, lr=1e-3,
        warmup_steps=5, sample_size=SAMPLE_SIZE, device="cpu", seed=0,
    )  # fmt: skip
    finetune_recformer.main(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def random_ndcg10(candidates: int) -> float:
    """Expected NDCG@10 when the target's rank is uniform over `candidates` places."""
    return sum(1 / math.log2(rank + 2) for rank in range(10)) / candidates


def test_finetuning_improves_over_untrained_and_random(run):
    out, records = run
    untrained = records[0]
    assert (untrained["stage"], untrained["epoch"]) == (0, 0)
    best = max(r["NDCG@10"] for r in records if r["stage"] > 0)
    assert best > untrained["NDCG@10"]
    assert best > 1.5 * random_ndcg10(SAMPLE_SIZE + 1)
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["users"] > 0 and test["stage"] in (1, 2)
    assert test["val_NDCG@10"] == pytest.approx(best)
    for stage in ("stage1", "stage2"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "item_table.safetensors"} <= {
            p.name for p in (out / stage).iterdir()
        }


def test_stage1_refreshes_the_table_and_stage2_keeps_it(run):
    out, records = run
    stage1 = [r["item_table"] for r in records if r["stage"] == 1]
    stage2 = [r["item_table"] for r in records if r["stage"] == 2]
    assert len(stage1) == 2 and len(set(stage1)) == 2
    assert len(stage2) >= 1 and len(set(stage2)) == 1
    table = load_file(str(out / "stage2" / "item_table.safetensors"))["item_embeddings"]
    assert finetune_recformer.table_fingerprint(table) == stage2[0]


def test_export_of_stage1_equals_the_stage2_table(run, scientific_slice, tmp_path):
    """Stage 2 trains against the table the best stage-1 encoder produces: export must write exactly those rows."""
    out, _ = run
    target = tmp_path / "plm.safetensors"
    export_embeddings.main(
        export_embeddings.Args(checkpoint=str(out / "stage1"), data=scientific_slice, out=target, device="cpu")
    )
    exported = load_file(str(target))["item_embeddings"]
    table = load_file(str(out / "stage2" / "item_table.safetensors"))["item_embeddings"]
    assert exported.shape == (load_dataset(scientific_slice, verbose=False).num_items + 1, 64)
    torch.testing.assert_close(exported, table, atol=1e-6, rtol=0)
    assert torch.count_nonzero(exported[0]) == 0


def test_training_examples_take_a_random_prefix(scientific_slice):
    data = load_dataset(scientific_slice, verbose=False)
    histories, labels = finetune_recformer.training_examples(data, 50, np.random.default_rng(0))
    assert len(labels) == data.num_users
    for history, label in zip(histories[:40], labels[:40]):
        items = history[history > 0].tolist()
        sequences = [data.sequence(r)[: data.train_len[r]].tolist() for r in range(data.num_users)]
        assert any(seq[: len(items) + 1] == items + [label] for seq in sequences)


def test_sequence_token_counts_are_build_batch_row_lengths(scientific_slice):
    data = load_dataset(scientific_slice, verbose=False)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    tokens = dataset_item_tokens(tokenizer, data)
    histories, _ = finetune_recformer.training_examples(data, 50, np.random.default_rng(0))
    batch = build_batch(tokens, histories, model.config)
    counts = sequence_token_counts(tokens, histories, model.config)
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
        chunks = token_budget_chunks(lengths, budget, call_tokens)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))
        assert all(len(c) * lengths[c].max() <= budget for c in chunks)
        assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(chunks, chunks[1:]))
        cost = sum(len(c) * lengths[c].max() + call_tokens for c in chunks)
        assert cost == brute_force_cost(lengths.tolist(), budget, call_tokens)
    assert [c.tolist() for c in token_budget_chunks(np.array([50, 3]), budget=10, call_tokens=0)] == [[1], [0]]


def without_dropout(model: RecformerForSeqRec) -> None:
    """No dropout, so a gradient is deterministic and two computations of it can be compared."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    for layer in model.longformer.encoder.layer:
        layer.attention.self.dropout = 0.0


def first_step_gradients(trainer: finetune_recformer.Trainer, seed: int) -> dict[str, torch.Tensor]:
    """The gradients train_epoch applies in its first optimizer step (training examples drawn with `seed`); an SGD
    step with learning rate 0 leaves the weights as they were."""
    trainer.rng = np.random.default_rng(seed)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    gradients = {}

    def keep_gradients(*_):
        gradients.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    optimizer.register_step_pre_hook(keep_gradients)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.train_epoch(optimizer, schedule, "test", max_steps=1)
    return gradients


def test_a_step_averages_its_examples_however_they_are_grouped(scientific_slice):
    """One optimizer step's gradient is the gradient of the mean loss over its examples, as one call computes it."""
    data = load_dataset(scientific_slice, verbose=False)
    args = finetune_recformer.Args(data=scientific_slice, batch_size=4, grad_accum=3, device="cpu", seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    without_dropout(model)
    trainer = finetune_recformer.Trainer(args, data, model, tokenizer)
    trainer.refresh_table()
    histories, labels = finetune_recformer.training_examples(data, 50, np.random.default_rng(0))
    step_rows = np.arange(12)
    assert len(trainer.chunks(histories[step_rows])) > 1
    gradients = first_step_gradients(trainer, seed=0)
    model.zero_grad()
    model.train()
    loss = model.loss(trainer.encode(histories[step_rows]), torch.from_numpy(labels[step_rows]), 0)
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_max_steps_bounds_each_stage_and_nothing_is_encoded_twice(scientific_slice, tmp_path, monkeypatch):
    encodes = []
    original = finetune_recformer.encode_items
    monkeypatch.setattr(finetune_recformer, "encode_items", lambda *a, **k: encodes.append(1) or original(*a, **k))
    out = tmp_path / "run"
    args = finetune_recformer.Args(
        data=scientific_slice, backbone="tiny", out=out, epochs=3, patience=3, batch_size=4, grad_accum=2,
        warmup_steps=1, sample_size=SAMPLE_SIZE, device="cpu", seed=0, max_steps=2,
    )  # fmt: skip
    finetune_recformer.main(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r.get("steps")) for r in records] == [(0, 0, None), (1, 1, 2), (2, 1, 2)]
    # untrained evaluation (its table serves epoch 1 of stage 1 too), then the best stage-1 model's table
    assert len(encodes) == 2
    assert (out / "stage1" / "model.safetensors").exists() and (out / "test_metrics.json").exists()
    with pytest.raises(FlagError, match="--max-steps"):
        finetune_recformer.Args(data=scientific_slice, out=tmp_path / "bad", max_steps=0)


def test_stages_1_runs_and_tests_stage_1_only(scientific_slice, tmp_path):
    out = tmp_path / "run"
    args = finetune_recformer.Args(
        data=scientific_slice, backbone="tiny", out=out, epochs=1, batch_size=4, grad_accum=2, warmup_steps=1,
        sample_size=SAMPLE_SIZE, device="cpu", seed=0, max_steps=1, stages=1,
    )  # fmt: skip
    finetune_recformer.main(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 0), (1, 1)]
    assert (out / "stage1" / "model.safetensors").exists() and not (out / "stage2").exists()
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["stage"] == 1 and test["val_NDCG@10"] == records[1]["NDCG@10"]


def test_a_seed_fixes_a_bounded_run(scientific_slice, tmp_path):
    def metrics(out):
        args = finetune_recformer.Args(
            data=scientific_slice, backbone="tiny", out=out, epochs=1, batch_size=4, grad_accum=2, warmup_steps=1,
            sample_size=SAMPLE_SIZE, device="cpu", seed=5, max_steps=2,
        )  # fmt: skip
        finetune_recformer.main(args)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in lines]

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
