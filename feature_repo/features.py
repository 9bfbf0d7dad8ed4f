"""Feast definitions: users and items with the features the recipe serves.

The offline sources are the parquet files the pipeline writes into ``data/`` of
the deployed copy of this folder; the online store holds the latest row per id.

- ``user_features``: the raw profile (the id as the data files spell it, ``external_id``,
  and the declared user features) plus the user's latest positives (``history``, the query
  tower's list feature) and every earlier positive (``seen_items``, for excluding
  already-seen items at serving time).
- ``user_query_features``: the same user features already encoded by the saved
  NVTabular user workflow, so a request needs no per-request transform.
- ``item_features``: the item's external id and declared side features (titles too).
- ``recipe_run``: one row, the fingerprint of the NVTabular workflow whose codes the store
  holds; the serving graph compares it with its own at load (twotower/store/manifest.py).
"""

from datetime import timedelta
from pathlib import Path

import yaml
from feast import Entity, FeatureView, Field, FileSource, types
from feast.value_type import ValueType

# Feast records absolute source paths; the pipeline builds the repository in a staging folder
# and runs this file as if it were already in its final folder (feature_store.load_definitions).
DATA_DIR = Path(__file__).resolve().parent / "data"
STATIC = timedelta(0)  # profile features never expire
# Each view's columns follow the data set's declared schema; the pipeline writes them beside this
# file when it deploys the repository (twotower/stages/features.py, write_sources). While this file
# runs "as if" in its final folder, the pipeline names the folder it really is in.
DEFINITIONS_DIR = globals().get("TWOTOWER_DEFINITIONS_DIR") or Path(__file__).resolve().parent
COLUMNS = yaml.safe_load((DEFINITIONS_DIR / "columns.yaml").read_text())


def _feast_type(name: str):
    """``Int64``, ``String``, ``Array(Int64)``... as a feast.types type."""
    if name.startswith("Array("):
        return types.Array(getattr(types, name[len("Array(") : -1]))
    return getattr(types, name)


user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="dataset user id")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="dataset item id")
run = Entity(name="run", join_keys=["run_id"], value_type=ValueType.INT64, description="always 0: the store's one run")


def _source(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(DATA_DIR / f"{name}.parquet"), timestamp_field="event_timestamp")


def _view(name: str, entity: Entity) -> FeatureView:
    return FeatureView(
        name=name,
        entities=[entity],
        ttl=STATIC,
        schema=[Field(name=column, dtype=_feast_type(kind)) for column, kind in COLUMNS[name].items()],
        source=_source(name),
        online=True,
    )


user_features = _view("user_features", user)
user_query_features = _view("user_query_features", user)
item_features = _view("item_features", item)
recipe_run = _view("recipe_run", run)
