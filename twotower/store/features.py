"""A run's Feast repository as stored and read: the view names, applying and materializing the
definitions, the copy each exported version serves from, and the online reader.

Serving reads the online store through Feast's own online-store connection (``OnlineReader``),
skipping the SDK's per-request registry and response assembly. The store also holds the
fingerprint of the workflow its codes come from (``recipe_run``), which the serving graph
checks at load (``check_materialized_from``). Building the repository from a run's data is the
features stage's (``twotower.stages.features``).
"""

from __future__ import annotations

import hashlib
import shutil
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from feast import Entity, FeatureStore, FeatureView
from feast.data_source import DataSource
from feast.errors import FeatureViewNotFoundException
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value

from twotower.store.manifest import ArtifactMismatch, fingerprint

USER_VIEW = "user_features"


QUERY_VIEW = "user_query_features"


ITEM_VIEW = "item_features"


RUN_VIEW = "recipe_run"


RUN_ID = 0  # the one row of RUN_VIEW


ENCODED_PREFIX = "encoded_"


LIVE_ENCODING = "live_encoding.json"  # how served versions fold live events into the rows (stages/features.py)


COLUMNS_FILE = "columns.yaml"  # each view's fields, from the data set's declared schema (features.py reads it)


# Feature rows are stamped with one fixed time so that runs are reproducible.
FEATURE_TIMESTAMP = datetime(2003, 3, 1, tzinfo=timezone.utc)


def load_definitions(repo_dir: Path, located_at: Path | None = None) -> list:
    """The Feast objects the definitions file declares (what ``feast apply`` collects).

    ``located_at``: run the file as if it were in that folder, so the source paths it
    derives from its own location name that folder.
    """
    path = (located_at or repo_dir) / "features.py"
    module = types.ModuleType("twotower_feature_definitions")
    module.__file__ = str(path)
    module.TWOTOWER_DEFINITIONS_DIR = repo_dir  # where its columns.yaml is (features.py)
    exec(compile((repo_dir / "features.py").read_text(), str(path), "exec"), module.__dict__)
    return [value for value in vars(module).values() if isinstance(value, (Entity, FeatureView, DataSource))]


def apply_and_materialize(repo_dir: Path, final_dir: Path | None = None) -> FeatureStore:
    """``feast apply`` then ``feast materialize`` (Feast shows a progress bar per view).

    A repository built in a staging folder for ``final_dir`` is applied once more as if it
    were there: Feast 0.31 keeps the sources' absolute paths in its registry, and after the
    swap they must name the final folder. Re-applying unchanged views keeps their rows.
    """
    store = FeatureStore(repo_path=str(repo_dir))
    store.apply(load_definitions(repo_dir))
    store.materialize(FEATURE_TIMESTAMP - timedelta(days=1), datetime.now(timezone.utc))
    if final_dir is not None:
        store.apply(load_definitions(repo_dir, located_at=final_dir))
    return store


def served_copy(repo_dir: Path, target: Path) -> Path:
    """A copy of the run's Feast repository at ``target`` (a new folder) for one exported model
    version to read, so that a later change of the run's features (retrain, refresh-items) reaches
    requests only with the version built on it: each request sees one model, index and feature set.

    A SQLite online store is a file and is copied with the rest. A Redis store is shared, so the
    copy gets a project of its own (Redis keys carry the project), named after the copy's sources
    (two versions with the same features share its rows), and is materialized into it.
    """
    shutil.copytree(repo_dir, target)
    settings_path = target / "feature_store.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    if settings.get("online_store", {}).get("type") == "redis":
        (target / "data" / "online_store.db").unlink(missing_ok=True)
        sources = sorted((target / "data").glob("*.parquet"))
        content = fingerprint(target / COLUMNS_FILE) + "".join(fingerprint(path) for path in sources)
        settings["project"] = f"{settings['project']}_{hashlib.sha256(content.encode()).hexdigest()[:12]}"
        settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        apply_and_materialize(target)
    return target


def online_user_features(store: FeatureStore, user_ids: list[int], columns: list[str]) -> pd.DataFrame:
    """Raw online user features through the Feast SDK, in order; unknown users have nulls."""
    response = store.get_online_features(
        features=[f"{USER_VIEW}:{name}" for name in columns],
        entity_rows=[{"user_id": int(u)} for u in user_ids],
    )
    return pd.DataFrame(response.to_dict())[["user_id", *columns]]


def _python_value(value: Value):
    kind = value.WhichOneof("val")
    if kind is None:
        return None
    field = getattr(value, kind)
    return list(field.val) if kind.endswith("_list_val") else field


class OnlineReader:
    """Reads one feature view straight from the configured online store (SQLite or Redis), only
    ``features`` of it when given (every feature otherwise).

    Redis is read through the provider's ``online_read`` (what the SDK calls underneath) with the
    feature view resolved once, so a request costs one store query. SQLite is read with one query
    of its own on Feast's connection and table: Feast's SQLite ``online_read`` reads every feature
    of the view and converts two timestamps a feature, which made a request's two reads three
    times slower (``docs/benchmarks/serving.md``). ``source`` is the repository folder, or an open store
    whose online-store connection to share.
    """

    def __init__(self, source: Path | FeatureStore, view_name: str, features: tuple[str, ...] | None = None):
        self.store = source if isinstance(source, FeatureStore) else FeatureStore(repo_path=str(source))
        self.view = self.store.get_feature_view(view_name)
        self.online_store = self.store._get_provider().online_store
        self.join_key = self.view.entity_columns[0].name
        self.features = features
        self._sqlite_query = None
        if isinstance(self.online_store, SqliteOnlineStore):
            only = f" AND feature_name IN ({','.join('?' * len(features))})" if features else ""
            self._sqlite_query = (
                f"SELECT entity_key, feature_name, value FROM {_table_id(self.store.config.project, self.view)} "
                f"WHERE entity_key IN ({{marks}}){only}"
            )

    def read(self, ids: np.ndarray) -> list[dict | None]:
        """One dict of feature values per id (None where the store has no row: SQLite returns no
        values for it, Redis an empty value for every feature)."""
        keys = [EntityKey(join_keys=[self.join_key], entity_values=[Value(int64_val=int(i))]) for i in ids]
        if self._sqlite_query is None:
            rows = [
                values
                for _, values in self.online_store.online_read(self.store.config, self.view, keys, self._requested())
            ]
        else:
            rows = self._read_sqlite(keys)
        found = []
        for values in rows:
            row = None if values is None else {name: _python_value(v) for name, v in values.items()}
            found.append(row if row and any(value is not None for value in row.values()) else None)
        return found

    def _requested(self) -> list[str] | None:
        """A new list each read: Feast's Redis ``online_read`` appends its timestamp key to it."""
        return list(self.features) if self.features else None

    def _read_sqlite(self, keys: list[EntityKey]) -> list[dict[str, Value] | None]:
        version = self.store.config.entity_key_serialization_version
        serialized = [serialize_entity_key(key, entity_key_serialization_version=version) for key in keys]
        connection = self.online_store._get_conn(self.store.config)
        by_key: dict[bytes, dict[str, Value]] = {}
        for key, name, blob in connection.execute(
            self._sqlite_query.format(marks=",".join("?" * len(serialized))), [*serialized, *(self.features or ())]
        ):
            by_key.setdefault(key, {})[name] = Value.FromString(blob)
        return [by_key.get(key) for key in serialized]


def check_materialized_from(store: FeatureStore, workflow_fingerprint: str) -> None:
    """Raise ArtifactMismatch unless the online store's rows were materialized from the workflow
    with ``workflow_fingerprint``. Reading it opens the online-store connection (SQLite: the
    file as it is now), which later reads through ``store`` keep using."""
    try:
        (row,) = OnlineReader(store, RUN_VIEW).read(np.array([RUN_ID]))
    except FeatureViewNotFoundException:
        row = None
    found = row["workflow_fingerprint"] if row else None
    if found != workflow_fingerprint:
        origin = f"workflow {found[:12]}" if found else "no recorded workflow"
        raise ArtifactMismatch(
            f"the Feast online store of {store.repo_path} holds features encoded by {origin}, but this model "
            f"was exported for workflow {workflow_fingerprint[:12]}: "
            "run `twotower export` again, it names the stages to re-run first"
        )
