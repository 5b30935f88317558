"""PLM initialisation of SASRec and BERT4Rec: the table equals the file (after PCA and the init transform when asked),
BERT4Rec's frozen table and zero mask row, the paper's torch-saved format, and every refusal as a one-line error with
no run directory."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import train_bert4rec
import train_sasrec
from common.data import load_dataset
from common.embeddings import pca_project, save_item_embeddings, transform_items
from common.run import InputError


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


def numpy_center(table: np.ndarray, std: float) -> np.ndarray:
    """Reference "center": items minus their mean, scaled to element std `std`; row 0 zero."""
    centred = table[1:] - table[1:].mean(axis=0)
    out = np.zeros_like(table, dtype=np.float64)
    out[1:] = centred * std / centred.std()
    return out


def numpy_whiten(table: np.ndarray, std: float, dim: int | None = None) -> np.ndarray:
    """Reference "whiten": the top `dim` principal components (all by default) of the items, each divided by its
    standard deviation, then scaled to element std `std`; row 0 zero."""
    components = numpy_pca(table, dim or table.shape[1])[1:]
    whitened = components / components.std(axis=0)
    out = np.zeros((len(table), whitened.shape[1]))
    out[1:] = whitened * std / whitened.std()
    return out


def skewed_table(rows: int, dim: int, seed: int = 3) -> torch.Tensor:
    """Random rows with one large shared offset and distinct variances per axis: an anisotropic "PLM" table."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=generator) * torch.linspace(3.0, 0.5, dim) + 5.0
    table[0] = 0.0
    return table


def test_transforms_on_a_hand_computed_example():
    # Items (+-2, +-1) shifted by (10, -3): mean (10, -3), covariance diag(4, 1), element std sqrt(2.5) once centred.
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    table = torch.cat([torch.zeros(1, 2), signs * torch.tensor([2.0, 1.0]) + torch.tensor([10.0, -3.0])])
    centred = transform_items(table, "center", target_std=0.5)
    torch.testing.assert_close(centred[1:], signs * torch.tensor([2.0, 1.0]) * 0.5 / 2.5**0.5)
    whitened = transform_items(table, "whiten", target_std=0.5)
    torch.testing.assert_close(whitened[1:], signs * 0.5)  # each axis divided by its std (2, 1), then scaled
    assert (centred[0] == 0).all() and (whitened[0] == 0).all()
    assert transform_items(table, "none", target_std=0.5) is table


@pytest.mark.parametrize("transform", ["center", "whiten"])
def test_transforms_match_numpy_references(transform):
    table = skewed_table(80, 10)
    got = transform_items(table, transform, target_std=0.02).double().numpy()
    reference = numpy_center if transform == "center" else numpy_whiten
    np.testing.assert_allclose(got, reference(table.numpy().astype(np.float64), 0.02), atol=1e-6)
    items = got[1:]
    np.testing.assert_allclose(items.mean(axis=0), 0.0, atol=1e-7)
    assert items.std() == pytest.approx(0.02, rel=1e-5)
    if transform == "whiten":  # covariance proportional to the identity
        np.testing.assert_allclose(np.cov(items.T, bias=True), 0.02**2 * np.eye(10), atol=1e-8)


def test_whitening_leaves_unspanned_directions_near_zero():
    # 5 items in 8 dimensions span at most 4 centred directions: the other eigenvalues are ~0 and must not blow up.
    table = skewed_table(6, 8)
    whitened = transform_items(table, "whiten", target_std=1.0)
    assert torch.isfinite(whitened).all()
    assert whitened[1:, 4:].abs().max() < 1e-3
    # The whole table has element std 1, so the 4 spanned columns carry all of it: std sqrt(8 / 4) each.
    spanned = numpy_whiten(table.numpy(), 2**0.5, 4)[1:]
    np.testing.assert_allclose(whitened[1:, :4].double().numpy(), spanned, atol=1e-4)


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


def test_xavier_item_std_is_the_std_of_sasrec_random_table(data):
    args = train_sasrec.Args(data=data.path, hidden_size=64)
    torch.manual_seed(0)
    random_rows = train_sasrec.SASRec(data.num_items, args).item_emb.weight[1:].detach()
    assert random_rows.std().item() == pytest.approx(train_sasrec.xavier_item_std(data.num_items, 64), rel=0.05)


def test_bert4rec_random_token_std_is_its_init(data):
    args = train_bert4rec.Args(data=data.path, hidden_size=64)
    torch.manual_seed(0)
    random_rows = train_bert4rec.BERT4Rec(data.num_items, args).token_emb.weight[1:].detach()
    assert random_rows.std().item() == pytest.approx(train_bert4rec.RANDOM_TOKEN_STD, rel=0.05)


@pytest.mark.parametrize("transform", ["center", "whiten"])
def test_sasrec_starts_from_the_transformed_table(data, tmp_path, transform):
    table = skewed_table(data.num_items + 1, 16)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    train_sasrec.main(sasrec_args(data, tmp_path, lr=0.0, init_transform=transform))
    std = train_sasrec.xavier_item_std(data.num_items, 16)
    reference = numpy_center(table.double().numpy(), std) if transform == "center" else numpy_whiten(
        table.double().numpy(), std
    )
    np.testing.assert_allclose(best_state(tmp_path)["item_emb.weight"].numpy(), reference, atol=1e-5)


def test_pca_then_whitening_whitens_the_kept_components(data, tmp_path):
    table = skewed_table(data.num_items + 1, 24)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    train_sasrec.main(sasrec_args(data, tmp_path, lr=0.0, project="pca", init_transform="whiten"))
    std = train_sasrec.xavier_item_std(data.num_items, 16)
    reference = numpy_whiten(table.double().numpy(), std, dim=16)
    np.testing.assert_allclose(best_state(tmp_path)["item_emb.weight"].numpy(), reference, atol=1e-5)


def test_bert4rec_transform_uses_its_own_std_and_keeps_a_zero_mask_row(data, tmp_path):
    table = skewed_table(data.num_items + 1, 16)
    save_item_embeddings(tmp_path / "plm.safetensors", table, data, checkpoint="test")
    args = train_bert4rec.Args(
        data=data.path,
        out=tmp_path / "run",
        init_type="plm",
        init_transform="center",
        embeddings=tmp_path / "plm.safetensors",
        num_heads=2,
        epochs=1,
        sample_size=20,
        device="cpu",
    )
    train_bert4rec.main(args)
    token_table = best_state(tmp_path)["token_emb.weight"].numpy()  # frozen: the initial table
    np.testing.assert_allclose(token_table[:-1], numpy_center(table.double().numpy(), 1.0), atol=1e-5)
    assert (token_table[-1] == 0).all()


def test_bert4rec_table_is_frozen_with_a_zero_mask_row(data, tmp_path):
    table = plm_table(data, 16)
    torch.save(table, tmp_path / "paper_format.pt")  # the paper's code saves a bare tensor
    args = train_bert4rec.Args(
        data=data.path,
        out=tmp_path / "run",
        init_type="plm",
        embeddings=tmp_path / "paper_format.pt",
        embeddings_smap=data.path / "smap.json",  # its rows follow the dataset's own numbering
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
    with pytest.raises(InputError) as refusal:
        script.main(args)
    text = str(refusal.value)
    assert str(path) in text and message in text and "\n" not in text
    assert not (tmp_path / "run").exists()


def test_pca_cannot_widen_vectors(data, tmp_path):
    save_item_embeddings(tmp_path / "plm.safetensors", plm_table(data, 8), data, checkpoint="test")
    with pytest.raises(InputError, match="PCA cannot produce 16 dimensions"):
        train_sasrec.main(sasrec_args(data, tmp_path, project="pca"))
    assert not (tmp_path / "run").exists()


def test_a_safetensors_table_without_our_metadata_says_the_dataset_check_is_skipped(data, tmp_path, capsys):
    from safetensors.torch import save_file

    from common.embeddings import load_item_embeddings

    path = tmp_path / "foreign.safetensors"
    table = plm_table(data, 8)
    save_file({"item_embeddings": table}, str(path))  # no metadata: not written by export_embeddings.py
    assert torch.equal(load_item_embeddings(path, data), table)
    assert f"{path}: no dataset fingerprint in its metadata" in capsys.readouterr().out
    save_item_embeddings(path, table, data, "test")
    load_item_embeddings(path, data)
    assert capsys.readouterr().out == ""


def test_the_values_digest_of_a_table_ignores_its_file_format_and_metadata(data, tmp_path):
    """A run records its table's values digest: the same for equal vectors whatever the file's bytes (metadata,
    safetensors or the paper's torch file), and another for changed vectors; the reference is numpy's bytes."""
    import hashlib

    from safetensors.torch import save_file

    from common.embeddings import table_values_sha256

    table = plm_table(data, 8)
    save_item_embeddings(tmp_path / "ours.safetensors", table, data, "one checkpoint")
    save_file({"item_embeddings": table}, str(tmp_path / "foreign.safetensors"), metadata={"made": "elsewhere"})
    torch.save(table, tmp_path / "paper.pt")
    files = [tmp_path / name for name in ("ours.safetensors", "foreign.safetensors", "paper.pt")]
    assert len({hashlib.sha256(path.read_bytes()).hexdigest() for path in files}) == 3
    reference = hashlib.sha256(table.numpy().tobytes()).hexdigest()
    assert [table_values_sha256(path) for path in files] == [reference] * 3
    changed = table.clone()
    changed[1, 0] += 1e-6
    torch.save(changed, tmp_path / "changed.pt")
    assert table_values_sha256(tmp_path / "changed.pt") != reference
