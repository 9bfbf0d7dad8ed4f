import faiss
import numpy as np
import pytest

from twotower.config import IndexConfig
from twotower.stages.index import (
    KINDS,
    IndexReport,
    build_index,
    build_kind,
    choose_kind,
    exact_search,
    overlap_at_k,
    search_knob,
)
from twotower.store.index import ItemIndex, add_items, faiss_base, load_index, save_index

pytestmark = pytest.mark.unit

ANN_ITEMS = 10_000  # enough to train every kind (ivf_pq needs 39 x 256 points), small enough for CI
DIM = 16


def _vectors(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32)


def _clustered(n, seed, dim=DIM, clusters=40):
    """Vectors around shared cluster centres, like trained item and query vectors (random
    Gaussian vectors have no neighbourhoods for an ANN index to find)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue():
    return np.arange(ANN_ITEMS) * 3 + 1000, _clustered(ANN_ITEMS, seed=0)


@pytest.fixture(scope="module")
def ann_indexes(catalogue):
    """Every kind over the same catalogue, each with its search knob tuned to Recall@100 >= 0.9."""
    ids, vectors = catalogue
    queries = _clustered(200, seed=1)
    return {
        kind: build_index(ids, vectors, IndexConfig(kind=kind, min_recall=0.9), queries, top_k=10)[0] for kind in KINDS
    }


def test_flat_search_returns_dataset_ids_best_first():
    items, ids = _vectors(50), np.arange(1000, 1050)
    index = build_kind("flat", ids, items, IndexConfig())
    queries = _vectors(4, seed=1)
    found, scores = ItemIndex(index).search(queries, k=50)
    assert all(len(set(row)) == 50 for row in found)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    expected = ids[np.argsort(-(queries @ items.T), axis=1)[:, :5]]
    assert (found[:, :5] == expected).all()


def test_top_k_larger_than_catalogue_and_duplicate_ids_are_refused():
    index = ItemIndex(build_kind("flat", np.arange(5), _vectors(5), IndexConfig()))
    with pytest.raises(ValueError, match="top_k=6 exceeds the catalogue of 5 items"):
        index.search(_vectors(1), k=6)
    with pytest.raises(ValueError, match="unique"):
        build_kind("flat", np.array([1, 1]), _vectors(2), IndexConfig())


def test_a_kind_the_catalogue_cannot_train_is_a_clear_error():
    with pytest.raises(ValueError, match=r"index.kind=ivf_pq: ivf_pq needs at least 9,984 items .* \(have 3,000\)"):
        build_kind("ivf_pq", np.arange(3000), _vectors(3000), IndexConfig())


def test_exact_search_matches_the_flat_index_and_overlap_counts_shared_ids():
    items, ids = _vectors(40), np.arange(500, 540)
    queries = _vectors(6, seed=2)
    exact_ids, exact_scores = exact_search(ids, items, queries, k=7, chunk=4)
    found, scores = ItemIndex(build_kind("flat", ids, items, IndexConfig())).search(queries, k=7)
    np.testing.assert_array_equal(exact_ids, found)
    np.testing.assert_allclose(exact_scores, scores, rtol=1e-5)
    assert overlap_at_k(found, exact_ids) == 1.0
    assert overlap_at_k(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_at_k(found[:, :3], exact_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_seen_items_are_excluded_exactly_and_no_minus_one_reaches_the_caller(kind, catalogue, ann_indexes):
    """A heavy user has seen the 600 items nearest their query: the old depth-(k + seen) search
    would have to go 610 deep; here none of them comes back, rows are full and duplicate-free."""
    ids, vectors = catalogue
    queries = _clustered(6, seed=2)
    exact, _ = exact_search(ids, vectors, queries, k=700)
    seen = [exact[0, :600], np.empty(0, np.int64), exact[2, :5], exact[3, :600], np.empty(0, np.int64), exact[5, :50]]
    found, scores = ItemIndex(ann_indexes[kind]).search(queries, 10, seen)
    assert (found >= 1000).all()
    for row, seen_row in enumerate(seen):
        assert not np.isin(found[row], seen_row).any()
        assert len(set(found[row])) == 10
    assert (np.diff(scores, axis=1) <= 1e-4).all()
    if kind == "flat":  # exact: the best unseen items, in order
        np.testing.assert_array_equal(found[0], exact[0, 600:610])
        np.testing.assert_array_equal(found[1], exact[1, :10])


def test_search_depth_does_not_grow_with_the_heaviest_user(catalogue, ann_indexes):
    """Every FAISS call asks for k results, whatever the seen lists in the batch."""
    ids, vectors = catalogue
    index = ItemIndex(ann_indexes["hnsw"])
    depths = []
    search = index._faiss_search

    def recording_search(target, queries, k, params):
        depths.append(k)
        return search(target, queries, k, params)

    index._faiss_search = recording_search
    queries = _clustered(3, seed=3)
    exact, _ = exact_search(ids, vectors, queries, k=2000)
    found, _ = index.search(queries, 10, [exact[0, :2000], np.empty(0, np.int64), exact[2, :20]])
    assert len(depths) >= 3 and set(depths) == {10}  # one batch call, one call per row with seen items
    assert not np.isin(found[0], exact[0, :2000]).any()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat"])
def test_user_who_has_seen_nearly_everything_gets_seen_items_last(kind):
    ids, items = np.arange(100, 200), _clustered(100, seed=4, clusters=2)
    config = IndexConfig(kind=kind, ivf_nlist=2, ivf_nprobe=1, hnsw_ef_search=16)
    index = ItemIndex(build_kind(kind, ids, items, config))
    query = _clustered(1, seed=5, clusters=2)
    order, _ = exact_search(ids, items, query, k=100)
    seen = order[0, :96]  # 4 unseen items left, k = 10
    found, _ = index.search(query, 10, [seen])
    np.testing.assert_array_equal(found[0, :4], order[0, 96:])
    assert np.isin(found[0, 4:], seen).all() and len(set(found[0])) == 10


def test_ivf_rows_its_probed_lists_cannot_fill_are_completed_exhaustively():
    """nprobe=1 over 100 lists holds ~50 items: k=200 must still come back full and exact."""
    ids, items = np.arange(5000), _vectors(5000, dim=DIM, seed=6)  # no clusters: lists of ~50
    index = build_kind("ivf_flat", ids, items, IndexConfig(ivf_nlist=100, ivf_nprobe=1))
    queries = _vectors(3, dim=DIM, seed=7)
    assert (faiss_base(index).search(queries, 200)[1] < 0).any()  # the probed list alone falls short
    found, _ = ItemIndex(index).search(queries, 200)
    exact, _ = exact_search(ids, items, queries, 200)
    assert overlap_at_k(found, exact) == 1.0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_items_added_without_a_rebuild_are_retrieved_and_keep_their_ids(kind, catalogue, ann_indexes):
    ids, vectors = catalogue
    index = faiss.clone_index(ann_indexes[kind])
    new_ids = np.array([7, 8, 9])
    new_vectors = _clustered(3, seed=8) * 5  # long vectors: each is the best answer to its own direction
    add_items(index, new_ids, new_vectors)
    assert index.ntotal == ANN_ITEMS + 3
    found, _ = ItemIndex(index).search(new_vectors, 1)
    np.testing.assert_array_equal(found[:, 0], new_ids)
    with pytest.raises(ValueError, match="already in the index, e.g. 1000"):
        add_items(index, np.array([1000]), vectors[:1])
    with pytest.raises(ValueError, match="dimension 8, the index 16"):
        add_items(index, np.array([1]), _vectors(1))


def test_auto_chooses_the_fastest_kind_that_meets_the_target_and_it_holds_on_fresh_queries(catalogue, tmp_path):
    ids, vectors = catalogue
    index, choice = build_index(
        ids, vectors, IndexConfig(kind="auto", min_recall=0.95), _clustered(300, seed=9), top_k=10
    )
    assert {r.kind for r in choice.candidates} == set(KINDS)
    meeting = [r for r in choice.candidates if r.meets_target]
    assert choice.chosen.meets_target and choice.chosen.p50_ms <= min(r.p50_ms for r in meeting) + 0.1
    assert (
        type(faiss_base(index)).__name__
        == {"flat": "IndexFlat", "hnsw": "IndexHNSWFlat", "ivf_flat": "IndexIVFFlat", "ivf_pq": "IndexIVFPQ"}[
            choice.chosen.kind
        ]
    )
    # the tuned knob is saved with the index: the server loads the setting that was measured
    save_index(index, tmp_path / "items.faiss")
    loaded = load_index(tmp_path / "items.faiss")
    assert search_knob(faiss_base(loaded)) == choice.chosen.search_knob
    fresh = _clustered(200, seed=10)
    found, _ = ItemIndex(loaded).search(fresh, 100)
    assert overlap_at_k(found, exact_search(ids, vectors, fresh, 100)[0]) >= 0.93


def test_auto_prefers_the_more_exact_of_kinds_equally_fast():
    report = IndexReport("flat", "IDMap2,Flat", {}, 1.0, 1.0, p50_ms=0.05, build_s=0, meets_target=True)
    faster = IndexReport(
        "ivf_flat", "IDMap2,IVF8,Flat", {"nprobe": 2}, 0.99, 0.96, p50_ms=0.03, build_s=0, meets_target=True
    )
    much_faster = IndexReport(
        "hnsw", "IDMap2,HNSW32,Flat", {"efSearch": 64}, 0.99, 0.97, p50_ms=0.01, build_s=0, meets_target=True
    )
    missing = IndexReport(
        "ivf_pq", "IDMap2,IVF8,PQ4x8", {"nprobe": 8}, 0.7, 0.8, p50_ms=0.001, build_s=0, meets_target=False
    )
    assert choose_kind([report, faster, missing], latency_tolerance_ms=0.1) is report
    assert choose_kind([report, faster, missing], latency_tolerance_ms=0.0) is faster
    assert choose_kind([report, faster, much_faster], latency_tolerance_ms=0.025) is much_faster
    assert choose_kind([missing], latency_tolerance_ms=0.1) is missing


def test_a_configured_search_knob_is_kept_not_tuned(catalogue):
    ids, vectors = catalogue
    _, choice = build_index(
        ids, vectors, IndexConfig(kind="hnsw", hnsw_ef_search=24), _clustered(50, seed=11), top_k=10
    )
    assert choice.chosen.search_knob == {"efSearch": 24}
