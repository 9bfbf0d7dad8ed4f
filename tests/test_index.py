import numpy as np
import pytest

from twotower.index import build_index, exact_search, overlap_at_k, search

pytestmark = pytest.mark.unit


def _vectors(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("exact_max_items", [10_000, 0])  # exact, then HNSW
def test_search_returns_dataset_ids_best_first_never_minus_one(exact_max_items):
    items, ids = _vectors(50), np.arange(1000, 1050)
    index = build_index(ids, items, exact_max_items=exact_max_items)
    queries = _vectors(4, seed=1)
    found, scores = search(index, queries, k=50)
    assert (found >= 1000).all()
    assert all(len(set(row)) == 50 for row in found)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    expected = ids[np.argsort(-(queries @ items.T), axis=1)[:, :5]]
    assert (found[:, :5] == expected).all()


def test_top_k_larger_than_catalogue_is_refused():
    index = build_index(np.arange(5), _vectors(5))
    with pytest.raises(ValueError, match="top_k=6 exceeds the catalogue of 5 items"):
        search(index, _vectors(1), k=6)


def test_duplicate_item_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        build_index(np.array([1, 1]), _vectors(2))


def test_exact_search_matches_the_flat_index_and_overlap_counts_shared_ids():
    items, ids = _vectors(40), np.arange(500, 540)
    queries = _vectors(6, seed=2)
    exact_ids, exact_scores = exact_search(ids, items, queries, k=7)
    found, scores = search(build_index(ids, items), queries, k=7)
    np.testing.assert_array_equal(exact_ids, found)
    np.testing.assert_allclose(exact_scores, scores, rtol=1e-5)
    assert overlap_at_k(found, exact_ids) == 1.0
    assert overlap_at_k(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_at_k(found[:, :3], exact_ids)
