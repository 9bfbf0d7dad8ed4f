"""Multi-vector scoring and retrieval for ``model.name=inttower``: FAISS over item heads, exact
FE re-scoring, in process and in the Triton graph (NumPy and FAISS only: the executor imports it
without merlin.models).

The FE score, ``sum over user heads of max over item heads of <u_h, v_k>``, is not one inner
product, so a single-vector index cannot rank by it. It is large for an item when its best head
is close to many user heads, so each user head's nearest item heads are the likely winners:

1. every item's head vectors go into one FAISS inner-product index, one row per (item, head),
   each row carrying its item's id (``HeadIndex``);
2. each of a user's head vectors (every FE layer's) fetches its ``depth`` best rows;
3. the union of those rows' items is re-scored exactly by the FE score (``fe_scores``), the
   user's seen items are put last, and the best ``k`` are returned.

A user whose union holds fewer than ``k`` unseen items searches again at twice the depth, up to
every row, so the answer always has ``k`` items and is the exact top k once the depth covers
the index. The approximation is only in step 2: an item none of whose heads is among any user
head's ``depth`` nearest rows is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class HeadShape:
    """How a multi-vector model's flat tower outputs split into head vectors: query vectors are
    [n, fe layers * user heads * size], item vectors [n, item heads * size]."""

    fe_layers: int
    user_heads: int
    item_heads: int
    head_size: int

    @property
    def query_heads(self) -> int:
        return self.fe_layers * self.user_heads

    def query(self, vectors):
        """Flat query vectors [n, fe layers * user heads * size] -> [n, fe layers * user heads, size]."""
        return self._split(vectors, self.query_heads, "query")

    def items(self, vectors):
        """Flat item vectors [n, item heads * size] -> [n, item heads, size]."""
        return self._split(vectors, self.item_heads, "item")

    @staticmethod
    def _reshape(vectors, shape):
        return np.reshape(vectors, shape)

    def _split(self, vectors, heads: int, side: str):
        width = int(vectors.shape[-1])
        if width != heads * self.head_size:
            raise ValueError(
                f"{side} vectors of width {width}; "
                f"this IntTower's are {heads} heads x {self.head_size} = {heads * self.head_size}"
            )
        return self._reshape(vectors, [-1, heads, self.head_size])


def fe_scores(query_heads: np.ndarray, item_heads: np.ndarray) -> np.ndarray:
    """One user's FE score of each item: ``query_heads`` [query heads, size], ``item_heads``
    [items, item heads, size] -> [items]."""
    return np.einsum("hd,ikd->ihk", query_heads, item_heads, optimize=True).max(axis=2).sum(axis=1)


def check_heads(query_heads: np.ndarray, item_heads: np.ndarray, k: int, depth: int) -> None:
    """ValueError for inputs the retriever cannot answer, naming what is wrong."""
    if query_heads.ndim != 3 or item_heads.ndim != 3:
        raise ValueError(
            f"heads are [rows, heads, size]: got query heads {query_heads.shape} and item heads {item_heads.shape}"
        )
    if query_heads.shape[2] != item_heads.shape[2]:
        raise ValueError(f"query head size {query_heads.shape[2]} differs from item head size {item_heads.shape[2]}")
    if not 1 <= k <= len(item_heads):
        raise ValueError(f"k={k}: between 1 and the catalogue's {len(item_heads)} items")
    if depth < 1:
        raise ValueError(f"depth={depth}: at least 1 item head per query head")


class HeadIndex:
    """An exact inner-product FAISS index over every item head (an ``IndexIDMap`` whose rows carry
    their item's id, each id once per head), searched by the union-and-rescore procedure above.
    The item heads for re-scoring are read back from the index, so the index file is the whole
    served artifact."""

    def __init__(self, index: faiss.IndexIDMap, heads_per_item: int):
        if index.ntotal % heads_per_item:
            raise ValueError(
                f"the index holds {index.ntotal} rows, not a whole number of items of {heads_per_item} heads"
            )
        self.index = index
        rows = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
        self.item_heads = rows.reshape(-1, heads_per_item, index.d)
        self.item_ids = faiss.vector_to_array(index.id_map)[::heads_per_item].astype(np.int64)
        self._positions = pd.Index(self.item_ids)

    @classmethod
    def build(cls, item_ids: np.ndarray, item_heads: np.ndarray) -> HeadIndex:
        """``item_heads`` [items, heads, size] of the items ``item_ids``, in that order."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_heads.ndim != 3 or len(item_ids) != len(item_heads) or len(np.unique(item_ids)) != len(item_ids):
            raise ValueError(
                "need unique item ids, one per [heads, size] block: "
                f"got {len(item_ids)} ids for heads {item_heads.shape}"
            )
        index = faiss.IndexIDMap(faiss.IndexFlatIP(item_heads.shape[2]))
        index.add_with_ids(
            np.ascontiguousarray(item_heads.reshape(-1, item_heads.shape[2]), dtype=np.float32),
            np.repeat(item_ids, item_heads.shape[1]),
        )
        return cls(index, item_heads.shape[1])

    @property
    def ntotal(self) -> int:
        """Items (not rows) in the index."""
        return len(self.item_ids)

    def search(
        self, query_heads: np.ndarray, k: int, depth: int, seen: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's ``k`` best item ids by FE score and those scores, best first, each user's
        ``seen`` ids last: ``query_heads`` [users, query heads, size] -> ([users, k], [users, k])."""
        check_heads(query_heads, self.item_heads, k, depth)
        seen = [np.empty(0, np.int64)] * len(query_heads) if seen is None else seen
        if len(seen) != len(query_heads):
            raise ValueError(f"{len(seen)} seen lists for {len(query_heads)} users")
        ids = np.empty((len(query_heads), k), dtype=np.int64)
        scores = np.empty((len(query_heads), k), dtype=np.float32)
        for user, candidates in enumerate(self._candidates(query_heads, depth)):
            user_depth, user_seen = depth, self._positions.get_indexer(np.asarray(seen[user]))
            positions, user_scores, unseen = self._rescored(query_heads[user], candidates, user_seen, k)
            while unseen < k and user_depth < self.index.ntotal:  # too few unseen candidates: search deeper
                user_depth *= 2
                candidates = self._candidates(query_heads[user : user + 1], user_depth)[0]
                positions, user_scores, unseen = self._rescored(query_heads[user], candidates, user_seen, k)
            ids[user], scores[user] = self.item_ids[positions], user_scores
        return ids, scores

    def _candidates(self, query_heads: np.ndarray, depth: int) -> list[np.ndarray]:
        """Per user, the positions (sorted, unique) of the items whose heads are among the ``depth``
        best rows of any of the user's head vectors."""
        users, heads, size = query_heads.shape
        _, found = self.index.search(
            np.ascontiguousarray(query_heads.reshape(-1, size), dtype=np.float32), min(depth, self.index.ntotal)
        )
        per_user = found.reshape(users, -1)
        return [self._positions.get_indexer(np.unique(row[row >= 0])) for row in per_user]

    def _rescored(
        self, query_heads: np.ndarray, candidates: np.ndarray, seen: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """The ``k`` best ``candidates`` by exact FE score, unseen before seen; their scores; how
        many candidates are unseen."""
        scores = fe_scores(query_heads, self.item_heads[candidates])
        unseen = ~np.isin(candidates, seen)
        order = np.lexsort((-scores, ~unseen))[:k]  # unseen first, then by score
        return candidates[order], scores[order], int(unseen.sum())


def exact_top_k(heads: HeadIndex, query_heads: np.ndarray, k: int) -> np.ndarray:
    """Each user's ``k`` best item ids by FE score over every item of ``heads``: [users, k]."""
    return np.stack(
        [heads.item_ids[np.argsort(-fe_scores(user, heads.item_heads), kind="stable")[:k]] for user in query_heads]
    )


def multi_vector_top_k(
    query_heads: np.ndarray, item_heads: np.ndarray, k: int, depth: int, seen: sp.csr_matrix | None = None
) -> np.ndarray:
    """Each user's ``k`` best catalogue positions by FE score through the head index: [users, k].

    ``query_heads`` [users, query heads, size]: every FE layer's user heads; ``item_heads``
    [items, item heads, size], row order is the catalogue's; ``seen`` [users, items], nonzero
    for items to exclude; ``depth``: rows each query head fetches first (see the module)."""
    check_heads(query_heads, item_heads, k, depth)
    if seen is not None and seen.shape != (len(query_heads), len(item_heads)):
        raise ValueError(f"seen is {seen.shape}; expected users x items {(len(query_heads), len(item_heads))}")
    seen = sp.csr_matrix((len(query_heads), len(item_heads))) if seen is None else seen.tocsr()
    seen_lists = [seen.indices[seen.indptr[user] : seen.indptr[user + 1]] for user in range(len(query_heads))]
    positions, _ = HeadIndex.build(np.arange(len(item_heads)), item_heads).search(query_heads, k, depth, seen_lists)
    return positions


def overlap_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over users of the share of the exact top ``k`` that ``found``'s top ``k`` holds."""
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(found, exact)]))
