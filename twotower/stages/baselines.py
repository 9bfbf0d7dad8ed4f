"""Non-neural baselines on the same protocol: popularity and EASE (Steck 2019)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twotower.stages.evaluate import EvalSet, evaluate_scores, user_item_matrix

EASE_REGULARISATION_GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def popularity_scores(train: pd.DataFrame, catalogue_item_ids: np.ndarray) -> np.ndarray:
    counts = train["item_id"].value_counts()
    return counts.reindex(catalogue_item_ids, fill_value=0).to_numpy(dtype=np.float32)


def evaluate_popularity(train: pd.DataFrame, eval_set: EvalSet, catalogue_item_ids: np.ndarray) -> dict[str, float]:
    """Most popular training items the user has not seen."""
    scores = popularity_scores(train, catalogue_item_ids)
    return evaluate_scores(lambda rows: np.broadcast_to(scores, (len(rows), len(scores))), eval_set)


def ease_weights(rows: pd.DataFrame, catalogue_item_ids: np.ndarray, regularisation: float) -> np.ndarray:
    """EASE's closed form: B = I - P diagMat(1 / diag(P)) with P = (X'X + lambda I)^-1, diag(B) = 0."""
    users = np.unique(rows["user_id"])
    interactions = user_item_matrix(rows, users, catalogue_item_ids)
    gram = (interactions.T @ interactions).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += regularisation
    precision = np.linalg.inv(gram)
    weights = precision / -np.diag(precision)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def evaluate_ease(weights: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
    """Scores are the user's earlier positives (``eval_set.seen``) times the item-item weights."""
    return evaluate_scores(lambda rows: eval_set.seen[rows] @ weights, eval_set)


def tune_ease(
    train: pd.DataFrame, valid_set: EvalSet, catalogue_item_ids: np.ndarray, metric: str = "recall@100"
) -> tuple[float, dict[float, float]]:
    """The regularisation with the best validation ``metric`` and every value tried."""
    tried = {
        reg: evaluate_ease(ease_weights(train, catalogue_item_ids, reg), valid_set)[metric]
        for reg in EASE_REGULARISATION_GRID
    }
    return max(tried, key=tried.get), tried
