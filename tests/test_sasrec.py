"""SASRec: the block against torch's MultiheadAttention (the paper's layer), causality, padding invariance, negatives,
losses against brute force, learning on real data, the run directory and the command line (the training loop's
checkpoint and TensorBoard logs: test_seqrec_training.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import parse
from common.data import PAD, load_dataset
from common.seqrec import hidden_at, last_hidden
from prepare_data import write_dataset
from train_sasrec import (
    Args,
    CausalBlock,
    SASRec,
    ce_loss,
    draw_negatives,
    main,
    next_item_pairs,
    training_history_keys,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_model(num_items=30, max_len=12, **overrides) -> SASRec:
    torch.manual_seed(0)
    args = Args(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.0, max_len=max_len, **overrides)
    return SASRec(num_items, args).eval()


def left_padded(rows: list[list[int]], length: int) -> torch.Tensor:
    return torch.tensor([[PAD] * (length - len(r)) + r for r in rows])


def test_block_matches_torch_multihead_attention_as_the_paper_uses_it():
    torch.manual_seed(0)
    block = CausalBlock(16, 2, dropout=0.0).eval()
    torch.nn.init.normal_(block.in_proj.bias)
    torch.nn.init.normal_(block.out_proj.bias)
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    reference.in_proj_weight.data.copy_(block.in_proj.weight)
    reference.in_proj_bias.data.copy_(block.in_proj.bias)
    reference.out_proj.weight.data.copy_(block.out_proj.weight)
    reference.out_proj.bias.data.copy_(block.out_proj.bias)
    x = torch.randn(3, 7, 16)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        query = block.attn_norm(x)
        attended, _ = reference(query, x, x, attn_mask=~causal)  # torch: True = may NOT attend
        expected = block.ff_norm(query + attended)
        expected = expected + block.ff(expected)
        got = block(x, causal.expand(3, 1, 7, 7))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_output_at_t_ignores_later_items():
    model = tiny_model()
    seqs = left_padded([[3, 4, 5, 6, 7, 8], [9, 10, 11]], 12)
    changed = seqs.clone()
    changed[:, -2:] = torch.tensor([[20, 21], [22, 23]])
    with torch.no_grad():
        before, after = model(seqs), model(changed)
    torch.testing.assert_close(before[:, :-2], after[:, :-2])
    assert not torch.allclose(before[:, -1], after[:, -1])


def test_left_padding_changes_no_output():
    model = tiny_model()
    histories = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    with torch.no_grad():
        wide = model(left_padded(histories, 12))
        narrow = model(left_padded(histories, 6))
        model.item_emb.weight[PAD] = torch.randn(16)  # the padding vector must not matter either
        wide_other_pad = model(left_padded(histories, 12))
    torch.testing.assert_close(wide[0, -6:], narrow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide[1, -3:], narrow[1, -3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide[0, -6:], wide_other_pad[0, -6:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(wide).all()


def test_length_chunks_give_the_same_outputs_as_one_padded_batch():
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 13, (40,), generator=generator)
    seqs = torch.stack(
        [
            torch.cat([torch.zeros(12 - n, dtype=torch.long), torch.randint(1, 31, (n,), generator=generator)])
            for n in lengths
        ]
    )
    keep = (seqs != PAD) & (torch.rand(seqs.shape, generator=generator) < 0.5)
    with torch.no_grad():
        full = model(seqs)
        hidden, index = hidden_at(model, seqs, keep, chunk_rows=7)
        last = last_hidden(model, seqs, chunk_rows=7)
    torch.testing.assert_close(hidden, full.reshape(-1, 16)[index], atol=1e-5, rtol=1e-5)
    assert sorted(index.tolist()) == np.flatnonzero(keep.reshape(-1).numpy()).tolist()
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    sequences = {"u1": ["a", "b", "c", "d", "e"], "u2": ["b", "a"], "u3": ["c", "f", "g"], "u4": ["h", "a", "b", "c"]}
    out = tmp_path_factory.mktemp("toy") / "toy"
    write_dataset(out, sequences, None)
    return load_dataset(out)


def test_next_item_pairs_by_hand(toy):
    # ids by first appearance: a1 b2 c3 d4 e5 f6 g7 h8
    # training parts: u1 [a b c], u2 [b a] (< 3 items), u3 [c], u4 [h a]
    rows, inputs, targets = next_item_pairs(toy, max_len=3)
    assert rows.tolist() == [0, 1, 3]  # u3 has one training item: nothing to predict
    assert inputs.tolist() == [[0, 1, 2], [0, 0, 2], [0, 0, 8]]
    assert targets.tolist() == [[0, 2, 3], [0, 0, 1], [0, 0, 1]]


def test_history_keys_and_negatives_avoid_each_users_training_items(toy):
    keys = training_history_keys(toy)
    stride = toy.num_items + 1
    expected = sorted(
        r * stride + i for r in range(toy.num_users) for i in set(toy.sequence(r)[: toy.train_len[r]].tolist())
    )
    assert keys.tolist() == expected
    users = torch.tensor([0, 3]).repeat(2000)
    targets = torch.tensor([[0, 5, 5], [0, 0, 5]]).repeat(2000, 1)
    torch.manual_seed(0)
    negatives = draw_negatives(users, targets, keys, toy.num_items)
    assert (negatives[targets == PAD] == PAD).all()
    for row, history in ((0, {1, 2, 3}), (3, {8, 1})):
        drawn = negatives[(users == row)[:, None] & (targets != PAD)]
        allowed = sorted(set(range(1, stride)) - history)
        assert set(drawn.tolist()) == set(allowed)
        counts = np.bincount(drawn.numpy(), minlength=stride)[allowed]
        expected_count = len(drawn) / len(allowed)
        assert np.all(np.abs(counts - expected_count) < 6 * np.sqrt(expected_count))


def test_ce_loss_is_softmax_over_items_without_padding():
    generator = torch.Generator().manual_seed(0)
    hidden, table = torch.randn(5, 4, generator=generator), torch.randn(8, 4, generator=generator)
    targets = torch.tensor([1, 7, 3, 3, 2])
    logits = hidden.numpy() @ table.numpy()[1:].T
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean(log_softmax[np.arange(5), targets.numpy() - 1])
    assert ce_loss(hidden, table, targets).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_learns_on_scientific(scientific, tmp_path, loss):
    args = Args(
        data=scientific,
        out=tmp_path / "run",
        hidden_size=64,
        dropout=0.2,
        lr=1e-3,
        epochs=2,
        sample_size=100,
        loss=loss,
        device="cpu",
    )
    main(args)
    best_val = max(
        json.loads(line)["NDCG@10"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    )
    assert best_val > 0.09  # twice random (sampled-100 NDCG@10 of a random ranking is about 0.045)


def test_run_directory_and_determinism(synthetic_data, tmp_path):
    def run(name, tensorboard):
        args = Args(
            data=synthetic_data,
            out=tmp_path / name,
            hidden_size=16,
            num_heads=2,
            epochs=3,
            patience=2,
            sample_size=20,
            device="cpu",
            tensorboard=tensorboard,
        )
        return main(args)

    first, second = run("a", tensorboard=True), run("b", tensorboard=False)
    assert first == second  # TensorBoard logging changes no result
    run_dir = tmp_path / "a"
    listing = ["best.pt", "config.json", "metrics.jsonl", "tensorboard", "test_metrics.json"]
    assert sorted(p.name for p in run_dir.iterdir()) == listing
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [name for name in listing if name != "tensorboard"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["loss"] == "auto"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 2
    test = json.loads((run_dir / "test_metrics.json").read_text())
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    best_epoch = max(lines, key=lambda line: line["NDCG@10"])["epoch"]
    assert checkpoint["epoch"] == best_epoch == test["best_epoch"]


def test_command_line_names():
    """The flags as the script's own parser (common.cli.parse: tyro plus the flag rules) reads them."""
    args = parse(
        Args,
        args=[
            "--data",
            "d",
            "--out",
            "o",
            "--init-type",
            "plm",
            "--embeddings",
            "e.safetensors",
            "--sample-size",
            "100",
            "--epochs",
            "3",
            "--patience",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "0.01",
            "--hidden-size",
            "32",
            "--num-blocks",
            "1",
            "--num-heads",
            "2",
            "--dropout",
            "0.1",
            "--max-len",
            "20",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--loss",
            "bce",
            "--freeze-embeddings",
            "--project",
            "pca",
            "--log-every",
            "5",
            "--no-tensorboard",
        ],
    )
    assert (args.init_type, args.sample_size, args.loss, args.freeze_embeddings, args.project) == (
        "plm",
        100,
        "bce",
        True,
        "pca",
    )
    assert (args.log_every, args.tensorboard) == (5, False) and Args().tensorboard


def test_bad_dataset_is_a_one_line_error_without_output(tmp_path):
    result = subprocess.run(
        [sys.executable, "train_sasrec.py", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr
    assert not (tmp_path / "run").exists()
