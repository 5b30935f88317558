"""PLM initialisation of SASRec and BERT4Rec: the table equals the file (after PCA when asked), BERT4Rec's frozen table
and zero mask row, the paper's torch-saved format, and every refusal as a one-line error with no run directory."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import train_bert4rec
import train_sasrec
from common.data import load_dataset
from common.embeddings import pca_project, save_item_embeddings


@pytest.fixture(scope="module")
def data(synthetic_data):
    return load_dataset(synthetic_data)


def plm_table(data, dim: int, seed: int = 0) -> torch.Tensor:
    table = torch.randn(data.num_items + 1, dim, generator=torch.Generator().manual_seed(seed))
    table[0] = 0.0
    return table


def numpy_pca(table: np.ndarray, dim: int) -> np.ndarray:
    """Reference PCA by eigen-decomposition of the item covariance, axes signed by their largest loading."""
    items = table[1:].astype(np.float64)
    centred = items - items.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, np.argsort(values)[::-1][:dim]]  # (D, dim)
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    out = np.zeros((len(table), dim))
    out[1:] = centred @ axes
    return out


def test_pca_matches_numpy_reference_and_keeps_padding_zero():
    generator = torch.Generator().manual_seed(3)
    # Distinct variances along the axes make the principal directions well separated.
    table = torch.randn(60, 12, generator=generator) * torch.linspace(3.0, 0.5, 12)
    table[0] = 0.0
    projected = pca_project(table, 5)
    assert projected.shape == (60, 5) and (projected[0] == 0).all()
    np.testing.assert_allclose(projected.numpy(), numpy_pca(table.numpy(), 5), atol=1e-4)


def sasrec_args(data, tmp_path, **overrides):
    settings = dict(
        data=data.path,
        out=tmp_path / "run",
        init_type="plm",
        embeddings=tmp_path / "plm.safetensors",
        hidden_size=16,
        num_heads=2,
        epochs=1,
        sample_size=20,
        device="cpu",
    )
    return train_sasrec.Args(**{**settings, **overrides})


def best_state(tmp_path) -> dict:
    return torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]


def test_sasrec_table_starts_as_the_file(data, tmp_path):
    table = plm_table(data, 16)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    # lr 0: the saved model holds the initial table; no --hidden-size: the model takes the file's width
    train_sasrec.main(sasrec_args(data, tmp_path, lr=0.0, hidden_size=None))
    torch.testing.assert_close(best_state(tmp_path)["item_emb.weight"], table)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["hidden_size"] == 16


def test_sasrec_table_trains_by_default_and_freezes_on_request(data, tmp_path):
    table = plm_table(data, 16)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    train_sasrec.main(sasrec_args(data, tmp_path, lr=1e-2))
    assert not torch.allclose(best_state(tmp_path)["item_emb.weight"], table)
    train_sasrec.main(sasrec_args(data, tmp_path, lr=1e-2, freeze_embeddings=True, overwrite=True))
    torch.testing.assert_close(best_state(tmp_path)["item_emb.weight"], table)


def test_sasrec_pca_projection_of_wider_vectors(data, tmp_path):
    table = plm_table(data, 24)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    train_sasrec.main(sasrec_args(data, tmp_path, lr=0.0, project="pca"))
    got = best_state(tmp_path)["item_emb.weight"].numpy()
    np.testing.assert_allclose(got, numpy_pca(table.numpy(), 16), atol=1e-4)


def test_bert4rec_table_is_frozen_with_a_zero_mask_row(data, tmp_path):
    table = plm_table(data, 16)
    torch.save(table, tmp_path / "paper_format.pt")  # the paper's code saves a bare tensor
    args = train_bert4rec.Args(
        data=data.path,
        out=tmp_path / "run",
        init_type="plm",
        embeddings=tmp_path / "paper_format.pt",
        hidden_size=16,
        num_heads=2,
        epochs=1,
        sample_size=20,
        lr=1e-2,
        device="cpu",
    )
    train_bert4rec.main(args)
    token_table = best_state(tmp_path)["token_emb.weight"]
    assert token_table.shape == (data.num_items + 2, 16)
    torch.testing.assert_close(token_table[:-1], table)
    assert (token_table[-1] == 0).all()
    train_bert4rec.main(dataclasses.replace(args, freeze_embeddings=False, overwrite=True))
    assert not torch.allclose(best_state(tmp_path)["token_emb.weight"][:-1], table)


def foreign(data):
    """The same number of items under other keys: another dataset's fingerprint."""
    return dataclasses.replace(data, item_keys=[""] + [f"other-{key}" for key in data.item_keys[1:]])


REFUSALS = {
    "wrong rows": (lambda data: plm_table(data, 16)[:-1], "rows"),
    "foreign fingerprint": (lambda data: plm_table(data, 16), "another dataset"),
    "non-finite": (lambda data: plm_table(data, 16).index_fill_(0, torch.tensor([3]), float("nan")), "non-finite"),
    "wrong dimension": (lambda data: plm_table(data, 24), "--project pca"),
}


@pytest.mark.parametrize("script", [train_sasrec, train_bert4rec])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_errors_without_a_run_directory(data, tmp_path, script, case):
    make_table, message = REFUSALS[case]
    path = tmp_path / "plm.safetensors"
    if case == "wrong rows":
        path = tmp_path / "paper_format.pt"  # save_item_embeddings itself refuses to write such a table
        torch.save(make_table(data), path)
    else:
        save_item_embeddings(path, make_table(data), foreign(data) if case == "foreign fingerprint" else data, "test")
    args = script.Args(
        data=data.path,
        out=tmp_path / "run",
        init_type="plm",
        embeddings=path,
        hidden_size=16,
        num_heads=2,
        epochs=1,
        device="cpu",
    )
    with pytest.raises(SystemExit) as refusal:
        script.main(args)
    text = str(refusal.value)
    assert str(path) in text and message in text and "\n" not in text
    assert not (tmp_path / "run").exists()


def test_pca_cannot_widen_vectors(data, tmp_path):
    save_item_embeddings(tmp_path / "plm.safetensors", plm_table(data, 8), data, checkpoint="test")
    with pytest.raises(SystemExit, match="PCA cannot produce 16 dimensions"):
        train_sasrec.main(sasrec_args(data, tmp_path, project="pca"))
    assert not (tmp_path / "run").exists()
