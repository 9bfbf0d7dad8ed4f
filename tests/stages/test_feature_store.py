import pandas as pd
import pytest
from conftest import served_user_columns
from feast import FeatureStore

from twotower.store.features import online_user_features

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
