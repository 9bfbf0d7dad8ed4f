"""Stage 5: deploy the Feast repository, write its sources, apply and materialize.

``feature_repo/`` in the project holds the declarative definitions; each run gets
its own copy under the output folder, with its parquet sources, registry and
online store beside it: SQLite by default, Redis with ``features.online_store``.
Serving reads the online store through ``twotower.store.features.OnlineReader``;
materialization goes through the Feast SDK unchanged.

A new copy is built in a staging folder and swapped in whole, so re-running the stage
never deletes the SQLite store under a running server: the server's open connection
keeps reading the file it opened (unlinked, still readable) until it reloads. The store
also holds the fingerprint of the workflow its codes come from (``recipe_run``), which
the serving graph checks at load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import yaml
from feast import FeatureStore

from twotower.config import PROJECT_ROOT, FeaturesConfig, RecipeConfig
from twotower.stages.data import coded_events, is_list_column, latest_history, unseen_value, users_with_history
from twotower.store.artifacts import RecipeData, known_before_test, load_recipe_data, load_split
from twotower.store.atomic import atomic_dir, atomic_file
from twotower.store.events import EventLog
from twotower.store.features import (
    COLUMNS_FILE,
    ENCODED_PREFIX,
    FEATURE_TIMESTAMP,
    ITEM_VIEW,
    LIVE_ENCODING,
    QUERY_VIEW,
    RUN_ID,
    RUN_VIEW,
    USER_VIEW,
    apply_and_materialize,
)
from twotower.store.manifest import fingerprint

if TYPE_CHECKING:
    from twotower.stages.workflow import SavedWorkflows

TEMPLATE_DIR = next(
    d for d in (PROJECT_ROOT / "feature_repo", Path(__file__).parents[1] / "feature_repo") if d.is_dir()
)  # checkout; installed


DEFINITION_FILES = ("feature_store.yaml", "features.py")


def online_store_settings(features: FeaturesConfig) -> dict | None:
    """The ``online_store`` section for ``features``; None keeps the template's SQLite file."""
    if features.online_store == "sqlite":
        return None
    if features.online_store == "redis":
        return {"type": "redis", "connection_string": features.redis_connection}
    if features.online_store == "redis_cluster":
        return {"type": "redis", "redis_type": "redis_cluster", "connection_string": features.redis_connection}
    raise ValueError(
        f"features.online_store must be 'sqlite', 'redis' or 'redis_cluster', got {features.online_store!r}"
    )


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


def _plain_lists(frame: pd.DataFrame) -> pd.DataFrame:
    """List columns as Python lists, as Feast's parquet reader wants them (not NumPy arrays)."""
    return frame.assign(**{c: frame[c].map(list) for c in frame.columns if is_list_column(frame[c])})


def feast_type(values: pd.Series) -> str:
    """The name of the ``feast.types`` type that holds ``values`` (features.py resolves it)."""
    if is_list_column(values):
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


class FeatureTables(NamedTuple):
    """What Feast serves."""

    data: RecipeData
    users: pd.DataFrame  # raw profiles, latest history, every earlier positive
    encoded_users: pd.DataFrame  # the same users encoded by the saved user workflow
    workflow_fingerprint: str  # of that workflow, stored with the rows
    live_encoding: dict  # how served versions fold live events into these rows (``live_encoding``)


def write_sources(tables: FeatureTables, repo_dir: Path) -> None:
    """Parquet sources of the feature views, and their fields in ``columns.yaml``; the user views'
    rows from ``user_view_rows``; the live encoding in ``live_encoding.json`` beside them."""
    (repo_dir / LIVE_ENCODING).write_text(json.dumps(tables.live_encoding))
    stamp = pd.Timestamp(FEATURE_TIMESTAMP)
    run = pd.DataFrame({"run_id": [RUN_ID], "workflow_fingerprint": [tables.workflow_fingerprint]})
    user_views = {view: (rows, "user_id") for view, rows in user_view_rows(tables.users, tables.encoded_users).items()}
    views = {**user_views, ITEM_VIEW: (tables.data.items, "item_id"), RUN_VIEW: (run, "run_id")}
    columns = {}
    for view, (frame, key) in views.items():
        frame = _plain_lists(frame)
        frame.assign(event_timestamp=stamp).to_parquet(repo_dir / "data" / f"{view}.parquet", index=False)
        columns[view] = {name: feast_type(frame[name]) for name in frame.columns if name != key}
    (repo_dir / COLUMNS_FILE).write_text(yaml.safe_dump(columns, sort_keys=False))


def live_encoding(
    workflows: SavedWorkflows,
    users: pd.DataFrame,
    items: pd.DataFrame,
    history_length: int,
    min_rating: float | None,
    folded_sequences: list[int],
) -> dict:
    """What a served version needs to fold a user's live events into their rows: the history code of
    each item of the vocabulary and the code of any other, the encoded row of a user the store has
    no row for (every feature in its out-of-vocabulary bucket), the history length, the least
    label that counts as a positive (None: every event does, implicit feedback), and the logged
    events its rows already hold (``folded_sequences``)."""
    from twotower.stages.workflow import category_table, encode_users

    profile = {
        column: [unseen_value(users[column])] for column in users.columns if column not in ("history", "seen_items")
    }
    outside = int(items["item_id"].max()) + 1
    if history_length > 0:
        profile["history"] = [[outside]]
    encoded = encode_users(workflows, pd.DataFrame(profile)).iloc[0]
    has_history = "history" in encoded.index
    vocabulary = category_table(workflows.user, "history")["history"] if has_history else pd.Series(dtype="int64")
    return {
        "history_length": history_length if has_history else 0,
        "min_rating": min_rating,
        "history_items": vocabulary.astype(int).tolist(),
        "history_codes": vocabulary.index.astype(int).tolist(),
        "unknown_item_code": int(encoded["history"][0]) if has_history else None,
        "folded_sequences": folded_sequences,
        "unknown_user": {
            ENCODED_PREFIX + name: ([] if name == "history" else np.asarray(value).tolist())
            for name, value in encoded.items()
        },
    }


def feature_tables(config: RecipeConfig, user_ids: np.ndarray | None = None) -> FeatureTables:
    """What Feast serves, from what is known before the test period; for ``user_ids`` only, if given."""
    from twotower.stages.workflow import encode_users, load_saved_workflows

    workflow_fingerprint = fingerprint(config.workflow_dir)
    data, split = load_recipe_data(config.data_dir), load_split(config.splits_dir)
    known = known_before_test(split)
    profiles = data.users if user_ids is None else data.users[data.users["user_id"].isin(user_ids)]
    users = users_with_history(profiles, known, config.train.history_length)
    users = users.assign(seen_items=latest_history(known, users["user_id"].to_numpy(), None).to_numpy())
    workflows = load_saved_workflows(config.workflow_dir)
    min_rating = config.data.min_rating if config.data.schema.label else None
    return FeatureTables(
        data,
        users,
        encode_users(workflows, users),
        workflow_fingerprint,
        live_encoding(
            workflows,
            data.users,
            data.items,
            config.train.history_length,
            min_rating,
            folded_sequences(EventLog(config.events_dir).read(), data, known),
        ),
    )


def users_with_events_not_held(config: RecipeConfig, data: RecipeData) -> np.ndarray:
    """Users with logged events the run's Feast rows do not hold yet (whatever their time: an event
    from before ``retrain --since`` changes the user's row as much as a new positive)."""
    encoding = config.feature_repo_dir / LIVE_ENCODING
    held = json.loads(encoding.read_text())["folded_sequences"] if encoding.exists() else []
    events = coded_events(EventLog(config.events_dir).read(), data.users, data.items)
    return events.loc[~events["sequence"].isin(held), "user_id"].dropna().unique().astype("int64")


def folded_sequences(log: pd.DataFrame, data: RecipeData, known: pd.DataFrame) -> list[int]:
    """The logged events the Feast rows hold: those the data stage took in as interactions that are
    known before the test period (positives in the training or validation split)."""
    events = coded_events(log, data.users, data.items).dropna(subset=["user_id"]).astype({"user_id": "int64"})
    held = events.merge(known[["user_id", "item_id", "timestamp"]], on=["user_id", "item_id", "timestamp"])
    return sorted(held["sequence"].astype(int).tolist())


def build_feature_store(tables: FeatureTables, repo_dir: Path, features: FeaturesConfig | None = None) -> FeatureStore:
    """Deploy, write the sources, apply and materialize in a staging folder, then swap it in at
    ``repo_dir``. With SQLite the old store file stays readable to connections already open on it.
    With Redis the online store is shared, not swapped: materializing overwrites its rows in place,
    so a server running on the previous run's model reads the new rows; its load-time check only
    catches that when it restarts."""
    with atomic_dir(repo_dir) as staging:
        deploy_repo(staging, features)
        write_sources(tables, staging)
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
    other rows stay; servers read the new rows from the next exported version (``served_copy``),
    which skips the logged events these rows now hold (``live_encoding``) when it folds live events."""
    tables = feature_tables(config, user_ids)
    for view, rows in user_view_rows(tables.users, tables.encoded_users).items():
        add_rows(config.feature_repo_dir, view, rows)
    with atomic_file(config.feature_repo_dir / LIVE_ENCODING) as staging:
        staging.write_text(json.dumps(tables.live_encoding))
