import numpy as np
import pandas as pd
import pytest

from twotower.stages.evaluate import build_eval_set, ranking_metrics, top_k_positions

pytestmark = pytest.mark.unit

CATALOGUE = np.array([10, 20, 30, 40, 50])


def test_seen_items_are_excluded_and_metrics_match_hand_computation():
    held_out = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [30, 99, 10]})  # 99 is outside the catalogue
    earlier = pd.DataFrame({"user_id": [1, 2], "item_id": [50, 20]})
    eval_set = build_eval_set(held_out, earlier, CATALOGUE)
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 0.9], [0.5, 0.9, 0.1, 0.2, 0.3]], dtype=np.float32)
    top = top_k_positions(lambda rows: scores[rows], eval_set, k=4)
    # user 1 saw item 50 (best score) -> excluded; user 2 saw item 20
    assert CATALOGUE[top[0]].tolist() == [40, 30, 20, 10]
    assert CATALOGUE[top[1]].tolist() == [10, 50, 40, 30]
    metrics = ranking_metrics(top, eval_set, ks=(1, 2))
    assert metrics["recall@1"] == pytest.approx((0 / 2 + 1 / 1) / 2)
    assert metrics["recall@2"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    ndcg_user1 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert metrics["ndcg@10"] == pytest.approx((ndcg_user1 + 1.0) / 2)
    assert metrics["mrr@100"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["coverage@10"] == pytest.approx(5 / 5)  # 40,30,20,10 and 50
