import numpy as np
import pandas as pd
import pytest
from conftest import served_user_columns
from feast import FeatureStore

from twotower.store.features import QUERY_VIEW, USER_VIEW, OnlineReader, online_user_features

pytestmark = pytest.mark.integration


def test_materialized_user_rows_come_back_online(exported):
    store = FeatureStore(repo_path=str(exported.feature_repo_dir))
    users = pd.read_parquet(exported.data_dir / "users.parquet").head(5)
    online = online_user_features(store, users["user_id"].tolist(), served_user_columns(exported))
    pd.testing.assert_frame_equal(
        online.reset_index(drop=True), users[online.columns].reset_index(drop=True), check_dtype=False
    )


def test_unknown_user_has_no_online_row(exported):
    store = FeatureStore(repo_path=str(exported.feature_repo_dir))
    online = online_user_features(store, [-1], served_user_columns(exported))
    assert online.drop(columns="user_id").isna().all(axis=None)


def test_the_served_reader_answers_as_feasts_sdk_reading_only_the_features_asked(exported):
    """Serving reads SQLite with a query of its own (not Feast's online_read): the values must be the
    SDK's, row by row, an unknown user must get None, and ``features`` must leave the others out."""
    store = FeatureStore(repo_path=str(exported.feature_repo_dir))
    users = pd.read_parquet(exported.data_dir / "users.parquet")["user_id"].head(4).tolist()
    ids = np.array([users[2], -1, *users])  # out of order, an unknown id in the middle
    for view, features in ((QUERY_VIEW, None), (USER_VIEW, ("seen_items",)), (USER_VIEW, None)):
        reader = OnlineReader(store, view, features)
        names = list(features or [field.name for field in store.get_feature_view(view).features])
        sdk = store.get_online_features(
            features=[f"{view}:{name}" for name in names], entity_rows=[{"user_id": int(i)} for i in ids]
        ).to_dict()
        rows = reader.read(ids)
        assert rows[1] is None
        for position, row in enumerate(rows):
            if position != 1:
                assert row == {name: sdk[name][position] for name in names}
