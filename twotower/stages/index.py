"""Stage 4b: the FAISS index over item embeddings, keyed by the dataset's item ids: each kind
(flat, HNSW, IVF-Flat, IVF-PQ) built, its search knob tuned and its recall and latency measured
on held-out query vectors, and the kind chosen by measured recall (``index.kind=auto``).

Every kind is a FAISS index factory string inside an ``IDMap2``; the saved index and its search
are ``twotower.store.index``'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from twotower.config import IndexConfig, IndexKind
from twotower.store.index import ItemIndex, check_items, faiss_base

KINDS: tuple[IndexKind, ...] = ("flat", "hnsw", "ivf_flat", "ivf_pq")


# FAISS's k-means warns below this many training points per centroid (IVF lists, PQ codes).
MIN_POINTS_PER_CENTROID = 39


PQ_CENTROIDS = 256  # 8-bit sub-quantizers


TRAIN_POINTS_PER_LIST = 64


HNSW_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


RECALL_DEPTH = 100  # the recall target is Recall@100 against exact search


def ivf_lists(n_items: int, config: IndexConfig) -> int:
    return config.ivf_nlist or max(1, min(int(4 * math.sqrt(n_items)), n_items // MIN_POINTS_PER_CENTROID))


def pq_bytes(dim: int, config: IndexConfig) -> int:
    return config.pq_bytes or max(1, dim // 4)


def untrainable_reason(kind: IndexKind, n_items: int, dim: int, config: IndexConfig) -> str | None:
    """Why ``kind`` cannot be built over this catalogue (None: it can)."""
    if kind in ("ivf_flat", "ivf_pq") and n_items < MIN_POINTS_PER_CENTROID * max(2, ivf_lists(n_items, config)):
        return f"{kind} needs at least {MIN_POINTS_PER_CENTROID} items per list for 2+ lists (have {n_items:,} items)"
    if kind == "ivf_pq":
        if n_items < MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:
            return (
                f"ivf_pq needs at least {MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:,} items to train its 8-bit codebooks "
                f"(have {n_items:,})"
            )
        if dim % pq_bytes(dim, config):
            return f"index.pq_bytes={pq_bytes(dim, config)} does not divide the vector dimension {dim}"
    return None


def trainable_kinds(n_items: int, dim: int, config: IndexConfig) -> tuple[list[IndexKind], dict[str, str]]:
    """The kinds that can be built over this catalogue, and why each other one cannot."""
    skipped = {kind: reason for kind in KINDS if (reason := untrainable_reason(kind, n_items, dim, config))}
    return [kind for kind in KINDS if kind not in skipped], skipped


def factory_string(kind: IndexKind, n_items: int, dim: int, config: IndexConfig) -> str:
    inner = {
        "flat": "Flat",
        "hnsw": f"HNSW{config.hnsw_m},Flat",
        "ivf_flat": f"IVF{ivf_lists(n_items, config)},Flat",
        "ivf_pq": f"IVF{ivf_lists(n_items, config)},PQ{pq_bytes(dim, config)}x8",
    }[kind]
    return f"IDMap2,{inner}"


# The search-time knob each kind trades recall for speed with (flat has none).
def search_knob(base: faiss.Index) -> dict[str, int]:
    if isinstance(base, faiss.IndexHNSW):
        return {"efSearch": int(base.hnsw.efSearch)}
    if isinstance(base, faiss.IndexIVF):
        return {"nprobe": int(base.nprobe)}
    return {}


def set_search_knob(base: faiss.Index, value: int) -> None:
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = value
    elif isinstance(base, faiss.IndexIVF):
        base.nprobe = value


def knob_values(base: faiss.Index) -> list[int]:
    """Increasing knob settings to try, cheapest first."""
    if isinstance(base, faiss.IndexHNSW):
        return list(HNSW_EF_SEARCH)
    if isinstance(base, faiss.IndexIVF):
        return sorted({min(2**p, base.nlist) for p in range(int(math.log2(base.nlist)) + 2)})
    return []


@dataclass
class IndexReport:
    """One built kind, measured on held-out query vectors against exact search."""

    kind: str
    factory: str
    search_knob: dict[str, int]
    recall_at_10: float
    recall_at_100: float
    p50_ms: float  # one query at a time, one thread: the served path's search
    build_s: float
    meets_target: bool


@dataclass
class IndexChoice:
    chosen: IndexReport
    min_recall: float
    candidates: list[IndexReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why it could not be built

    def as_record(self) -> dict:
        return asdict(self)


@dataclass
class RecallQueries:
    """Real query vectors with their exact top items: one half tunes the knob, the other measures."""

    tune: np.ndarray
    tune_exact: np.ndarray
    held_out: np.ndarray
    held_out_exact: np.ndarray

    @property
    def depth(self) -> int:
        return self.tune_exact.shape[1]

    @classmethod
    def from_vectors(cls, item_ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, seed: int) -> RecallQueries:
        if len(queries) < 2:
            raise ValueError(f"measuring recall needs at least 2 query vectors, got {len(queries)}")
        queries = np.asarray(queries, dtype=np.float32)[np.random.default_rng(seed).permutation(len(queries))]
        exact, _ = exact_search(item_ids, vectors, queries, min(RECALL_DEPTH, len(item_ids)))
        half = len(queries) // 2
        return cls(queries[:half], exact[:half], queries[half:], exact[half:])


def training_sample(vectors: np.ndarray, n_lists: int, seed: int) -> np.ndarray:
    """What IVF k-means trains on: ``TRAIN_POINTS_PER_LIST`` vectors per list at most (FAISS would
    use up to 256, which at a million items costs minutes for little recall)."""
    size = TRAIN_POINTS_PER_LIST * n_lists
    if len(vectors) <= size:
        return vectors
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))]


def fixed_knob(kind: IndexKind, config: IndexConfig) -> int:
    """The search knob the configuration sets for ``kind`` (0: tuned to the recall target)."""
    return {"hnsw": config.hnsw_ef_search, "ivf_flat": config.ivf_nprobe, "ivf_pq": config.ivf_nprobe}.get(kind, 0)


def build_kind(
    kind: IndexKind, item_ids: np.ndarray, vectors: np.ndarray, config: IndexConfig, seed: int = 42
) -> faiss.Index:
    """One kind built from its factory string, with any search knob the configuration fixes."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    check_items(item_ids, vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    reason = untrainable_reason(kind, *vectors.shape, config)
    if reason:
        raise ValueError(f"index.kind={kind}: {reason}; use flat, hnsw or auto")
    index = faiss.index_factory(
        vectors.shape[1], factory_string(kind, *vectors.shape, config), faiss.METRIC_INNER_PRODUCT
    )
    base = faiss_base(index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = config.hnsw_ef_construction
    if not index.is_trained:
        index.train(training_sample(vectors, ivf_lists(len(vectors), config), seed))
    index.add_with_ids(vectors, item_ids)
    if fixed_knob(kind, config):
        set_search_knob(base, fixed_knob(kind, config))
    return index


def tune_search_knob(index: faiss.Index, queries: RecallQueries, min_recall: float) -> None:
    """Set the cheapest knob value that reaches ``min_recall`` on the tuning half (the largest if none does)."""
    searcher = ItemIndex(index)
    for value in knob_values(searcher.base):
        set_search_knob(searcher.base, value)
        if overlap_at_k(searcher.approximate_search(queries.tune, queries.depth), queries.tune_exact) >= min_recall:
            return


def measure_index(
    index: faiss.Index, queries: RecallQueries, top_k: int, timed_queries: int = 200
) -> tuple[float, float, float]:
    """Recall@10 and Recall@100 of the index's own search against exact search on the held-out
    half, and the p50 of one single-threaded top-k query through ``ItemIndex`` (ms)."""
    searcher = ItemIndex(index)
    short = min(10, queries.depth)
    recall_10 = overlap_at_k(searcher.approximate_search(queries.held_out, short), queries.held_out_exact[:, :short])
    recall_100 = overlap_at_k(searcher.approximate_search(queries.held_out, queries.depth), queries.held_out_exact)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        latencies = []
        for query in queries.held_out[:timed_queries]:
            start = time.perf_counter()
            searcher.search(query[None, :], min(top_k, searcher.ntotal))
            latencies.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return recall_10, recall_100, float(np.median(latencies) * 1e3)


def build_measured(
    kind: IndexKind,
    item_ids: np.ndarray,
    vectors: np.ndarray,
    config: IndexConfig,
    queries: RecallQueries,
    top_k: int,
    seed: int = 42,
) -> tuple[faiss.Index, IndexReport]:
    start = time.perf_counter()
    index = build_kind(kind, item_ids, vectors, config, seed)
    build_s = time.perf_counter() - start
    if not fixed_knob(kind, config):
        tune_search_knob(index, queries, config.min_recall)
    recall_10, recall_100, p50_ms = measure_index(index, queries, top_k)
    report = IndexReport(
        kind,
        factory_string(kind, *vectors.shape, config),
        search_knob(faiss_base(index)),
        recall_10,
        recall_100,
        p50_ms,
        build_s,
        meets_target=recall_100 >= config.min_recall,
    )
    return index, report


def choose_kind(reports: list[IndexReport], latency_tolerance_ms: float) -> IndexReport:
    """The fastest kind that meets the recall target; kinds within ``latency_tolerance_ms`` of
    it count as equally fast and the most exact of them wins. Flat always meets the target
    (it is exact) unless the target is above 1; if none does, the best recall wins."""
    meeting = [r for r in reports if r.meets_target]
    if not meeting:
        return max(reports, key=lambda r: r.recall_at_100)
    fastest = min(r.p50_ms for r in meeting)
    return max(
        (r for r in meeting if r.p50_ms <= fastest + latency_tolerance_ms), key=lambda r: (r.recall_at_100, -r.p50_ms)
    )


def build_index(
    item_ids: np.ndarray,
    vectors: np.ndarray,
    config: IndexConfig,
    query_vectors: np.ndarray,
    top_k: int,
    seed: int = 42,
) -> tuple[faiss.Index, IndexChoice]:
    """The configured kind (or, for ``auto``, the chosen one), measured on real query vectors."""
    queries = RecallQueries.from_vectors(item_ids, vectors, query_vectors, seed)
    if config.kind != "auto":
        index, report = build_measured(config.kind, item_ids, vectors, config, queries, top_k, seed)
        return index, IndexChoice(report, config.min_recall, [report])
    kinds, skipped = trainable_kinds(len(item_ids), vectors.shape[1], config)
    built = {kind: build_measured(kind, item_ids, vectors, config, queries, top_k, seed) for kind in kinds}
    reports = [report for _, report in built.values()]
    chosen = choose_kind(reports, config.latency_tolerance_ms)
    return built[chosen.kind][0], IndexChoice(chosen, config.min_recall, reports, skipped)


def print_choice(choice: IndexChoice) -> None:
    print(f"[index] kinds measured on held-out query vectors (target Recall@100 >= {choice.min_recall}):")
    for r in choice.candidates:
        knob = ", ".join(f"{k}={v}" for k, v in r.search_knob.items()) or "exact"
        mark = "<- chosen" if r is choice.chosen else ("" if r.meets_target else "(misses the target)")
        print(
            f"  {r.kind:<9} {knob:<13} R@10 {r.recall_at_10:.4f}  R@100 {r.recall_at_100:.4f}  "
            f"p50 {r.p50_ms:.3f} ms  built in {r.build_s:.1f} s {mark}"
        )
    for kind, reason in choice.skipped.items():
        print(f"  {kind:<9} skipped: {reason}")


def build_reference_index(item_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """The index the public NVIDIA example's ``setup_faiss`` builds (IVF32, nprobe 8), for comparison,
    inside the id map the recipe's search operator reads."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], "IDMap2,IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    faiss_base(index).nprobe = 8
    index.train(vectors)
    index.add_with_ids(vectors, np.asarray(item_ids, dtype=np.int64))
    return index


def exact_search(
    item_ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product in NumPy: the reference any index is checked against
    (queries in chunks, so a million-item catalogue needs no queries x items matrix)."""
    vectors, item_ids = np.asarray(vectors, dtype=np.float32), np.asarray(item_ids)
    found, found_scores = [], []
    for start in range(0, len(queries), chunk):
        scores = np.asarray(queries[start : start + chunk], dtype=np.float32) @ vectors.T
        part = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < scores.shape[1]
            else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
        )
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        found.append(item_ids[np.take_along_axis(part, order, axis=1)])
        found_scores.append(np.take_along_axis(part_scores, order, axis=1))
    return np.concatenate(found), np.concatenate(found_scores)


def overlap_at_k(found: np.ndarray, expected: np.ndarray) -> float:
    """Mean share of each row of ``expected`` ids that also appears in the same row of ``found``
    (recall of an index against exact search; 1.0 means identical top-k sets)."""
    if found.shape != expected.shape:
        raise ValueError(f"shapes differ: {found.shape} vs {expected.shape}")
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected)]))
