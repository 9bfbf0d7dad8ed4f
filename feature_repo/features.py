"""Feast definitions: users and items with the features the recipe serves.

The offline sources are the parquet files the pipeline writes into ``data/`` of
the deployed copy of this folder; the online store holds the latest row per id.

- ``user_features``: the raw profile plus the user's latest positives (``history``,
  the query tower's list feature) and every earlier positive (``seen_items``, for
  excluding already-seen items at serving time).
- ``user_query_features``: the same user features already encoded by the saved
  NVTabular user workflow, so a request needs no per-request transform.
- ``item_features``: titles and side features of the movies.
- ``recipe_run``: one row, the fingerprint of the NVTabular workflow whose codes the store
  holds; the serving graph compares it with its own at load (twotower/manifest.py).
"""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Int64, String
from feast.value_type import ValueType

# Feast records absolute source paths; the pipeline builds the repository in a staging folder
# and runs this file as if it were already in its final folder (feature_store.load_definitions).
DATA_DIR = Path(__file__).resolve().parent / "data"
STATIC = timedelta(0)  # profile features never expire

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="dataset user id")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="dataset item id")
run = Entity(name="run", join_keys=["run_id"], value_type=ValueType.INT64, description="always 0: the store's one run")


def _source(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(DATA_DIR / f"{name}.parquet"), timestamp_field="event_timestamp")


user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=STATIC,
    schema=[
        Field(name="age", dtype=Int64),
        Field(name="gender", dtype=String),
        Field(name="occupation", dtype=Int64),
        Field(name="zip_code", dtype=String),
        Field(name="history", dtype=Array(Int64)),
        Field(name="seen_items", dtype=Array(Int64)),
    ],
    source=_source("user_features"),
    online=True,
)

user_query_features = FeatureView(
    name="user_query_features",
    entities=[user],
    ttl=STATIC,
    schema=[
        Field(name="encoded_user_id", dtype=Int64),
        Field(name="encoded_age", dtype=Int64),
        Field(name="encoded_gender", dtype=Int64),
        Field(name="encoded_occupation", dtype=Int64),
        Field(name="encoded_zip_code", dtype=Int64),
        Field(name="encoded_history", dtype=Array(Int64)),
    ],
    source=_source("user_query_features"),
    online=True,
)

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=STATIC,
    schema=[
        Field(name="title", dtype=String),
        Field(name="year", dtype=Int64),
        Field(name="genres", dtype=Array(String)),
    ],
    source=_source("item_features"),
    online=True,
)

recipe_run = FeatureView(
    name="recipe_run",
    entities=[run],
    ttl=STATIC,
    schema=[Field(name="workflow_fingerprint", dtype=String)],
    source=_source("recipe_run"),
    online=True,
)
