"""Stage 5: deploy the Feast repository, write its sources, apply and materialize.

``feature_repo/`` in the project holds the declarative definitions; each run gets
its own copy under the output folder, with its parquet sources, registry and
SQLite online store beside it, or with its online store on Redis
(``features.online_store``).
"""

from __future__ import annotations

import importlib.util
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import yaml
from feast import Entity, FeatureStore, FeatureView
from feast.data_source import DataSource

from twotower.config import PROJECT_ROOT, FeaturesConfig
from twotower.data import USER_FEATURES, RecipeData

TEMPLATE_DIR = PROJECT_ROOT / "feature_repo"
USER_VIEW = "user_features"
ITEM_VIEW = "item_features"
DEFINITION_FILES = ("feature_store.yaml", "features.py")
# Feature rows are stamped with one fixed time so that runs are reproducible.
FEATURE_TIMESTAMP = datetime(2003, 3, 1, tzinfo=timezone.utc)


def online_store_settings(features: FeaturesConfig) -> dict | None:
    """The ``online_store`` section for ``features``; None keeps the template's SQLite file."""
    if features.online_store == "sqlite":
        return None
    if features.online_store == "redis":
        return {"type": "redis", "connection_string": features.redis_connection}
    raise ValueError(f"features.online_store must be 'sqlite' or 'redis', got {features.online_store!r}")


def deploy_repo(repo_dir: Path, features: FeaturesConfig | None = None) -> Path:
    """Copy the definitions into ``repo_dir`` (a fresh copy each run), online store as configured."""
    online_store = online_store_settings(features or FeaturesConfig())
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    (repo_dir / "data").mkdir(parents=True)
    for name in DEFINITION_FILES:
        shutil.copy2(TEMPLATE_DIR / name, repo_dir / name)
    if online_store is not None:
        settings_path = repo_dir / "feature_store.yaml"
        settings = yaml.safe_load(settings_path.read_text())
        settings["online_store"] = online_store
        settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
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


def build_feature_store(data: RecipeData, repo_dir: Path, features: FeaturesConfig | None = None) -> FeatureStore:
    deploy_repo(repo_dir, features)
    write_sources(data, repo_dir)
    return apply_and_materialize(repo_dir)


def online_user_features(store: FeatureStore, user_ids: list[int]) -> pd.DataFrame:
    """Online feature rows for ``user_ids``, in order; unknown users have nulls."""
    response = store.get_online_features(
        features=[f"{USER_VIEW}:{name}" for name in USER_FEATURES],
        entity_rows=[{"user_id": int(u)} for u in user_ids],
    )
    return pd.DataFrame(response.to_dict())[["user_id", *USER_FEATURES]]
