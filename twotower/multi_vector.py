"""Multi-vector retrieval for ``model.name=inttower``: FAISS over item heads, exact FE re-scoring.

The FE score, ``sum over user heads of max over item heads of <u_h, v_k>``, is not one inner
product, so a single-vector index cannot rank by it. It is large for an item when its best head
is close to many user heads, so each user head's nearest item heads are the likely winners:

1. every item's head vectors go into one FAISS inner-product index, one row per (item, head),
   rows item-major (row // item heads is the item's catalogue position);
2. each of a user's head vectors (every FE layer's) fetches its ``depth`` best rows;
3. the union of those rows' items is re-scored exactly by the FE score (``fe_score_matrix``),
   the user's seen items are put last, and the best ``k`` are returned.

A user whose union holds fewer than ``k`` unseen items searches again at twice the depth, up to
every row, so the answer always has ``k`` items and is the exact top k once the depth covers
the index. The approximation is only in step 2: an item none of whose heads is among any user
head's ``depth`` nearest rows is never scored.
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp

from twotower.models.inttower import fe_score_matrix


def check_heads(query_heads: np.ndarray, item_heads: np.ndarray, k: int, depth: int) -> None:
    """ValueError for inputs the retriever cannot answer, naming what is wrong."""
    if query_heads.ndim != 3 or item_heads.ndim != 3:
        raise ValueError(f"heads are [rows, heads, size]: got query heads {query_heads.shape} and item heads {item_heads.shape}")
    if query_heads.shape[2] != item_heads.shape[2]:
        raise ValueError(f"query head size {query_heads.shape[2]} differs from item head size {item_heads.shape[2]}")
    if not 1 <= k <= len(item_heads):
        raise ValueError(f"k={k}: between 1 and the catalogue's {len(item_heads)} items")
    if depth < 1:
        raise ValueError(f"depth={depth}: at least 1 item head per query head")


def head_index(item_heads: np.ndarray) -> faiss.IndexFlatIP:
    """Exact inner-product index over every item head, one row per (item, head), item-major."""
    rows = np.ascontiguousarray(item_heads.reshape(-1, item_heads.shape[2]), dtype=np.float32)
    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)
    return index


def candidate_items(index: faiss.Index, query_heads: np.ndarray, depth: int, heads_per_item: int) -> list[np.ndarray]:
    """Per user, the catalogue positions (sorted, unique) of the items whose heads are among the
    ``depth`` best rows of any of the user's head vectors."""
    users, heads, size = query_heads.shape
    _, rows = index.search(np.ascontiguousarray(query_heads.reshape(-1, size), dtype=np.float32), min(depth, index.ntotal))
    per_user = rows.reshape(users, -1)
    return [np.unique(found[found >= 0] // heads_per_item) for found in per_user]


def rescored_top_k(query_heads: np.ndarray, item_heads: np.ndarray, candidates: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """One user's ``k`` best ``candidates`` by exact FE score, seen ones last; and how many
    candidates are unseen."""
    scores = fe_score_matrix(query_heads[None], item_heads[candidates]).numpy()[0]
    unseen = ~np.isin(candidates, seen)
    scores[~unseen] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return candidates[order], int(unseen.sum())


def multi_vector_top_k(query_heads: np.ndarray, item_heads: np.ndarray, k: int, depth: int, seen: sp.csr_matrix | None = None) -> np.ndarray:
    """Each user's ``k`` best catalogue positions by FE score through the head index: [users, k].

    ``query_heads`` [users, query heads, size]: every FE layer's user heads; ``item_heads``
    [items, item heads, size], row order is the catalogue's; ``seen`` [users, items], nonzero
    for items to exclude; ``depth``: rows each query head fetches first (see the module)."""
    check_heads(query_heads, item_heads, k, depth)
    if seen is not None and seen.shape != (len(query_heads), len(item_heads)):
        raise ValueError(f"seen is {seen.shape}; expected users x items {(len(query_heads), len(item_heads))}")
    seen = sp.csr_matrix((len(query_heads), len(item_heads))) if seen is None else seen.tocsr()
    index = head_index(item_heads)
    heads_per_item = item_heads.shape[1]
    top = np.empty((len(query_heads), k), dtype=np.int64)
    for user, candidates in enumerate(candidate_items(index, query_heads, depth, heads_per_item)):
        user_seen = seen.indices[seen.indptr[user] : seen.indptr[user + 1]]
        user_depth = depth
        best, unseen = rescored_top_k(query_heads[user], item_heads, candidates, user_seen, k)
        while unseen < k and user_depth < index.ntotal:  # too few unseen candidates: search deeper
            user_depth *= 2
            candidates = candidate_items(index, query_heads[user : user + 1], user_depth, heads_per_item)[0]
            best, unseen = rescored_top_k(query_heads[user], item_heads, candidates, user_seen, k)
        top[user] = best
    return top


def overlap_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over users of the share of the exact top ``k`` that ``found``'s top ``k`` holds."""
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(found, exact)]))
