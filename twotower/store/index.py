"""The saved FAISS index and its search: written atomically, read back, searched with each
query's seen items excluded exactly, extended with new items.

Every index is a FAISS factory string inside an ``IDMap2`` (dataset ids; items added later keep
theirs). Searches go to the inner index by catalogue position, because FAISS 1.7.4's id map
refuses search parameters, and each query's seen-item filter is one. Building an index and
choosing its kind by measured recall is the index stage's (``twotower.stages.index``).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from twotower.store.artifacts import MissingArtifact
from twotower.store.atomic import atomic_file

NO_ITEMS = np.empty(0, dtype=np.int64)


def faiss_base(index: faiss.Index) -> faiss.Index:
    """The index inside an id map (what kind of search it runs)."""
    return faiss.downcast_index(index.index) if hasattr(index, "index") else index


def _search_params(target: faiss.Index, selector: faiss.IDSelector | None, exhaustive: bool) -> faiss.SearchParameters:
    """Parameters carry the index's own knob: FAISS uses a parameter object's defaults, not the index's."""
    if isinstance(target, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=target.hnsw.efSearch)
    if isinstance(target, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=target.nlist if exhaustive else target.nprobe)
    return faiss.SearchParameters(sel=selector)


class ItemIndex:
    """Top-k search over an ``IDMap2`` index that excludes each query's seen items exactly.

    Rows without seen items are searched as one batch; each row with seen items is searched
    at depth k with a FAISS selector that skips them, so the depth never grows with the
    heaviest user. A row the approximate search cannot fill (an IVF probe or an HNSW walk that
    found fewer than k unseen items) is searched exhaustively; a user who has seen nearly the
    whole catalogue gets seen items last rather than a short row. No -1 id is returned.
    """

    def __init__(self, index: faiss.Index):
        if not isinstance(index, faiss.IndexIDMap2):
            raise TypeError(f"expected an IDMap2 index over dataset item ids, got {type(index).__name__}")
        self.index = index
        self.base = faiss_base(index)  # holds a reference: the id map owns the inner index
        self.item_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._by_id = np.argsort(self.item_ids, kind="stable")

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalogue positions of the given ids; ids not in the index are left out."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if not len(item_ids) or not self.ntotal:
            return NO_ITEMS
        found = self._by_id[np.minimum(np.searchsorted(self.item_ids, item_ids, sorter=self._by_id), self.ntotal - 1)]
        return np.unique(found[self.item_ids[found] == item_ids])

    def search(
        self, queries: np.ndarray, k: int, seen: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k dataset item ids and scores per query row, best first, without each row's ``seen`` ids."""
        if k > self.ntotal:
            raise ValueError(f"top_k={k} exceeds the catalogue of {self.ntotal} items")
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        excluded = [self.positions(s) for s in seen] if seen is not None else [NO_ITEMS] * len(queries)
        if len(excluded) != len(queries):
            raise ValueError(f"{len(excluded)} seen lists for {len(queries)} queries")
        scores = np.empty((len(queries), k), dtype=np.float32)
        positions = np.empty((len(queries), k), dtype=np.int64)
        plain = np.array([not len(e) for e in excluded], dtype=bool)
        if plain.any():
            scores[plain], positions[plain] = self._faiss_search(self.base, queries[plain], k, None)
        for row in np.flatnonzero(~plain):
            scores[row], positions[row] = self._search_row(queries[row], k, excluded[row], exhaustive=False)
        for row in np.flatnonzero((positions < 0).any(axis=1)):
            scores[row], positions[row] = self._complete_row(queries[row], k, excluded[row])
        return self.item_ids[positions], scores

    def approximate_search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The index's own top-k ids, -1 where it found fewer: what its recall is measured on
        (``search`` would complete such rows exhaustively)."""
        _, positions = self._faiss_search(self.base, np.ascontiguousarray(queries, dtype=np.float32), k, None)
        return np.where(positions >= 0, self.item_ids[positions], -1)

    def _search_row(
        self, query: np.ndarray, k: int, excluded: np.ndarray, exhaustive: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        inner = faiss.IDSelectorBatch(excluded) if len(excluded) else None
        selector = faiss.IDSelectorNot(inner) if inner is not None else None  # both kept alive for the search
        target = self._exhaustive_target() if exhaustive else self.base
        scores, positions = self._faiss_search(target, query[None, :], k, _search_params(target, selector, exhaustive))
        return scores[0], positions[0]

    @staticmethod
    def _faiss_search(
        target: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every FAISS call of a search goes through here (a test counts their depths)."""
        return target.search(queries, k, params=params)

    def _exhaustive_target(self) -> faiss.Index:
        """An index that visits every item: HNSW's flat storage, IVF with every list probed."""
        if isinstance(self.base, faiss.IndexHNSW):
            return faiss.downcast_index(self.base.storage)
        return self.base

    def _complete_row(self, query: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = self._search_row(query, k, excluded, exhaustive=True)
        short = positions < 0
        if short.any():  # fewer unseen items than k: the best seen ones end the row
            all_scores, all_positions = self._search_row(query, k, NO_ITEMS, exhaustive=True)
            fill = np.flatnonzero(~np.isin(all_positions, positions[~short]))[: int(short.sum())]
            positions[short], scores[short] = all_positions[fill], all_scores[fill]
        return scores, positions


def add_items(index: faiss.Index, item_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add new catalogue items to a built (and, for IVF, trained) index without rebuilding it."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    check_items(item_ids, vectors)
    if vectors.shape[1] != index.d:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {index.d}")
    already = np.isin(item_ids, faiss.vector_to_array(index.id_map))
    if already.any():
        raise ValueError(f"{int(already.sum())} item ids are already in the index, e.g. {item_ids[already][0]}")
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), item_ids)


def check_items(item_ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(item_ids) != len(vectors):
        raise ValueError(f"{len(item_ids)} item ids for {len(vectors)} vectors")
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique")


def save_index(index: faiss.Index, path: Path) -> None:
    """Written aside and renamed over ``path``: a reader never sees half an index."""
    with atomic_file(path) as staging:
        faiss.write_index(index, str(staging))


def load_index(path: Path) -> faiss.Index:
    if not Path(path).exists():
        raise MissingArtifact(f"no FAISS index at {path}; run the 'index' stage first")
    return faiss.read_index(str(path))
