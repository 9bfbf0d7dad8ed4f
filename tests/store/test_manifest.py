"""Artifacts cannot silently disagree: the run manifest, atomic stage outputs, the export's
refusal and the served graph's load-time check, against real stage runs and processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SMALL_RUN, small_config
from feast import FeatureStore

from twotower import pipeline
from twotower.config import RecipeConfig
from twotower.serving.export import load_exported_ensemble, recommend_in_process
from twotower.serving.ops.features import FEATURE_REPO_ENV
from twotower.store.artifacts import load_split
from twotower.store.atomic import atomic_dir
from twotower.store.features import QUERY_VIEW, RUN_VIEW, OnlineReader
from twotower.store.manifest import EXPORT_RECORD, STAGES, ArtifactMismatch, artifact_paths, fingerprint, read_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def run(exported, tmp_path) -> RecipeConfig:
    """A copy of the session's whole small run (outputs and model repository), free to mutate."""
    config = small_config(tmp_path)
    shutil.copytree(exported.output_dir, config.output_dir)
    shutil.copytree(exported.export_dir, config.export_dir)
    return config


def _stage_command(config: RecipeConfig, stage: str) -> list[str]:
    overrides = [*SMALL_RUN, f"output_dir={config.output_dir}", f"export_dir={config.export_dir}"]
    return [sys.executable, "-m", "twotower", stage, *(arg for item in overrides for arg in ("--set", item))]


def _test_users(config: RecipeConfig, count: int = 4) -> np.ndarray:
    return load_split(config.splits_dir).test["user_id"].drop_duplicates().head(count).to_numpy()


def _refusal(config: RecipeConfig) -> str:
    with pytest.raises(ArtifactMismatch) as refused:
        pipeline.run_export(config)
    return str(refused.value)


def test_fingerprints_follow_content_not_location(tmp_path):
    folder = tmp_path / "a"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"one")
    (folder / "y.txt").write_text("two")
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "b")
    assert fingerprint(copy) == fingerprint(folder)
    (copy / "y.txt").write_text("tw0")
    assert fingerprint(copy) != fingerprint(folder)
    # a file moved between folders changes the folder's fingerprint even with the same bytes
    (copy / "y.txt").write_text("two")
    (copy / "y.txt").rename(copy / "sub" / "y.txt")
    assert fingerprint(copy) != fingerprint(folder)


def test_a_failed_build_leaves_the_old_folder_and_a_dead_writers_staging_is_removed(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("stage failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"

    # staging of a process that is gone (a reaped child's pid): removed by the next write
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f".out.tmp-{child.stdout.strip()}-0000"
    stale.mkdir()
    with atomic_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["new.txt"]


def test_a_new_vocabulary_refuses_the_export_until_the_stages_after_it_run_again(run):
    manifest_before = read_manifest(run)
    assert set(manifest_before) == set(STAGES)
    pipeline.run_export(run)  # the copied run agrees with itself

    run.seed = 7  # other synthetic data, so the re-fitted workflow has another vocabulary
    pipeline.run_data(run)
    pipeline.run_workflow(run)
    message = _refusal(run)
    assert "train: it used the users of an earlier 'data' run" in message
    assert "index: it reads the item_vectors of 'train', which must run again first" in message
    assert "Re-run, in this order: twotower train, twotower index, twotower features; then twotower export." in message

    # re-trained and re-indexed, but the online store still holds codes of the old vocabulary
    pipeline.run_train(run)
    assert "Re-run, in this order: twotower index, twotower features;" in _refusal(run)
    pipeline.run_index(run)
    message = _refusal(run)
    assert "features: it used the users of an earlier 'data' run" in message
    assert "Re-run, in this order: twotower features; then twotower export." in message
    pipeline.run_features(run)
    pipeline.run_export(run)

    packaged = json.loads((run.export_dir / run.serve.model_name / EXPORT_RECORD).read_text())
    entries = read_manifest(run)
    assert (
        packaged["workflow"]
        == entries["workflow"]["produced"]["workflow"]
        != manifest_before["workflow"]["produced"]["workflow"]
    )
    assert packaged["index"] == entries["index"]["produced"]["index"]
    answer = recommend_in_process(load_exported_ensemble(run.export_dir), _test_users(run))
    assert not answer["is_fallback"].any()


def test_an_artifact_changed_by_hand_or_missing_is_refused_naming_its_stage(run):
    run.index_path.write_bytes(b"not an index")
    assert "index: its index on disk is not what it wrote" in _refusal(run)
    run.index_path.unlink()
    assert "index: its index is missing" in _refusal(run)
    manifest = read_manifest(run)
    del manifest["features"]
    run.manifest_path.write_text(json.dumps(manifest))
    assert "features: it has not run" in _refusal(run)


@pytest.mark.timeout(600)
def test_train_killed_mid_write_leaves_the_previous_run_whole(run):
    paths = artifact_paths(run)
    produced = STAGES["train"].produces
    before = {name: fingerprint(paths[name]) for name in produced}
    manifest_bytes = run.manifest_path.read_bytes()

    log = run.output_dir.parent / "train.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            _stage_command(run, "train"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        # Killed once the new model folder is being written: its staging folder holds a tower.
        deadline = time.monotonic() + 400
        while not list(run.output_dir.glob(".model.tmp-*/query_tower")):
            assert process.poll() is None, f"train ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "train never started writing its model"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert "[train] epoch 1/" in log.read_text()  # it did train before it was killed mid-write

    assert list(run.output_dir.glob(".model.tmp-*")), "the killed run's staging folder is left behind"
    assert {name: fingerprint(paths[name]) for name in produced} == before
    assert run.manifest_path.read_bytes() == manifest_bytes
    pipeline.run_export(run)  # the previous run still agrees with itself

    # Training again (another seed: other weights) removes the dead run's staging; serving
    # the new towers needs a new index.
    run.seed = 7
    pipeline.run_train(run)
    assert not list(run.output_dir.glob(".model.tmp-*"))
    message = _refusal(run)
    assert "index: it used the item_vectors of an earlier 'train' run" in message
    assert "Re-run, in this order: twotower index; then twotower export." in message
    pipeline.run_index(run)
    pipeline.run_export(run)


def test_the_served_graph_refuses_an_online_store_from_another_workflow(run, monkeypatch):
    users = _test_users(run)
    answer = recommend_in_process(load_exported_ensemble(run.export_dir), users)
    assert not answer["is_fallback"].any()  # the copied export loads against its own store

    # The run's store re-materialized from a workflow fitted on other data while the export still
    # holds the old model: the export reads its own copy and answers as before ...
    run.seed = 7
    pipeline.run_data(run)
    pipeline.run_workflow(run)
    pipeline.run_features(run)
    again = recommend_in_process(load_exported_ensemble(run.export_dir), users)
    np.testing.assert_array_equal(again["item_ids"], answer["item_ids"])
    assert "Re-run, in this order: twotower train, twotower index;" in _refusal(run)
    # ... and refuses the run's store when told to read it instead
    monkeypatch.setenv(FEATURE_REPO_ENV, str(run.feature_repo_dir))
    with pytest.raises(
        ArtifactMismatch,
        match=r"online store .* holds features encoded by workflow \w{12}, but this model was exported for workflow",
    ):
        load_exported_ensemble(run.export_dir)

    # a store without the record (built before it existed) is refused too
    FeatureStore(repo_path=str(run.feature_repo_dir)).delete_feature_view(RUN_VIEW)
    with pytest.raises(ArtifactMismatch, match="no recorded workflow"):
        load_exported_ensemble(run.export_dir)


@pytest.mark.timeout(600)
def test_rerunning_features_keeps_readers_answering(run):
    users = _test_users(run, 8)
    database = run.feature_repo_dir / "data" / "online_store.db"
    reader = OnlineReader(run.feature_repo_dir, QUERY_VIEW)
    before = reader.read(users)  # opens the reader's connection, as a loaded server has
    assert all(row is not None for row in before)
    inode = database.stat().st_ino

    log = run.output_dir.parent / "features.log"
    with open(log, "w") as out:
        process = subprocess.Popen(_stage_command(run, "features"), stdout=out, stderr=subprocess.STDOUT)
    reads = 0
    # All the while the stage builds and swaps the store: the open reader, and readers opened
    # meanwhile (a server loading), see a complete store. (Rebuilt in place, the repository
    # went missing under new readers and the open one read a corrupted file.)
    while process.poll() is None:
        assert reader.read(users) == before
        assert OnlineReader(run.feature_repo_dir, QUERY_VIEW).read(users) == before  # same workflow, same codes
        reads += 1
    assert process.returncode == 0, log.read_text()[-3000:]
    assert reads > 10 and "[features] Feast repository applied" in log.read_text()

    assert database.stat().st_ino != inode  # a new store is in place ...
    assert reader.read(users) == before  # ... and the old reader still reads the one it opened
    assert OnlineReader(run.feature_repo_dir, QUERY_VIEW).read(users) == before
    assert not list(run.output_dir.glob(".feature_repo.tmp-*"))
    pipeline.run_export(run)
