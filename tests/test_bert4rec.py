"""BERT4Rec: the block against a hand-written reference of the paper's formulas, bidirectionality, padding invariance,
cloze-masking statistics, the evaluation scorer, learning on real data, the run directory and the command line (the
training loop's checkpoint and TensorBoard logs: test_seqrec_training.py)."""

import json

import numpy as np
import torch

from common.cli import parse
from common.data import PAD
from train_bert4rec import LAST_ONLY_PROB, Args, BERT4Rec, BidirectionalBlock, cloze_mask, main


def tiny_model(num_items=30, max_len=12) -> BERT4Rec:
    torch.manual_seed(0)
    return BERT4Rec(num_items, Args(hidden_size=16, num_blocks=2, num_heads=2, dropout=0.0, max_len=max_len)).eval()


def left_padded(rows: list[list[int]], length: int) -> torch.Tensor:
    return torch.tensor([[PAD] * (length - len(r)) + r for r in rows])


def reference_block(block: BidirectionalBlock, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The paper's block written out: explicit softmax with padding keys at -1e9, post-LN sublayers."""
    batch, length, dim = x.shape
    heads, width = block.heads, dim // block.heads
    q, k, v = block.in_proj(x).split(dim, dim=-1)
    split = lambda t: t.reshape(batch, length, heads, width).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / width**0.5
    scores = scores.masked_fill(~real[:, None, None, :], -1e9)
    attended = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, dim)
    x = block.attn_norm(x + block.out_proj(attended))
    return block.ff_norm(x + block.ff(x))


def test_block_matches_the_written_out_reference_at_real_positions():
    torch.manual_seed(0)
    block = BidirectionalBlock(16, 4, dropout=0.0).eval()
    x = torch.randn(2, 6, 16)
    seqs = left_padded([[1, 2, 3, 4, 5, 6], [7, 8, 9]], 6)
    from common.seqrec import attention_mask

    with torch.no_grad():
        got = block(x, attention_mask(seqs, causal=False))
        expected = reference_block(block, x, seqs != PAD)
    real = seqs != PAD
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_every_position_sees_the_whole_sequence_but_no_padding():
    model = tiny_model()
    seqs = left_padded([[3, 4, 5, 6, 7, 8], [9, 10, 11]], 12)
    changed = seqs.clone()
    changed[:, -1] = torch.tensor([20, 21])
    with torch.no_grad():
        before, after, narrow = model(seqs), model(changed), model(left_padded([[3, 4, 5, 6, 7, 8], [9, 10, 11]], 6))
        newest = model(seqs, last_only=True)
        model.token_emb.weight[PAD] = torch.randn(16)
        other_pad = model(seqs)
    assert not torch.allclose(before[0, -6], after[0, -6])  # bidirectional: the first item sees the last
    torch.testing.assert_close(before[0, -6:], narrow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before[1, -3:], narrow[1, -3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before[:, -3:], other_pad[:, -3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(newest[:, -1], before[:, -1], atol=1e-5, rtol=1e-5)


def test_cloze_masking_statistics():
    num_items, mask_token, prob = 1000, 1001, 0.15
    torch.manual_seed(0)
    lengths = torch.randint(1, 41, (20000,))
    columns = torch.arange(40)
    tokens = torch.randint(1, num_items + 1, (20000, 40)).masked_fill(columns < 40 - lengths[:, None], PAD)
    inputs, labels = cloze_mask(tokens, prob, mask_token, num_items)

    chosen = labels != PAD
    assert (labels[chosen] == tokens[chosen]).all() and not chosen[tokens == PAD].any()
    assert (inputs[tokens == PAD] == PAD).all() and (inputs[~chosen] == tokens[~chosen]).all()

    def near(observed: float, expected: float, n: int) -> bool:
        return abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / n)

    # Rows that predict only their newest item, through the mask token; a 15%-row does so with negligible odds.
    last_only = (chosen.sum(1) == 1) & chosen[:, -1] & (inputs[:, -1] == mask_token) & (lengths > 20)
    long_rows = lengths > 20
    assert near(last_only[long_rows].float().mean().item(), LAST_ONLY_PROB, int(long_rows.sum()))

    regular = ~((chosen.sum(1) == 1) & chosen[:, -1] & (inputs[:, -1] == mask_token))
    real = (tokens != PAD) & regular[:, None]
    rate = chosen[real].float().mean().item()
    assert near(rate, prob, int(real.sum()))
    picked_inputs, picked_tokens = inputs[chosen & real], tokens[chosen & real]
    n = len(picked_inputs)
    as_mask = (picked_inputs == mask_token).float().mean().item()
    as_random = ((picked_inputs != mask_token) & (picked_inputs != picked_tokens)).float().mean().item()
    kept = (picked_inputs == picked_tokens).float().mean().item()
    assert near(as_mask, 0.8, n) and near(as_random, 0.1 * (1 - 1 / num_items), n) and near(kept, 0.1, n)


def test_learns_on_scientific(scientific, tmp_path):
    args = Args(data=scientific, out=tmp_path / "run", hidden_size=64, lr=1e-3, epochs=2, device="cpu")
    main(args)
    best_val = max(
        json.loads(line)["NDCG@10"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    )
    assert best_val > 0.09  # twice random (sampled-100 NDCG@10 of a random ranking is about 0.045)


def test_run_directory_and_full_ranking(synthetic_data, tmp_path):
    args = Args(
        data=synthetic_data,
        out=tmp_path / "run",
        hidden_size=16,
        num_heads=2,
        epochs=2,
        sample_size=-1,
        max_len=10,
        device="cpu",
        tensorboard=False,
    )
    test = main(args)
    run_dir = tmp_path / "run"
    # --no-tensorboard: no tensorboard/ (runs with it: test_seqrec_training.py)
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "metrics.jsonl", "test_metrics.json"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    for key in [f"{m}@{k}" for m in ("HR", "NDCG") for k in (1, 5, 10, 20, 50)] + ["MRR"]:
        assert saved[key] == test[key]


def test_command_line_names():
    """The flags as the script's own parser (common.cli.parse: tyro plus the flag rules) reads them."""
    args = parse(
        Args,
        args=[
            "--init-type",
            "plm",
            "--no-freeze-embeddings",
            "--mask-prob",
            "0.2",
            "--sample-size",
            "-1",
            "--project",
            "pca",
            "--log-every",
            "5",
            "--no-tensorboard",
        ],
    )
    assert (args.init_type, args.freeze_embeddings, args.mask_prob, args.sample_size) == ("plm", False, 0.2, -1)
    assert (args.log_every, args.tensorboard) == (5, False) and Args().tensorboard
    assert Args().freeze_embeddings and Args().num_heads == 4 and Args().batch_size == 256
