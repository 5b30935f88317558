"""Evaluation against a brute-force numpy reference, and the cached negative samples."""

import math

import numpy as np
import pytest
import torch

from common.data import load_dataset
from common.evaluation import KS, evaluate, metric_names, result_line, sample_negatives
from prepare_data import write_dataset


def reference_metrics(scores: np.ndarray, targets: np.ndarray, candidate_ok: np.ndarray) -> dict[str, float]:
    """Per-user loops, pessimistic on ties: rank = number of other allowed candidates scoring >= the target."""
    hr = {k: [] for k in KS}
    ndcg = {k: [] for k in KS}
    rr = []
    for row in range(len(targets)):
        target_score = scores[row, targets[row]]
        rank = 0
        for item in range(scores.shape[1]):
            if item != targets[row] and candidate_ok[row, item] and scores[row, item] >= target_score:
                rank += 1
        for k in KS:
            hr[k].append(1.0 if rank < k else 0.0)
            ndcg[k].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
        rr.append(1.0 / (rank + 1))
    out = {f"HR@{k}": float(np.mean(hr[k])) for k in KS}
    out.update({f"NDCG@{k}": float(np.mean(ndcg[k])) for k in KS})
    out["MRR"] = float(np.mean(rr))
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    items = [f"i{j}" for j in range(80)]
    sequences = {
        f"u{u}": list(rng.choice(items, size=rng.integers(3, 12), replace=False)) for u in range(57)
    }
    out = tmp_path_factory.mktemp("eval") / "small"
    write_dataset(out, sequences, None)
    return load_dataset(out)


def table_scorer(table: torch.Tensor, rows: np.ndarray):
    """Scores from a fixed (num_users, num_items + 1) table; evaluate() visits users in `rows` order, so a cursor
    tells which user each batch holds."""
    cursor = [0]

    def scorer(histories, candidates):
        batch_rows = torch.from_numpy(rows[cursor[0] : cursor[0] + len(histories)])
        cursor[0] += len(histories)
        full = table[batch_rows]
        return full if candidates is None else full.gather(1, candidates)

    return scorer


def planted_tie_scores(data, split: str, seed: int, competitors: np.ndarray | None = None):
    """(scores (num_users, num_items + 1), ties (n,)) for the n users evaluated on `split`: distinct integer scores,
    then each target's score copied to ties[i] in 0..3 other items (from competitors[i] when given, else any item
    but the target), so those are exact ties with the target. Every other user's target starts at its row's top, so
    the ties alone decide whether it ranks first."""
    rng = np.random.default_rng(seed)
    size = data.num_users * (data.num_items + 1)
    scores = rng.permutation(size).reshape(data.num_users, -1).astype(np.float32)  # exact in float32 below 2**24
    rows, _, targets = data.eval_split(split, 1)
    ties = rng.integers(0, 4, size=len(rows))
    for i, (row, target) in enumerate(zip(rows, targets)):
        if i % 2 == 0:
            scores[row, target] = scores[row].max() + 1
        pool = competitors[i] if competitors is not None else np.delete(np.arange(data.num_items + 1), target)
        scores[row, rng.choice(pool, size=ties[i], replace=False)] = scores[row, target]
    return scores, ties


def assert_ties_matter(scores: np.ndarray, targets: np.ndarray, candidate_ok: np.ndarray, expected: dict) -> None:
    """The planted ties change the reference: with each target nudged above its ties, it ranks first more often."""
    ties_broken = scores.copy()
    ties_broken[np.arange(len(targets)), targets] += 0.5  # integer scores: the target passes only its ties
    assert reference_metrics(ties_broken, targets, candidate_ok)["HR@1"] > expected["HR@1"]


def test_planted_ties_are_exact_ties_with_the_target(small_data):
    scores, ties = planted_tie_scores(small_data, "val", seed=3)
    rows, _, targets = small_data.eval_split("val", 1)
    target_scores = scores[rows, targets]
    assert ((scores[rows] == target_scores[:, None]).sum(1) - 1).tolist() == ties.tolist()
    assert ties.min() == 0 and ties.max() == 3


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("exclude_history", [False, True])
def test_full_ranking_matches_reference(small_data, split, exclude_history):
    """Ties with the target count against it (pessimistic rank), as in the brute-force reference."""
    data = small_data
    scores, _ = planted_tie_scores(data, split, seed=3)
    rows, histories, targets = data.eval_split(split, 60)
    scorer = table_scorer(torch.from_numpy(scores), rows)

    ok = np.ones((len(rows), data.num_items + 1), dtype=bool)
    ok[:, 0] = False
    if exclude_history:
        for i, r in enumerate(rows):
            history = data.sequence(r)[: data.train_len[r] + (split == "test")]
            ok[i, history] = False
    expected = reference_metrics(scores[rows], targets, ok)
    got = evaluate(scorer, data, split, max_len=60, sample_size=0, device="cpu", batch_size=7,
                   exclude_history=exclude_history)
    assert got["users"] == len(rows)
    for name in metric_names():
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name
    assert_ties_matter(scores[rows], targets, ok, expected)


def test_sampled_ranking_matches_reference(small_data):
    data = small_data
    rows, histories, targets = data.eval_split("test", 60)
    negatives = sample_negatives(data, 20)[rows]
    scores, _ = planted_tie_scores(data, "test", seed=4, competitors=negatives)  # ties among the candidates
    scorer = table_scorer(torch.from_numpy(scores), rows)
    ok = np.zeros((len(rows), data.num_items + 1), dtype=bool)
    ok[np.arange(len(rows))[:, None], negatives] = True
    expected = reference_metrics(scores[rows], targets, ok)
    assert_ties_matter(scores[rows], targets, ok, expected)
    got = evaluate(scorer, data, "test", max_len=60, sample_size=20, device="cpu", batch_size=16)
    for name in metric_names():
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name


@pytest.mark.parametrize("sample_size", [0, 20])
def test_constant_scorer_ranks_last(small_data, sample_size):
    """With every score equal the target must not look perfect: it ranks behind all other candidates."""
    def constant(histories, candidates):
        width = small_data.num_items + 1 if candidates is None else candidates.shape[1]
        return torch.zeros(len(histories), width)

    got = evaluate(constant, small_data, "val", max_len=10, sample_size=sample_size, device="cpu")
    candidates = small_data.num_items if sample_size <= 0 else sample_size + 1
    assert got["HR@50"] == (1.0 if candidates <= 50 else 0.0)
    assert got["HR@1"] == 0.0
    assert got["MRR"] == pytest.approx(1.0 / candidates)
    protocol = "full ranking" if sample_size <= 0 else f"sampled-{sample_size}"
    assert got["protocol"] == protocol  # stored with every result, so runs under different protocols never mix
    assert result_line("val", got).startswith(f"val ({protocol}): HR@1 0.0000, ")


def test_padding_is_never_a_candidate(small_data):
    """A scorer that loves item 0 must not push the target down in full ranking."""
    rows, histories, targets = small_data.eval_split("val", 10)
    scores = torch.zeros(len(rows), small_data.num_items + 1)
    scores[:, 0] = 100.0
    scores[torch.arange(len(rows)), torch.from_numpy(targets)] = 1.0
    oracle_with_padding_bias = table_scorer(scores, np.arange(len(rows)))

    got = evaluate(oracle_with_padding_bias, small_data, "val", max_len=10, sample_size=0, device="cpu")
    assert got["HR@1"] == 1.0


def test_nan_scores_are_an_error(small_data):
    def broken(histories, candidates):
        return torch.full((len(histories), candidates.shape[1]), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        evaluate(broken, small_data, "val", max_len=10, sample_size=5, device="cpu")


def test_negatives_unseen_distinct_and_cached(small_data):
    negatives = sample_negatives(small_data, 30)
    assert negatives.shape == (small_data.num_users, 30)
    for row in range(small_data.num_users):
        seen = set(small_data.sequence(row).tolist())
        assert len(set(negatives[row].tolist())) == 30
        assert not seen & set(negatives[row].tolist())
        assert 0 not in negatives[row]
    cache = small_data.path / "negatives" / f"sample30-seed98765-{small_data.content_fingerprint}.npy"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    again = sample_negatives(small_data, 30)
    np.testing.assert_array_equal(negatives, again)
    assert cache.stat().st_mtime_ns == stamp
    other_seed = sample_negatives(small_data, 30, seed=1)
    assert not np.array_equal(negatives, other_seed)


def test_negatives_are_uniform(small_data):
    """Every unseen item is about equally likely: counts over many seeds match the uniform expectation."""
    row = 0
    seen = set(small_data.sequence(row).tolist())
    unseen = [i for i in range(1, small_data.num_items + 1) if i not in seen]
    counts = np.zeros(small_data.num_items + 1)
    draws = 300
    for seed in range(draws):
        counts[sample_negatives(small_data, 10, seed=1000 + seed)[row]] += 1
    expected = draws * 10 / len(unseen)
    assert counts[list(seen)].sum() == 0
    chi2 = ((counts[unseen] - expected) ** 2 / expected).sum()
    assert chi2 < 2 * len(unseen)  # dof = len(unseen) - 1; a wildly non-uniform draw exceeds this


def test_too_few_unseen_items_is_an_error(small_data):
    with pytest.raises(ValueError, match="never interacted"):
        sample_negatives(small_data, small_data.num_items)


@pytest.mark.parametrize("sample_size", [0, 20])
def test_a_user_subset_scores_those_users_only(small_data, sample_size):
    """users=rows: the reference over those users alone, each against its own negatives."""
    data = small_data
    rows, _, targets = data.eval_split("val", 60)
    subset = rows[::3]
    scores, _ = planted_tie_scores(data, "val", seed=5)
    kept = np.isin(rows, subset)
    ok = np.ones((len(rows), data.num_items + 1), dtype=bool)
    if sample_size:
        ok[:] = False
        ok[np.arange(len(rows))[:, None], sample_negatives(data, sample_size)[rows]] = True
    ok[:, 0] = False
    expected = reference_metrics(scores[subset], targets[kept], ok[kept])
    scorer = table_scorer(torch.from_numpy(scores), subset)
    got = evaluate(scorer, data, "val", max_len=60, sample_size=sample_size, device="cpu", batch_size=5, users=subset)
    assert got["users"] == len(subset) < len(rows)
    for name in metric_names():
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name
