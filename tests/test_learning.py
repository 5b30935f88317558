"""The recommenders learn, on data a clean clone makes itself: SASRec and BERT4Rec beat a popularity ranker on the
synthetic catalogue (topics drive how users move between items, so the next item is predictable from the last ones,
and popularity knows nothing of them), and BERT4Rec starts better from a language model's whitened item vectors than
from random ones (the paper's claim, here with all-MiniLM-L6-v2: an item's text names its topic). And SASRec's BCE
loss against a numpy reference."""

import json

import numpy as np
import pytest
import torch

import export_embeddings
import train_bert4rec
import train_sasrec
from common.data import load_dataset
from common.evaluation import evaluate
from prepare_data import synthetic_catalogue, write_dataset

SAMPLE_SIZE = 50


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """1,000 users over 200 items in topics (the synthetic importer's generator)."""
    sequences, meta = synthetic_catalogue(num_users=1000, num_items=200, seed=3)
    out = tmp_path_factory.mktemp("learning") / "synthetic"
    write_dataset(out, sequences, meta)
    return out


def popularity_test_ndcg(data_dir) -> float:
    """Test NDCG@10 of ranking every candidate by how often it occurs in the training sequences."""
    data = load_dataset(data_dir, verbose=False)
    train_items = np.concatenate([data.sequence(row)[: data.train_len[row]] for row in range(data.num_users)])
    counts = torch.from_numpy(np.bincount(train_items, minlength=data.num_items + 1)).double()

    def scorer(histories, candidates):
        scores = counts.expand(len(histories), -1)
        return scores if candidates is None else scores.gather(1, candidates)

    return evaluate(scorer, data, "test", max_len=50, sample_size=SAMPLE_SIZE, device="cpu")["NDCG@10"]


@pytest.mark.parametrize("script, settings", [
    (train_sasrec, dict(lr=3e-3, dropout=0.2)),
    (train_bert4rec, dict(lr=3e-3, batch_size=64)),
], ids=["sasrec", "bert4rec"])  # fmt: skip
def test_beats_popularity_by_a_clear_margin(catalogue, tmp_path, script, settings):
    popularity = popularity_test_ndcg(catalogue)
    args = script.Args(
        data=catalogue, out=tmp_path / "run", hidden_size=32, num_heads=2, epochs=6, patience=6,
        sample_size=SAMPLE_SIZE, device="cpu", tensorboard=False, **settings,
    )  # fmt: skip
    test = script.main(args)
    assert test["NDCG@10"] > 2 * popularity, (test["NDCG@10"], popularity)  # measured: 7x (SASRec), 3.3x
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["NDCG@10"] == test["NDCG@10"]


def test_whitened_plm_init_beats_random_init_for_bert4rec(catalogue, tmp_path):
    """Six epochs from MiniLM's item vectors (PCA to width 32, whitened) against six from random: measured test
    NDCG@10 0.561 against 0.315."""
    table = tmp_path / "minilm.safetensors"
    export_embeddings.main(export_embeddings.Args(checkpoint="minilm", data=catalogue, out=table, device="cpu"))
    common = dict(data=catalogue, hidden_size=32, num_heads=2, epochs=6, patience=6, sample_size=SAMPLE_SIZE,
                  lr=3e-3, batch_size=64, device="cpu", tensorboard=False)  # fmt: skip
    random = train_bert4rec.main(train_bert4rec.Args(out=tmp_path / "random", init_type="none", **common))
    plm = train_bert4rec.main(train_bert4rec.Args(out=tmp_path / "plm", init_type="plm", embeddings=table,
                                                  init_transform="whiten", project="pca", **common))  # fmt: skip
    assert plm["NDCG@10"] > 1.3 * random["NDCG@10"], (plm["NDCG@10"], random["NDCG@10"])


def test_bce_loss_against_numpy():
    """Mean log-loss of the positive logits (label 1) plus that of the negative logits (label 0)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    table = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    targets, negatives = torch.tensor([1, 2, 3, 4, 5, 8]), torch.tensor([7, 7, 6, 1, 2, 3])

    h, t = hidden.numpy(), table.numpy()
    positive = np.einsum("nd,nd->n", h, t[targets.numpy()])
    negative = np.einsum("nd,nd->n", h, t[negatives.numpy()])
    expected = np.mean(np.log1p(np.exp(-positive))) + np.mean(np.log1p(np.exp(negative)))
    assert train_sasrec.bce_loss(hidden, table, targets, negatives).item() == pytest.approx(expected, rel=1e-12)
