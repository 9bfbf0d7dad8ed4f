import numpy as np
import pandas as pd
import pytest

from twotower.data import (
    INTERACTION_COLUMNS,
    load_movielens_1m,
    make_synthetic,
    positives,
    split_by_time,
    validate_columns,
)

pytestmark = pytest.mark.unit


def test_missing_column_is_named():
    frame = pd.DataFrame({"user_id": [1], "item_id": [2], "rating": [4.0]})
    with pytest.raises(ValueError, match="missing column 'timestamp'"):
        validate_columns(frame, INTERACTION_COLUMNS, "inter.csv")


def test_mistyped_column_is_named():
    frame = pd.DataFrame({"user_id": [1, 2], "item_id": [2, 3], "rating": [4.0, "five"], "timestamp": [1, 2]})
    with pytest.raises(ValueError, match="column 'rating' must be numeric.*'five'"):
        validate_columns(frame, INTERACTION_COLUMNS, "inter.csv")


def test_fractional_id_is_rejected():
    frame = pd.DataFrame({"user_id": [1.5], "item_id": [2], "rating": [4.0], "timestamp": [1]})
    with pytest.raises(ValueError, match="column 'user_id' must hold whole numbers"):
        validate_columns(frame, INTERACTION_COLUMNS, "inter.csv")


def test_temporal_split_holds_out_each_users_latest_positives():
    data = make_synthetic(n_users=50, n_items=40, per_user=20, seed=0)
    pos = positives(data.interactions, 4.0)
    split = split_by_time(pos, test_fraction=0.2, validation_fraction=0.1)
    assert len(split.train) + len(split.valid) + len(split.test) == len(pos)
    for user_id, group in pos.groupby("user_id"):
        train = split.train[split.train.user_id == user_id]
        valid = split.valid[split.valid.user_id == user_id]
        test = split.test[split.test.user_id == user_id]
        assert len(test) == int(np.floor(len(group) * 0.2))
        # nothing a user did later is used to predict what that user did earlier
        if len(test):
            assert train.timestamp.max() <= test.timestamp.min()
        if len(valid):
            assert train.timestamp.max() <= valid.timestamp.min()
            if len(test):
                assert valid.timestamp.max() <= test.timestamp.min()


def test_positives_keep_ratings_at_threshold():
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "rating": [3.0, 4.0, 5.0], "timestamp": [1, 2, 3]})
    assert positives(frame, 4.0)["item_id"].tolist() == [2, 3]


def test_movielens_1m_is_read_from_the_installed_package():
    data = load_movielens_1m()
    assert len(data.interactions) == 1_000_209
    assert data.users["user_id"].nunique() == 6040
    assert data.interactions["item_id"].nunique() == 3706
    assert set(data.users.columns) >= {"age", "gender", "occupation", "zip_code"}
    toy_story = data.items[data.items["title"] == "Toy Story (1995)"].iloc[0]
    assert toy_story["year"] == 1995 and "Animation" in list(toy_story["genres"])


def test_history_is_causal_and_bounded():
    from twotower.data import causal_history, latest_history

    rows = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "item_id": [5, 6, 7, 8, 9, 10], "timestamp": [1, 2, 3, 4, 1, 2]})
    assert causal_history(rows, 2).tolist() == [[], [5], [5, 6], [6, 7], [], [9]]
    assert latest_history(rows, np.array([1, 2, 3]), 2).tolist() == [[7, 8], [9, 10], []]
