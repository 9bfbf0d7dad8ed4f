"""refresh-items: new items reach a running Triton server as a new model version, with no failed
request and no answer from a mix of versions; bad inputs are refused and change nothing; the
manifest keeps the export's checks meaningful across refreshes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_RUN, small_config
from rollout import check_answers, check_events_kept, roll_out_under_load

from twotower import pipeline
from twotower.cli import main as twotower_main
from twotower.config import FeaturesConfig, RecipeConfig
from twotower.lifecycle.refresh import refresh_items
from twotower.serving.export import load_exported_ensemble, model_versions, recommend_in_process
from twotower.serving.triton import recipe_servers
from twotower.store.artifacts import load_item_vectors, load_recipe_data, load_split
from twotower.store.manifest import REFRESH, ArtifactMismatch, artifact_paths, fingerprint, read_manifest

pytestmark = pytest.mark.integration

NEW_IDS_FROM = 10_001
EVENT_USER = 10**9  # unknown to the run: its events change no other user's answer


def _copy_run(exported: RecipeConfig, root: Path) -> RecipeConfig:
    """A copy of the session's small run (outputs and model repository), free to mutate."""
    config = small_config(root)
    shutil.copytree(exported.output_dir, config.output_dir)
    shutil.copytree(exported.export_dir, config.export_dir)
    return config


@pytest.fixture
def run(exported, tmp_path) -> RecipeConfig:
    return _copy_run(exported, tmp_path)


def _new_items(config: RecipeConfig, count: int, path: Path) -> Path:
    """``count`` items with the features of catalogue items and new ids, written as parquet: their
    vectors land among the catalogue's, close to the queries of the users who liked the originals."""
    items = load_recipe_data(config.data_dir).items.head(count)
    items.assign(item_id=np.arange(NEW_IDS_FROM, NEW_IDS_FROM + count), title="new " + items["title"]).to_parquet(
        path, index=False
    )
    return path


def _refresh_command(config: RecipeConfig, items: Path, *settings: str) -> list[str]:
    overrides = [*SMALL_RUN, f"output_dir={config.output_dir}", f"export_dir={config.export_dir}", *settings]
    return [
        sys.executable,
        "-m",
        "twotower",
        "refresh-items",
        "--items",
        str(items),
        *(a for o in overrides for a in ("--set", o)),
    ]


def _unchanged_parts(config: RecipeConfig) -> dict[str, str]:
    """Fingerprints of everything a refresh may change: the export, the refreshed artifacts, the manifest."""
    paths = {"export": config.export_dir, "manifest": config.manifest_path, **artifact_paths(config)}
    return {name: fingerprint(path) for name, path in paths.items()}


# ---------------------------------------------------------------------------------- the rollout
def _on_redis(config: RecipeConfig, port: int) -> list[str]:
    """Move ``config``'s Feast rows and live events to the redis-server on ``port`` (features and
    export run again); the settings that say so on the command line."""
    settings = ["features.online_store=redis", f"features.redis_connection=127.0.0.1:{port}"]
    config.features = FeaturesConfig(online_store="redis", redis_connection=f"127.0.0.1:{port}")
    pipeline.run_features(config)
    pipeline.run_export(config)
    return settings


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_refresh_items_rolls_out_a_new_version_under_load_without_a_failed_or_mixed_answer(
    exported, tmp_path, request, store
):
    """On SQLite and on Redis (Feast rows and live events): no failed or mixed answer, and the
    events sent during the rollout are all kept and shape the new version's answer."""
    run = _copy_run(exported, tmp_path / "served")
    settings = _on_redis(run, request.getfixturevalue("redis_port")) if store == "redis" else []
    items = _new_items(run, 12, tmp_path / "new.parquet")
    users = load_split(run.splits_dir).test["user_id"].drop_duplicates().to_numpy()

    # Both versions' answers, computed in process beforehand: the old from the export as it is, the
    # new from the same refresh applied to a twin of the run that no server serves.
    old = recommend_in_process(load_exported_ensemble(run.export_dir), users)["item_ids"]
    twin = _copy_run(exported, tmp_path / "twin")
    assert refresh_items(twin, items).servers == []
    new = recommend_in_process(load_exported_ensemble(twin.export_dir), users)["item_ids"]
    changed = (old != new).any(axis=1)
    new_ids = np.arange(NEW_IDS_FROM, NEW_IDS_FROM + 12)
    assert changed.any() and np.isin(new[changed], new_ids).any(axis=1).all(), (
        "the refresh must change some answers by new items"
    )
    # one request for users whose answers change and users whose do not
    rows = np.concatenate([np.flatnonzero(changed)[:6], np.flatnonzero(~changed)[:2]])
    batch, old_answer, new_answer = users[rows], old[rows], new[rows]

    assert recipe_servers(twin.export_dir) == []
    catalogue = load_item_vectors(run.item_vectors_path)[0][:30]
    rollout = roll_out_under_load(
        run.export_dir, tmp_path / "triton", batch, _refresh_command(run, items, *settings), 240, EVENT_USER, catalogue
    )
    assert f"[refresh] {rollout.server_url} serves version 2" in rollout.command.stdout, rollout.command.stdout[-3000:]
    print(check_answers(rollout, old_answer, new_answer, version=2))
    print(check_events_kept(rollout, run))

    # a new item is served because of its vector: its score is the query . the refreshed item vector
    from twotower.stages.evaluate import saved_query_vectors

    row = int(np.flatnonzero(np.isin(new_answer, new_ids).any(axis=1))[0])
    served = recommend_in_process(load_exported_ensemble(run.export_dir), batch[row : row + 1])
    item_ids, vectors = load_item_vectors(run.item_vectors_path)
    query = saved_query_vectors(run, batch[row : row + 1])[0]
    for item, score in zip(served["item_ids"][0], served["scores"][0]):
        np.testing.assert_allclose(score, vectors[np.flatnonzero(item_ids == item)[0]] @ query, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- refusals
def _bad_files(config: RecipeConfig, folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input, as a file, with the text its refusal must contain."""
    items = (
        load_recipe_data(config.data_dir)
        .items.head(3)
        .assign(item_id=[NEW_IDS_FROM, NEW_IDS_FROM + 1, NEW_IDS_FROM + 2])
    )
    cases = {
        "empty": (items.head(0), "has no rows"),
        "missing-column": (items.drop(columns=["genres"]), "lacks the column(s) genres of the run's item table"),
        "repeated-id": (
            items.assign(item_id=[NEW_IDS_FROM, NEW_IDS_FROM, NEW_IDS_FROM + 2]),
            f"item ids appear more than once: {NEW_IDS_FROM}",
        ),
        "negative-id": (
            items.assign(item_id=[-1, NEW_IDS_FROM + 1, NEW_IDS_FROM + 2]),
            "item ids must not be negative (the index reserves -1): -1",
        ),
        "bad-value": (items.assign(year=["1990", "soon", "1991"]), "column 'year' must be numeric"),
        "known-id": (
            items.assign(item_id=[NEW_IDS_FROM, 1, 2]),
            "2 of the item ids are already in the catalogue: 1, 2",
        ),
    }
    files = {}
    for name, (frame, message) in cases.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        files[name] = (folder / f"{name}.parquet", message)
    (folder / "not-parquet.parquet").write_text("item_id,title\n1,x\n")
    files["not-parquet"] = (folder / "not-parquet.parquet", "not a readable parquet file")
    return files


def _cli(config: RecipeConfig, *args: str) -> list[str]:
    overrides = [*SMALL_RUN, f"output_dir={config.output_dir}", f"export_dir={config.export_dir}"]
    return ["refresh-items", *args, *(a for o in overrides for a in ("--set", o))]


def test_bad_inputs_are_refused_in_one_line_and_change_nothing(run, tmp_path, capsys):
    before = _unchanged_parts(run)
    for name, (path, message) in _bad_files(run, tmp_path).items():
        with pytest.raises(SystemExit) as exited:
            twotower_main(_cli(run, "--items", str(path)))
        error = capsys.readouterr().err.strip()
        assert exited.value.code == 2, name
        assert error.startswith("twotower: refresh-items refused, nothing changed: ") and message in error, (
            name,
            error,
        )
        assert "\n" not in error and "Traceback" not in error, name
    assert _unchanged_parts(run) == before


def test_a_run_that_disagrees_with_itself_is_refused_before_anything_changes(run, tmp_path, capsys):
    run.index_path.write_bytes(b"not an index")
    before = _unchanged_parts(run)
    with pytest.raises(SystemExit) as exited:
        twotower_main(_cli(run, "--items", str(_new_items(run, 2, tmp_path / "new.parquet"))))
    assert exited.value.code == 2
    assert "index: its index on disk is not what it wrote" in capsys.readouterr().err
    assert _unchanged_parts(run) == before


# ------------------------------------------------------------------------------ the manifest
def test_refreshes_keep_the_export_consistent_until_a_stage_they_built_on_runs_again(exported, run, tmp_path):
    original = _unchanged_parts(exported)
    first = refresh_items(run, _new_items(run, 2, tmp_path / "first.parquet"))
    second_items = tmp_path / "second.parquet"
    load_recipe_data(run.data_dir).items.head(3).assign(item_id=[20_001, 20_002, 20_003]).to_parquet(
        second_items, index=False
    )
    second = refresh_items(run, second_items)
    assert (first.version, second.version) == (2, 3)
    assert model_versions(run.export_dir / run.serve.model_name) == [2, 3]  # the one served before the refresh is kept
    assert second.catalogue_size == len(load_item_vectors(run.item_vectors_path)[0]) == first.catalogue_size + 3

    entry = read_manifest(run)[REFRESH]
    assert [added["item_ids"] for added in entry["added"]] == [
        [NEW_IDS_FROM, NEW_IDS_FROM + 1],
        [20_001, 20_002, 20_003],
    ]
    assert entry["base"]["index"] == read_manifest(run)["index"]["produced"]["index"] != entry["produced"]["index"]
    pipeline.run_export(run)  # the refreshed run agrees with itself
    assert _unchanged_parts(exported) == original  # the run it was copied from is not touched (Feast's absolute paths)
    packaged = json.loads((run.export_dir / run.serve.model_name / "run_fingerprints.json").read_text())
    assert packaged["index"] == entry["produced"]["index"] == fingerprint(run.index_path)

    pipeline.run_features(run)  # rebuilt from the data: its item view no longer has the refreshed items
    with pytest.raises(ArtifactMismatch) as refused:
        pipeline.run_export(run)
    message = str(refused.value)
    assert (
        "train: its item_vectors on disk holds items added by refresh-items, "
        "which no longer applies because 'features' ran again" in message
    )
    assert "Re-run, in this order: twotower train, twotower index; then twotower export." in message
