"""Full-catalogue retrieval metrics, shared by training, benchmarks and notebooks.

Protocol: every evaluated user is scored against every catalogue item; items the
user already had as positives before the evaluated period are excluded from the
candidates. Recall counts all held-out positives in its denominator, including
items outside the catalogue (items never seen in training), which count as misses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from twotower.config import RecipeConfig
from twotower.store.artifacts import (
    ServingSignature,
    call_signature,
    known_before_test,
    load_item_vectors,
    load_recipe_data,
    load_split,
)

RECALL_KS = (10, 20, 50, 100)


@dataclass
class EvalSet:
    user_ids: np.ndarray  # dataset ids of the evaluated users
    relevant: sp.csr_matrix  # users x catalogue, held-out positives
    n_relevant: np.ndarray  # held-out positives per user, catalogue or not
    seen: sp.csr_matrix  # users x catalogue, earlier positives to exclude


def user_item_matrix(rows: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray) -> sp.csr_matrix:
    user_pos = pd.Index(user_ids).get_indexer(rows["user_id"])
    item_pos = pd.Index(item_ids).get_indexer(rows["item_id"])
    keep = (user_pos >= 0) & (item_pos >= 0)
    data = np.ones(int(keep.sum()), dtype=np.float32)
    matrix = sp.csr_matrix((data, (user_pos[keep], item_pos[keep])), shape=(len(user_ids), len(item_ids)))
    matrix.data[:] = 1.0  # duplicates collapse to one
    return matrix


def build_eval_set(held_out: pd.DataFrame, earlier: pd.DataFrame, catalogue_item_ids: np.ndarray) -> EvalSet:
    """Users with held-out positives, their targets and the earlier positives to exclude."""
    user_ids = np.sort(held_out["user_id"].unique())
    n_relevant = held_out.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    return EvalSet(
        user_ids=user_ids,
        relevant=user_item_matrix(held_out, user_ids, catalogue_item_ids),
        n_relevant=n_relevant.reindex(user_ids).to_numpy(),
        seen=user_item_matrix(earlier, user_ids, catalogue_item_ids),
    )


def top_k_positions(
    score_users: Callable[[np.ndarray], np.ndarray], eval_set: EvalSet, k: int, chunk: int = 1024
) -> np.ndarray:
    """Best-first catalogue positions per user, seen items excluded.

    ``score_users(rows)`` returns a (len(rows), n_items) score matrix for those
    rows of the eval set, so models never materialise all users at once.
    """
    n_users = len(eval_set.user_ids)
    n_items = eval_set.seen.shape[1]
    k = min(k, n_items)
    out = np.empty((n_users, k), dtype=np.int64)
    for start in range(0, n_users, chunk):
        rows = np.arange(start, min(start + chunk, n_users))
        scores = np.asarray(score_users(rows), dtype=np.float32).copy()
        seen = eval_set.seen[rows]
        scores[seen.nonzero()] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(part, order, axis=1)
    return out


def ranking_metrics(top: np.ndarray, eval_set: EvalSet, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@K, NDCG@10, MRR@100 and top-10 catalogue coverage, averaged over users."""
    hits = np.take_along_axis(eval_set.relevant.toarray(), top, axis=1) > 0
    n_rel = np.maximum(eval_set.n_relevant, 1)
    metrics = {f"recall@{k}": float(np.mean(hits[:, :k].sum(axis=1) / n_rel)) for k in ks if k <= top.shape[1]}
    discounts = 1.0 / np.log2(np.arange(2, 12))
    dcg = (hits[:, :10] * discounts[: min(10, top.shape[1])]).sum(axis=1)
    ideal = np.array([discounts[: min(int(n), 10)].sum() for n in n_rel])
    metrics["ndcg@10"] = float(np.mean(dcg / ideal))
    first_hit = np.where(hits[:, :100].any(axis=1), hits[:, :100].argmax(axis=1) + 1, np.inf)
    metrics["mrr@100"] = float(np.mean(1.0 / first_hit))
    metrics["coverage@10"] = float(len(np.unique(top[:, :10])) / eval_set.seen.shape[1])
    return metrics


def evaluate_embeddings(user_vectors: np.ndarray, item_vectors: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
    """Metrics of dot-product retrieval; ``user_vectors`` rows follow ``eval_set.user_ids``."""
    return evaluate_scores(lambda rows: user_vectors[rows] @ item_vectors.T, eval_set)


def evaluate_scores(score_users: Callable[[np.ndarray], np.ndarray], eval_set: EvalSet) -> dict[str, float]:
    return ranking_metrics(top_k_positions(score_users, eval_set, max(RECALL_KS)), eval_set)


def evaluate_index(
    index, query_vectors: np.ndarray, eval_set: EvalSet, catalogue_item_ids: np.ndarray
) -> dict[str, float]:
    """Metrics of the serving path: the FAISS index's top items per query vector, each user's
    seen items excluded by the index search itself, as the server does."""
    from twotower.store.index import ItemIndex

    seen = np.split(catalogue_item_ids[eval_set.seen.indices], eval_set.seen.indptr[1:-1])  # one array per user
    ids, _ = ItemIndex(index).search(query_vectors, min(max(RECALL_KS), len(catalogue_item_ids)), seen)
    positions = pd.Series(np.arange(len(catalogue_item_ids)), index=catalogue_item_ids)
    return ranking_metrics(positions.reindex(ids.reshape(-1)).to_numpy().reshape(ids.shape), eval_set)


def saved_query_vectors(config: RecipeConfig, user_ids) -> np.ndarray:
    """Query vectors for dataset user ids from what is on disk, as the server computes them:
    features (history: everything before the test period) encoded by the saved user workflow,
    embedded by the query tower's serving signature."""

    data, split = load_recipe_data(config.data_dir), load_split(config.splits_dir)
    return query_vectors_of(config, data.users, known_before_test(split), user_ids)


def query_vectors_of(config: RecipeConfig, users: pd.DataFrame, history_rows: pd.DataFrame, user_ids) -> np.ndarray:
    """Query vectors of ``user_ids`` (rows of the side table ``users``, history from the positives
    ``history_rows``) through the run's saved user workflow and query tower, as the server computes them."""
    from twotower.stages.workflow import encoded_users, load_saved_workflows

    encoded = encoded_users(load_saved_workflows(config.workflow_dir), users, history_rows, config.train.history_length)
    return call_signature(ServingSignature(config.query_tower_dir), encoded.loc[np.asarray(user_ids)])


def validation_query_vectors(config: RecipeConfig) -> np.ndarray:
    """Served query vectors of up to ``index.recall_queries`` validation users (seeded sample):
    real queries for measuring an index's recall, none of them test users' held-out period."""

    users = load_split(config.splits_dir).valid["user_id"].drop_duplicates().to_numpy()
    sample = np.random.default_rng(config.seed).permutation(users)[: config.index.recall_queries]
    return saved_query_vectors(config, np.sort(sample))


def serving_side_metrics(config: RecipeConfig, items: np.ndarray | None = None) -> dict[str, float]:
    """Test metrics through the saved query tower and the FAISS index (the served path). With
    ``items``, only test positives of those items count, over the users who have one; the
    ranking is still over the whole catalogue."""
    from twotower.store.index import load_index

    split = load_split(config.splits_dir)
    catalogue_ids, _ = load_item_vectors(config.item_vectors_path)
    held_out = split.test if items is None else split.test[split.test["item_id"].isin(items)]
    test_set = build_eval_set(held_out, known_before_test(split), catalogue_ids)
    vectors = saved_query_vectors(config, test_set.user_ids)
    return evaluate_index(load_index(config.index_path), vectors, test_set, catalogue_ids)
