"""Stage 5: deploy the Feast repository, write its sources, apply and materialize.

``feature_repo/`` in the project holds the declarative definitions; each run gets
its own copy under the output folder, with its parquet sources, registry and
SQLite online store beside it.
"""

from __future__ import annotations

import importlib.util
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
from feast import Entity, FeatureStore, FeatureView
from feast.data_source import DataSource

from twotower.config import PROJECT_ROOT
from twotower.data import USER_FEATURES, RecipeData

TEMPLATE_DIR = PROJECT_ROOT / "feature_repo"
USER_VIEW = "user_features"
ITEM_VIEW = "item_features"
DEFINITION_FILES = ("feature_store.yaml", "features.py")
# Feature rows are stamped with one fixed time so that runs are reproducible.
FEATURE_TIMESTAMP = datetime(2003, 3, 1, tzinfo=timezone.utc)


def deploy_repo(repo_dir: Path) -> Path:
    """Copy the definitions into ``repo_dir`` (a fresh copy each run)."""
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    (repo_dir / "data").mkdir(parents=True)
    for name in DEFINITION_FILES:
        shutil.copy2(TEMPLATE_DIR / name, repo_dir / name)
    return repo_dir


def write_sources(data: RecipeData, repo_dir: Path) -> None:
    stamp = pd.Timestamp(FEATURE_TIMESTAMP)
    users = data.users[["user_id", *USER_FEATURES]].assign(event_timestamp=stamp)
    items = data.items[["item_id", "title", "year", "genres"]].assign(
        event_timestamp=stamp, genres=data.items["genres"].map(list)
    )
    users.to_parquet(repo_dir / "data" / "user_features.parquet", index=False)
    items.to_parquet(repo_dir / "data" / "item_features.parquet", index=False)


def load_definitions(repo_dir: Path) -> list:
    """The Feast objects the definitions file declares (what ``feast apply`` collects)."""
    spec = importlib.util.spec_from_file_location("twotower_feature_definitions", repo_dir / "features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [value for value in vars(module).values() if isinstance(value, (Entity, FeatureView, DataSource))]


def apply_and_materialize(repo_dir: Path) -> FeatureStore:
    """``feast apply`` then ``feast materialize`` (Feast shows a progress bar per view)."""
    store = FeatureStore(repo_path=str(repo_dir))
    store.apply(load_definitions(repo_dir))
    store.materialize(FEATURE_TIMESTAMP - timedelta(days=1), datetime.now(timezone.utc))
    return store


def build_feature_store(data: RecipeData, repo_dir: Path) -> FeatureStore:
    deploy_repo(repo_dir)
    write_sources(data, repo_dir)
    return apply_and_materialize(repo_dir)


def online_user_features(store: FeatureStore, user_ids: list[int]) -> pd.DataFrame:
    """Online feature rows for ``user_ids``, in order; unknown users have nulls."""
    response = store.get_online_features(
        features=[f"{USER_VIEW}:{name}" for name in USER_FEATURES],
        entity_rows=[{"user_id": int(u)} for u in user_ids],
    )
    return pd.DataFrame(response.to_dict())[["user_id", *USER_FEATURES]]
