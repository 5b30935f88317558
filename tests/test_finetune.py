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
from common.data import load_dataset, write_dataset
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
