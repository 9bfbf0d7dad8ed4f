"""twotower retrain on a small run known up to a cutoff, then retrained on everything: the warm
start starts from the last weights, the new interactions reach the served Feast rows, the
vocabulary policy decides whether the workflow changes, and the export accepts the result."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import numpy as np
import pytest
import yaml
from conftest import SMALL_RUN, small_config
from rollout import check_answers, check_events_kept, roll_out_under_load, served_rows

from twotower import pipeline
from twotower.config import ConfigError, RecipeConfig, load_config, parse_time, prerank_config, set_value
from twotower.lifecycle.retrain import RetrainRefused, retrain
from twotower.serving.export import load_exported_ensemble, model_versions, recommend_in_process
from twotower.stages.data import load_dataset, make_synthetic
from twotower.store.artifacts import EXTERNAL_ID, known_before_test, load_item_vectors, load_recipe_data, load_split
from twotower.store.events import EventBatch, EventLog, open_live_store, record_events
from twotower.store.features import LIVE_ENCODING, USER_VIEW, OnlineReader
from twotower.store.manifest import (
    EXPORT_RECORD,
    REFRESH,
    check_export,
    check_prerank,
    fingerprint,
    fingerprints,
    read_manifest,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CUTOFF = 950_000_000  # the synthetic interactions are spread over 9e8..1e9 s
LATE = 5  # users whose every interaction is moved past the cutoff: new at the retrain
KNOWN_RUN = ("train.epochs=2",)


def _first_interactions(config: RecipeConfig):
    """Each user's first interaction time in the data set the configuration reads."""
    return load_dataset(config.data, config.seed).interactions.groupby("user_id")["timestamp"].min()


def _user_vocabulary(config: RecipeConfig):
    from twotower.stages.workflow import category_table, load_saved_workflows

    return category_table(load_saved_workflows(config.workflow_dir).user, "user_id")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[str, ...]:
    """The synthetic data set as files (data.dataset=files), its last ``LATE`` users arriving after ``CUTOFF``."""
    data = make_synthetic(300, 120, 30, seed=42)
    interactions = data.interactions.copy()
    late = interactions["user_id"].isin(data.users["user_id"].tail(LATE))
    interactions.loc[late, "timestamp"] += CUTOFF - 900_000_000
    folder = tmp_path_factory.mktemp("files")
    tables = {
        "interactions": interactions,
        "users": data.users.drop(columns=EXTERNAL_ID),
        "items": data.items.drop(columns=EXTERNAL_ID),
    }
    for name, table in tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)
    return ("data.dataset=files", *(f"data.files.{name}={folder / name}.parquet" for name in tables))


@pytest.fixture(scope="module")
def cutoff() -> int:
    return CUTOFF


@pytest.fixture(scope="module")
def known_run(tmp_path_factory, data_files, cutoff) -> RecipeConfig:
    """Every stage up to the export on the interactions before ``cutoff``."""
    config = small_config(tmp_path_factory.mktemp("known"), *data_files, *KNOWN_RUN, f"data.until={cutoff}")
    pipeline.run_all(config)
    return config


def _copy(run: RecipeConfig, root, *settings: str) -> RecipeConfig:
    """A copy of ``run`` (outputs and model repository) knowing everything (data.until ""), with ``settings``."""
    config = copy.deepcopy(run)
    config.output_dir, config.export_dir, config.data.until = root / "artifacts", root / "triton_models", ""
    for setting in settings:
        key, _, value = setting.partition("=")
        set_value(config, key, yaml.safe_load(value))
    shutil.copytree(run.output_dir, config.output_dir)
    shutil.copytree(run.export_dir, config.export_dir)
    return config


EVENT_USER = 10**6  # a user only the event log knows
OUTSIDE_ITEM = 10**6  # an item outside the data set


def _log_events(config: RecipeConfig) -> EventBatch:
    """Events logged while the known run was served: a returning user watching two items (one
    early enough to land in the training split, one late, in the test split) and an item outside
    the data set; a new user's eight events spread over the period."""
    split = load_split(config.splits_dir)
    user = int(split.train["user_id"].iloc[0])
    seen = set(known_before_test(split).query("user_id == @user")["item_id"])
    unseen = [int(item) for item in load_item_vectors(config.item_vectors_path)[0] if item not in seen]
    users = [user, user, user, *[EVENT_USER] * 8]
    items = [unseen[0], unseen[1], OUTSIDE_ITEM, *unseen[2:10]]
    times = [910_000_000, 999_999_000, 999_999_500, *range(955_000_000, 995_000_000, 5_000_000)]
    batch = EventBatch([str(u) for u in users], [str(i) for i in items], times, [5.0] * len(users))
    record_events(config.events_dir, batch, open_live_store(config.events_dir))
    return batch


@pytest.fixture(scope="module")
def retrained(known_run, cutoff, tmp_path_factory) -> RecipeConfig:
    """``known_run`` retrained on everything, with events logged while it was served."""
    config = _copy(known_run, tmp_path_factory.mktemp("retrained"), "train.retrain_epochs=1")
    _log_events(config)
    report = retrain(config, cutoff)
    assert report.policy == "oov" and report.new_users == LATE + 1 and report.version == 2
    return config


def test_times_are_integer_seconds_or_iso_dates():
    assert parse_time(978307200, "t") == parse_time("978307200", "t") == parse_time("2001-01-01", "t") == 978307200
    assert parse_time("2001-01-01T01:00:00+01:00", "t") == 978307200
    assert load_config(overrides=["data.until=2001-01-01"]).data.until == "2001-01-01"  # YAML reads it as a date
    with pytest.raises(ConfigError, match="--since"):
        parse_time("last tuesday", "--since")


def test_the_known_run_holds_only_what_came_before_the_cutoff(known_run, cutoff):
    users = set(load_recipe_data(known_run.data_dir).users["user_id"])
    first = _first_interactions(known_run)
    assert users == set(first.index[first < cutoff]) and len(first) - len(users) == 5
    assert load_recipe_data(known_run.data_dir).interactions["timestamp"].max() < cutoff


def test_a_warm_start_of_no_epochs_keeps_the_last_vectors_and_one_epoch_moves_them(
    known_run, cutoff, retrained, tmp_path
):
    _, last = load_item_vectors(known_run.item_vectors_path)
    run = _copy(known_run, tmp_path, "train.retrain_epochs=0")
    retrain(run, cutoff)
    ids, unchanged = load_item_vectors(run.item_vectors_path)
    np.testing.assert_allclose(unchanged, last, atol=1e-6)  # a fresh initialisation would not be the last model
    _, moved = load_item_vectors(retrained.item_vectors_path)
    assert np.abs(moved - last).max() > 1e-3
    assert len(ids) == len(last)  # oov: the catalogue is the vocabulary the workflow was fitted on
    started_from = read_manifest(retrained)["train"]["details"]["warm_start"]
    assert started_from["model_weights"] == fingerprint(known_run.model_weights_path)
    assert started_from["since"] == cutoff and started_from["new_positives"] > 0


def test_a_whole_sequence_warm_start_trains_on_the_new_and_replayed_positives_only(retrained, cutoff):
    from twotower.lifecycle.retrain import new_training_rows
    from twotower.stages.data import latest_history
    from twotower.stages.train import load_training_inputs

    inputs = load_training_inputs(retrained)
    assert inputs.sequence_users is not None  # the default model trains over whole sequences
    times = latest_history(inputs.split.train, inputs.sequence_users.index.to_numpy(), None, column="timestamp")
    narrowed, new, replayed = new_training_rows(inputs, cutoff, 0.0, retrained.seed)
    assert narrowed.sequence_targets.tolist() == times.map(lambda ts: [t >= cutoff for t in ts]).tolist()
    assert new > 0 and replayed == 0
    narrowed, new, replayed = new_training_rows(inputs, cutoff, 0.5, retrained.seed)
    flags = narrowed.sequence_targets.explode().dropna().astype(bool)
    assert replayed > 0 and flags.sum() == new + replayed == narrowed.train_dataset.num_rows


def test_new_interactions_reach_the_served_rows_and_new_users_get_rows(known_run, retrained, cutoff):
    split = load_split(retrained.splits_dir)
    known = known_before_test(split)
    returning = known[
        (known["timestamp"] >= cutoff) & known["user_id"].isin(load_split(known_run.splits_dir).train["user_id"])
    ]
    changed = int(returning["user_id"].iloc[0])
    first = _first_interactions(retrained)
    new = int(first.index[first >= cutoff][0])

    before = OnlineReader(known_run.feature_repo_dir, USER_VIEW).read(np.array([changed, new]))
    after = OnlineReader(retrained.feature_repo_dir, USER_VIEW).read(np.array([changed, new]))
    assert before[1] is None and after[1] is not None
    for row, user in zip(after, (changed, new)):
        assert sorted(row["seen_items"]) == sorted(known.loc[known["user_id"] == user, "item_id"])
    assert set(before[0]["seen_items"]) < set(after[0]["seen_items"])
    assert (
        after[0]["history"][-1]
        == known[known["user_id"] == changed].sort_values(["timestamp", "item_id"])["item_id"].iloc[-1]
    )

    old = recommend_in_process(load_exported_ensemble(known_run.export_dir), np.array([new]))
    served = recommend_in_process(load_exported_ensemble(retrained.export_dir), np.array([new]))
    assert old["is_fallback"].tolist() == [True] and served["is_fallback"].tolist() == [False]


def test_logged_events_become_interactions_and_count_once_in_the_served_rows(retrained):
    """The data stage took the log in (the outside item left out, the new user given a row); the
    retrained version's Feast rows hold the events known before the test period and skip exactly
    those when it folds the live store, so every event item is seen once."""
    log = EventLog(retrained.events_dir).read()
    data = load_recipe_data(retrained.data_dir)
    logged = log[log["item_id"] != str(OUTSIDE_ITEM)].astype({"user_id": int, "item_id": int})
    triples = ["user_id", "item_id", "timestamp"]
    assert len(logged.merge(data.interactions, on=triples)) == len(logged) == 10
    assert not (data.interactions["item_id"] == OUTSIDE_ITEM).any()
    assert data.users.loc[data.users["user_id"] == EVENT_USER, EXTERNAL_ID].tolist() == [EVENT_USER]

    known = known_before_test(load_split(retrained.splits_dir))
    held = logged.merge(known, on=triples)["sequence"].tolist()
    folded = json.loads((retrained.feature_repo_dir / LIVE_ENCODING).read_text())["folded_sequences"]
    assert folded == sorted(held) and 0 < len(folded) < len(logged)  # both kinds are here

    users = [int(logged["user_id"].iloc[0]), EVENT_USER]
    for user, seen in zip(users, served_rows(retrained.export_dir, users)["seen_items"]):
        items = logged.loc[logged["user_id"] == user, "item_id"]
        assert all(seen.count(item) == 1 for item in items), (user, seen)
    answer = recommend_in_process(load_exported_ensemble(retrained.export_dir), np.array(users))
    assert not answer["is_fallback"].any()
    assert not set(answer["item_ids"].ravel().tolist()) & set(logged["item_id"])


def test_the_export_accepts_the_retrained_run_and_packaged_it_as_the_next_version(retrained):
    packaged = check_export(retrained)  # raises ArtifactMismatch if a stage disagrees with another
    model_dir = retrained.export_dir / retrained.serve.model_name
    assert model_versions(model_dir) == [1, 2]
    assert json.loads((model_dir / EXPORT_RECORD).read_text()) == packaged
    assert packaged["item_vectors"] == fingerprint(retrained.item_vectors_path)


def test_oov_keeps_the_workflow_and_refit_fits_it_again_from_scratch(known_run, retrained, cutoff, tmp_path, capsys):
    known = read_manifest(known_run)["workflow"]
    kept = read_manifest(retrained)["workflow"]
    assert kept["produced"]["workflow"] == known["produced"]["workflow"] == fingerprint(retrained.workflow_dir)
    assert (
        kept["details"]["vocabulary"].startswith("kept")
        and kept["produced"]["train_encoded"] != known["produced"]["train_encoded"]
    )

    run = _copy(known_run, tmp_path, "train.new_ids=refit")
    capsys.readouterr()
    report = retrain(run, cutoff)
    assert "full retrain from scratch" in capsys.readouterr().out
    refitted = read_manifest(run)
    assert refitted["workflow"]["produced"]["workflow"] != known["produced"]["workflow"]
    assert "warm_start" not in refitted["train"].get("details", {})
    assert len(_user_vocabulary(run)) == len(_user_vocabulary(known_run)) + 5  # the new users have ids of their own now
    assert report.version == 2 and check_export(run)


def test_a_window_that_leaves_a_gap_or_has_nothing_new_is_refused_before_anything_changes(known_run, cutoff, tmp_path):
    run = _copy(known_run, tmp_path)
    manifest = run.manifest_path.read_text()
    with pytest.raises(RetrainRefused, match="after the run's data cutoff"):
        retrain(run, cutoff + 1)
    run.data.until = cutoff
    with pytest.raises(RetrainRefused, match="not before data.until"):
        retrain(run, cutoff)
    run.model_weights_path.unlink()
    run.data.until = ""
    with pytest.raises(RetrainRefused, match="no saved model weights"):
        retrain(run, cutoff)
    assert run.manifest_path.read_text() == manifest


def test_a_retrain_rolls_out_under_load_without_a_failed_or_mixed_answer(known_run, cutoff, data_files, tmp_path):
    """Through `twotower retrain` against a real server: every answer is wholly the last version's
    or the retrained one's, model, index and Feast rows together. The batch holds a new user (the
    fallback before, the retrained model's answer after) and returning users whose history grew
    (the old model on their new rows would answer neither)."""
    run = _copy(known_run, tmp_path / "served")
    first = _first_interactions(run)
    split = load_split(run.splits_dir)
    known_then = known_before_test(load_split(known_run.splits_dir))["user_id"]
    known_now = known_before_test(split)
    returning = known_now.loc[
        (known_now["timestamp"] >= cutoff) & known_now["user_id"].isin(known_then), "user_id"
    ].unique()
    batch = np.concatenate(
        [first.index[first >= cutoff][:1], returning[:5], split.test["user_id"].drop_duplicates()[:2]]
    ).astype(np.int64)
    old = recommend_in_process(load_exported_ensemble(run.export_dir), batch)

    settings = [
        *SMALL_RUN,
        *data_files,
        *KNOWN_RUN,
        "train.retrain_epochs=1",
        f"output_dir={run.output_dir}",
        f"export_dir={run.export_dir}",
    ]
    command = [
        sys.executable,
        "-m",
        "twotower",
        "retrain",
        "--since",
        str(cutoff),
        *(a for s in settings for a in ("--set", s)),
    ]
    catalogue = load_item_vectors(run.item_vectors_path)[0][:30]
    rollout = roll_out_under_load(run.export_dir, tmp_path / "triton", batch, command, 540, 10**9, catalogue)
    assert f"[retrain] {rollout.server_url} serves version 2" in rollout.command.stdout, rollout.command.stdout[-3000:]

    new = recommend_in_process(load_exported_ensemble(run.export_dir), batch)
    assert old["is_fallback"][0] and not new["is_fallback"][0]
    assert (old["item_ids"] != new["item_ids"]).any(axis=1).sum() >= 3, "the retrain must change the answers"
    print(check_answers(rollout, old["item_ids"], new["item_ids"], version=2))
    print(check_events_kept(rollout, run))


def test_items_added_by_refresh_items_stay_served_through_a_retrain_embedded_by_the_new_tower(
    known_run, cutoff, tmp_path
):
    from twotower.lifecycle.refresh import embed_items, refresh_items

    run = _copy(known_run, tmp_path)
    new_ids = np.arange(10_001, 10_004)
    items = load_recipe_data(known_run.data_dir).items.head(3).assign(item_id=new_ids)
    items.to_parquet(tmp_path / "new.parquet", index=False)
    refresh_items(run, tmp_path / "new.parquet")
    _, refreshed_vectors = load_item_vectors(run.item_vectors_path)

    run.train.retrain_epochs = 1
    retrain(run, cutoff)
    ids, vectors = load_item_vectors(run.item_vectors_path)
    assert np.isin(new_ids, ids).all() and len(ids) == len(refreshed_vectors)
    carried = vectors[[np.flatnonzero(ids == i)[0] for i in new_ids]]
    np.testing.assert_allclose(carried, embed_items(items, run), rtol=1e-5, atol=1e-6)  # the retrained tower's vectors
    assert np.abs(carried - refreshed_vectors[-3:]).max() > 1e-4  # not the last tower's
    assert read_manifest(run)[REFRESH]["added"][-1]["item_ids"] == new_ids.tolist()
    check_export(run)


def test_a_cascade_retrains_its_pre_ranker_and_refuses_what_it_cannot_follow(known_run, cutoff, tmp_path):
    """A run served with a pre-ranking stage: refresh-items and a pre-ranker trained elsewhere are
    refused before anything changes; retrain trains the run's pre-ranker again on the new split,
    which the export (refusing a pre-ranker of another split) then packages."""
    from twotower.lifecycle.refresh import RefreshRefused, refresh_items

    run = _copy(known_run, tmp_path, "train.retrain_epochs=1")
    pipeline.run_prerank(run)
    set_value(run, "serve.prerank_candidates", 20)
    pipeline.run_export(run)
    ranker = prerank_config(run)
    first_split = read_manifest(ranker)["train"]["consumed"]["splits"]
    manifest, ranker_manifest = run.manifest_path.read_text(), ranker.manifest_path.read_text()

    items = load_recipe_data(run.data_dir).items.head(2).assign(item_id=[10_001, 10_002])
    items.to_parquet(tmp_path / "new.parquet", index=False)
    with pytest.raises(RefreshRefused, match="serve.prerank_candidates=20"):
        refresh_items(run, tmp_path / "new.parquet")
    elsewhere = copy.deepcopy(run)
    elsewhere.serve.prerank_run = ranker.output_dir
    with pytest.raises(RetrainRefused, match="serve.prerank_run"):
        retrain(elsewhere, cutoff)
    assert (run.manifest_path.read_text(), ranker.manifest_path.read_text()) == (manifest, ranker_manifest)

    report = retrain(run, cutoff)
    assert report.version == 2
    assert read_manifest(ranker)["train"]["consumed"]["splits"] == fingerprint(run.splits_dir) != first_split
    packaged = json.loads((run.export_dir / run.serve.model_name / EXPORT_RECORD).read_text())
    assert {key: packaged[f"prerank_{key}"] for key in ("query_tower", "item_vectors")} == fingerprints(
        ranker, ("query_tower", "item_vectors")
    )
    assert check_prerank(run)  # the retrained cascade is what the export accepts
