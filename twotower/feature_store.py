"""Stage 5: deploy the Feast repository, write its sources, apply and materialize.

``feature_repo/`` in the project holds the declarative definitions; each run gets
its own copy under the output folder, with its parquet sources, registry and
online store beside it: SQLite by default, Redis with ``features.online_store``.
Serving reads the online store through Feast's own online-store interface
(``OnlineReader``), skipping the SDK's per-request registry and response
assembly; materialization goes through the SDK unchanged.

A new copy is built in a staging folder and swapped in whole, so re-running the stage
never deletes the SQLite store under a running server: the server's open connection
keeps reading the file it opened (unlinked, still readable) until it reloads. The store
also holds the fingerprint of the workflow its codes come from (``recipe_run``), which
the serving graph checks at load.
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
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value

from typing import NamedTuple

from twotower.config import PROJECT_ROOT, FeaturesConfig, RecipeConfig
from twotower.data import EXTERNAL_ID, RecipeData
from twotower.manifest import ArtifactMismatch, atomic_dir, atomic_file, fingerprint

TEMPLATE_DIR = next(d for d in (PROJECT_ROOT / "feature_repo", Path(__file__).with_name("feature_repo")) if d.is_dir())  # checkout; installed
USER_VIEW = "user_features"
QUERY_VIEW = "user_query_features"
ITEM_VIEW = "item_features"
RUN_VIEW = "recipe_run"
RUN_ID = 0  # the one row of RUN_VIEW
ENCODED_PREFIX = "encoded_"
DEFINITION_FILES = ("feature_store.yaml", "features.py")
COLUMNS_FILE = "columns.yaml"  # each view's fields, from the data set's declared schema (features.py reads it)
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
    """Copy the definitions into ``repo_dir`` (a new, empty folder), online store as configured."""
    online_store = online_store_settings(features or FeaturesConfig())
    (repo_dir / "data").mkdir(parents=True, exist_ok=True)
    for name in DEFINITION_FILES:
        shutil.copy2(TEMPLATE_DIR / name, repo_dir / name)
    if online_store is not None:
        settings_path = repo_dir / "feature_store.yaml"
        settings = yaml.safe_load(settings_path.read_text())
        settings["online_store"] = online_store
        settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return repo_dir


def _is_list_column(values: pd.Series) -> bool:
    present = values.dropna()
    return bool(len(present)) and isinstance(present.iloc[0], (list, np.ndarray))


def _plain_lists(frame: pd.DataFrame) -> pd.DataFrame:
    """List columns as Python lists, as Feast's parquet reader wants them (not NumPy arrays)."""
    return frame.assign(**{c: frame[c].map(list) for c in frame.columns if _is_list_column(frame[c])})


def feast_type(values: pd.Series) -> str:
    """The name of the ``feast.types`` type that holds ``values`` (features.py resolves it)."""
    if _is_list_column(values):
        inner = pd.Series([x for row in values.dropna().head(1000) for x in row])
        return f"Array({feast_type(inner) if len(inner) else 'Int64'})"
    if pd.api.types.is_bool_dtype(values):
        return "Bool"
    if pd.api.types.is_integer_dtype(values):
        return "Int64"
    if pd.api.types.is_float_dtype(values):
        return "Float32"
    return "String"


def user_view_rows(users: pd.DataFrame, encoded_users: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of the two user views, keyed by ``user_id``, as Feast takes them.

    ``users``: raw profile with ``history`` and ``seen_items`` lists; ``encoded_users``: the user
    workflow's output for the same rows.
    """
    empty_lists = pd.Series([[]] * len(users), index=users.index)
    raw = users.assign(history=users.get("history", empty_lists))
    encoded = pd.DataFrame({f"{ENCODED_PREFIX}{c}": encoded_users[c].to_numpy() for c in encoded_users.columns})
    if f"{ENCODED_PREFIX}history" not in encoded:
        encoded[f"{ENCODED_PREFIX}history"] = empty_lists.to_numpy()
    encoded.insert(0, "user_id", users["user_id"].to_numpy())
    return {USER_VIEW: raw, QUERY_VIEW: encoded}


def write_sources(data: RecipeData, users: pd.DataFrame, encoded_users: pd.DataFrame, workflow_fingerprint: str, repo_dir: Path) -> None:
    """Parquet sources of the feature views, and their fields in ``columns.yaml``; the user views'
    rows from ``user_view_rows``, ``workflow_fingerprint``: the user workflow's."""
    stamp = pd.Timestamp(FEATURE_TIMESTAMP)
    run = pd.DataFrame({"run_id": [RUN_ID], "workflow_fingerprint": [workflow_fingerprint]})
    user_views = {view: (rows, "user_id") for view, rows in user_view_rows(users, encoded_users).items()}
    views = {**user_views, ITEM_VIEW: (data.items, "item_id"), RUN_VIEW: (run, "run_id")}
    columns = {}
    for view, (frame, key) in views.items():
        frame = _plain_lists(frame)
        frame.assign(event_timestamp=stamp).to_parquet(repo_dir / "data" / f"{view}.parquet", index=False)
        columns[view] = {name: feast_type(frame[name]) for name in frame.columns if name != key}
    (repo_dir / COLUMNS_FILE).write_text(yaml.safe_dump(columns, sort_keys=False))


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


class FeatureTables(NamedTuple):
    """What Feast serves (in ``build_feature_store``'s argument order)."""

    data: RecipeData
    users: pd.DataFrame  # raw profiles, latest history, every earlier positive
    encoded_users: pd.DataFrame  # the same users encoded by the saved user workflow
    workflow_fingerprint: str  # of that workflow, stored with the rows


def feature_tables(config: RecipeConfig, user_ids: np.ndarray | None = None) -> FeatureTables:
    """What Feast serves, from what is known before the test period; for ``user_ids`` only, if given."""
    from twotower.data import known_before_test, latest_history, load_recipe_data, load_split, users_with_history
    from twotower.manifest import fingerprint
    from twotower.workflow import encode_users, load_saved_workflows

    workflow_fingerprint = fingerprint(config.workflow_dir)
    data, split = load_recipe_data(config.data_dir), load_split(config.splits_dir)
    known = known_before_test(split)
    profiles = data.users if user_ids is None else data.users[data.users["user_id"].isin(user_ids)]
    users = users_with_history(profiles, known, config.train.history_length)
    users = users.assign(seen_items=latest_history(known, users["user_id"].to_numpy(), None).to_numpy())
    return FeatureTables(data, users, encode_users(load_saved_workflows(config.workflow_dir), users), workflow_fingerprint)


def build_feature_store(
    data: RecipeData,
    users: pd.DataFrame,
    encoded_users: pd.DataFrame,
    workflow_fingerprint: str,
    repo_dir: Path,
    features: FeaturesConfig | None = None,
) -> FeatureStore:
    """Deploy, write the sources, apply and materialize in a staging folder, then swap it in at
    ``repo_dir``. With SQLite the old store file stays readable to connections already open on it.
    With Redis the online store is shared, not swapped: materializing overwrites its rows in place,
    so a server running on the previous run's model reads the new rows; its load-time check only
    catches that when it restarts."""
    with atomic_dir(repo_dir) as staging:
        deploy_repo(staging, features)
        write_sources(data, users, encoded_users, workflow_fingerprint, staging)
        apply_and_materialize(staging, final_dir=repo_dir)
    return FeatureStore(repo_path=str(repo_dir))


def add_rows(repo_dir: Path, view_name: str, rows: pd.DataFrame) -> None:
    """Add ``rows`` (the view's join key and features; other columns are ignored) to a feature view
    of the deployed repository: to its offline source, replacing earlier rows with the same keys,
    and to its online store, which the next exported version copies (``served_copy``). The offline source keeps what a
    later ``materialize`` would write equal to what is served. Rows get the recipe's fixed stamp."""
    store = FeatureStore(repo_path=str(repo_dir))
    view = store.get_feature_view(view_name)
    key = view.entity_columns[0].name
    stamp = view.batch_source.timestamp_field
    new = _plain_lists(rows[[key, *(f.name for f in view.features)]]).assign(**{stamp: pd.Timestamp(FEATURE_TIMESTAMP)})
    # The registry holds the source's absolute path from when the repository was applied; in a
    # copied or moved run that names the original's file, so take the file in this repository.
    source = Path(repo_dir) / "data" / Path(view.batch_source.path).name
    kept = pd.read_parquet(source)
    with atomic_file(source) as staging:
        pd.concat([kept[~kept[key].isin(new[key])], new], ignore_index=True).to_parquet(staging, index=False)
    store.write_to_online_store(view_name, new)


def update_users(config: RecipeConfig, user_ids: np.ndarray) -> None:
    """Rewrite the rows of ``user_ids`` in both user views of the run's Feast repository (offline
    source and online store) from the run's data and saved workflow, as a full build would write
    them: users new to the store get rows, the others their current history and seen items. The
    other rows stay; servers read the new rows from the next exported version (``served_copy``)."""
    tables = feature_tables(config, user_ids)
    for view, rows in user_view_rows(tables.users, tables.encoded_users).items():
        add_rows(config.feature_repo_dir, view, rows)


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
    """Reads one feature view straight from the configured online store (SQLite or Redis).

    Uses the provider's ``online_read`` (what the SDK calls underneath) with the
    feature view resolved once, so a request costs one store query. ``source`` is the
    repository folder, or an open store whose online-store connection to share.
    """

    def __init__(self, source: Path | FeatureStore, view_name: str):
        self.store = source if isinstance(source, FeatureStore) else FeatureStore(repo_path=str(source))
        self.view = self.store.get_feature_view(view_name)
        self.online_store = self.store._get_provider().online_store
        self.join_key = self.view.entity_columns[0].name

    def read(self, ids: np.ndarray) -> list[dict | None]:
        """One dict of feature values per id (None where the store has no row)."""
        keys = [EntityKey(join_keys=[self.join_key], entity_values=[Value(int64_val=int(i))]) for i in ids]
        rows = self.online_store.online_read(self.store.config, self.view, keys)
        return [None if values is None else {name: _python_value(v) for name, v in values.items()} for _, values in rows]


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
            f"was exported for workflow {workflow_fingerprint[:12]}: run `twotower export` again, it names the stages to re-run first"
        )
