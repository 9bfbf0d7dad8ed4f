"""Stage 4b: the FAISS index over item embeddings, keyed by the dataset's item ids."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from twotower.manifest import atomic_file

# Up to this many items an exact inner-product scan is both fastest to build and
# cheap to query (3.7k ML-1M movies: well under a millisecond per query).
EXACT_SEARCH_MAX_ITEMS = 200_000


def build_index(item_ids: np.ndarray, vectors: np.ndarray, exact_max_items: int = EXACT_SEARCH_MAX_ITEMS) -> faiss.Index:
    """Exact inner product for small catalogues, HNSW beyond.

    Neither kind drops candidates the way a partly probed IVF index does, so a
    search for k <= ntotal never returns -1 ids.
    """
    if len(item_ids) != len(vectors):
        raise ValueError(f"{len(item_ids)} item ids for {len(vectors)} vectors")
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if len(item_ids) <= exact_max_items:
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = 256
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(vectors, np.asarray(item_ids, dtype=np.int64))
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    """Written aside and renamed over ``path``: a reader never sees half an index."""
    with atomic_file(path) as staging:
        faiss.write_index(index, str(staging))


def load_index(path: Path) -> faiss.Index:
    if not Path(path).exists():
        raise FileNotFoundError(f"no FAISS index at {path}; run the 'index' stage first")
    return faiss.read_index(str(path))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids and scores per query row, best first."""
    if k > index.ntotal:
        raise ValueError(f"top_k={k} exceeds the catalogue of {index.ntotal} items")
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if (ids < 0).any():
        raise RuntimeError("the index returned fewer than k items for a query")
    return ids, scores


def build_reference_index(item_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """The index the public NVIDIA example's ``setup_faiss`` builds (IVF32, nprobe 8), for comparison."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.nprobe = 8
    index.train(vectors)
    index.add_with_ids(vectors, np.asarray(item_ids, dtype=np.int64))
    return index


def exact_search(item_ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product in NumPy: the reference any index is checked against."""
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(item_ids)[best], np.take_along_axis(scores, best, axis=1)


def overlap_at_k(found: np.ndarray, expected: np.ndarray) -> float:
    """Mean share of each row of ``expected`` ids that also appears in the same row of ``found``
    (recall of an index against exact search; 1.0 means identical top-k sets)."""
    if found.shape != expected.shape:
        raise ValueError(f"shapes differ: {found.shape} vs {expected.shape}")
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected)]))


def faiss_base(index: faiss.Index) -> faiss.Index:
    """The index inside an id map (what kind of search it runs)."""
    return faiss.downcast_index(index.index) if hasattr(index, "index") else index
