"""Feast definitions: users and items with the side features the towers consume.

The offline sources are the parquet files the pipeline writes into ``data/`` of
the deployed copy of this folder; the online store holds the latest row per id.
"""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Int64, String
from feast.value_type import ValueType

DATA_DIR = Path(__file__).resolve().parent / "data"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="dataset user id")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="dataset item id")

user_source = FileSource(
    name="user_source",
    path=str(DATA_DIR / "user_features.parquet"),
    timestamp_field="event_timestamp",
)
item_source = FileSource(
    name="item_source",
    path=str(DATA_DIR / "item_features.parquet"),
    timestamp_field="event_timestamp",
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=timedelta(0),  # static profile features never expire
    schema=[
        Field(name="age", dtype=Int64),
        Field(name="gender", dtype=String),
        Field(name="occupation", dtype=Int64),
        Field(name="zip_code", dtype=String),
    ],
    source=user_source,
    online=True,
)

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="title", dtype=String),
        Field(name="year", dtype=Int64),
        Field(name="genres", dtype=Array(String)),
    ],
    source=item_source,
    online=True,
)
