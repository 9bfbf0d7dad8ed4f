"""Scale-out paths run for real and compared with the default ones.

NVTabular on a local Dask cluster against the single process, Feast's online store
on a real redis-server against SQLite, and Triton's instance count and dynamic
batching written into the export and loaded by a real server.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from conftest import served_user_columns, small_config
from tritonclient.grpc import model_config_pb2

from twotower import pipeline
from twotower.config import FeaturesConfig, ServeConfig
from twotower.serving.client import recommend
from twotower.serving.export import (
    apply_serving_settings,
    load_exported_ensemble,
    read_model_config,
    recommend_in_process,
)
from twotower.serving.graph import recipe_ensemble
from twotower.serving.triton import TritonServer
from twotower.stages.features import build_feature_store, feature_tables
from twotower.stages.workflow import category_table, load_workflow
from twotower.store.features import online_user_features


def _encoded_rows(config) -> pd.DataFrame:
    files = sorted((config.data_dir / "train_encoded").glob("*.parquet"))
    rows = pd.concat([pd.read_parquet(path) for path in files], ignore_index=True)
    for column in ("genres", "history"):
        rows[column] = rows[column].map(tuple)  # lists do not sort
    return rows.sort_values(list(rows.columns)).reset_index(drop=True)


def _test_users(config, count=6) -> np.ndarray:
    return (
        pd.read_parquet(config.data_dir / "splits" / "test.parquet")["user_id"].drop_duplicates().head(count).to_numpy()
    )


@pytest.mark.integration
def test_workflow_on_two_dask_workers_matches_single_process(prepared, tmp_path, capsys):
    from distributed import get_client
    from merlin.core.utils import global_dask_client

    config = small_config(tmp_path, "workflow.dask_workers=2")
    shutil.copytree(prepared.data_dir, config.data_dir, ignore=shutil.ignore_patterns("train_encoded"))
    pipeline.run_workflow(config)
    assert "in 2 partition(s)" in capsys.readouterr().out

    pd.testing.assert_frame_equal(_encoded_rows(config), _encoded_rows(prepared))
    for name, column in (("user", "user_id"), ("user", "zip_code"), ("item", "item_id"), ("item", "genres")):
        pd.testing.assert_frame_equal(
            category_table(load_workflow(config.workflow_dir, name), column),
            category_table(load_workflow(prepared.workflow_dir, name), column),
        )
    # the cluster lived only as long as the stage
    assert global_dask_client() is None
    with pytest.raises(ValueError):
        get_client()


# ------------------------------------------------------------------------ Redis
@pytest.fixture(scope="module")
def redis_repo(exported, redis_port, tmp_path_factory):
    """The run's Feast repository deployed again with its online store on Redis."""
    repo = tmp_path_factory.mktemp("redis-feast") / "feature_repo"
    features = FeaturesConfig(online_store="redis", redis_connection=f"127.0.0.1:{redis_port}")
    build_feature_store(feature_tables(exported), repo, features)
    return repo


@pytest.mark.integration
def test_redis_online_store_serves_materialized_rows(exported, redis_port, redis_repo):
    import redis
    from feast import FeatureStore

    assert "type: redis" in (redis_repo / "feature_store.yaml").read_text()
    assert not (redis_repo / "data" / "online_store.db").exists(), "rows went to SQLite"
    assert redis.Redis(host="127.0.0.1", port=redis_port).dbsize() > 0

    store = FeatureStore(repo_path=str(redis_repo))
    users = pd.read_parquet(exported.data_dir / "users.parquet").head(5)
    online = online_user_features(store, users["user_id"].tolist(), served_user_columns(exported))
    pd.testing.assert_frame_equal(online, users[online.columns].reset_index(drop=True), check_dtype=False)
    assert (
        online_user_features(store, [-1], served_user_columns(exported)).drop(columns="user_id").isna().all(axis=None)
    )


@pytest.mark.integration
def test_ensemble_answers_the_same_with_redis_as_with_sqlite(exported, redis_repo):
    users = _test_users(exported)
    sqlite, redis = (
        recommend_in_process(recipe_ensemble(exported, repo), users) for repo in (exported.feature_repo_dir, redis_repo)
    )
    assert sqlite["item_ids"].shape == (len(users), exported.serve.top_k)
    for name in ("item_ids", "scores", "is_fallback"):
        np.testing.assert_array_equal(redis[name], sqlite[name])


# ----------------------------------------------------------------------- Triton
@pytest.mark.unit
def test_export_batches_up_to_the_request_limit_with_the_configured_cpu_instances(exported):
    config = read_model_config(exported.export_dir / "executor_model")
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (exported.serve.instance_count, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.max_batch_size == exported.serve.max_request_users
    assert config.dynamic_batching.max_queue_delay_microseconds == exported.serve.max_queue_delay_us
    # a row per user on Triton's batch dimension; no empty reshape (Triton 2.51's python backend
    # crashes on an empty batch of such an input)
    assert [(t.name, list(t.dims), t.HasField("reshape")) for t in config.input] == [("user_id", [1], False)]
    k = exported.serve.top_k
    assert {t.name: list(t.dims) for t in config.output} == {"item_ids": [k], "scores": [k], "is_fallback": [1]}
    assert config.backend == "python" and config.platform == "merlin_executor"


@pytest.mark.unit
def test_serving_settings_can_be_rewritten_on_an_export(exported, tmp_path):
    model_dir = tmp_path / "executor_model"
    model_dir.mkdir()
    shutil.copy2(exported.export_dir / "executor_model" / "config.pbtxt", model_dir)
    apply_serving_settings(model_dir, ServeConfig(instance_count=3, dynamic_batching=False, max_request_users=64))

    config = read_model_config(model_dir)
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.max_batch_size == 64 and not config.HasField("dynamic_batching")
    (user_id,) = config.input
    assert list(user_id.dims) == [1]  # the batch dimension is added once
    assert {t.name: list(t.dims) for t in config.output}["item_ids"] == [exported.serve.top_k]

    with pytest.raises(ValueError, match="instance_count"):
        apply_serving_settings(model_dir, ServeConfig(instance_count=0))


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_each_gets_its_own_users_answer(exported, tmp_path):
    # A copy of the run (outputs and model repository side by side, as the export expects).
    shutil.copytree(exported.output_dir, tmp_path / "artifacts")
    shutil.copytree(exported.export_dir, tmp_path / "triton_models")
    # a long queue delay, so requests sent together are surely batched together
    serve = ServeConfig(
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        top_k=exported.serve.top_k,
        instance_count=2,
        max_queue_delay_us=200_000,
    )
    apply_serving_settings(tmp_path / "triton_models" / serve.model_name, serve)
    known = _test_users(exported, 12)
    requests = [np.array([user]) for user in known] + [np.array([-7]), known[:3], known[::-1]]
    ensemble = load_exported_ensemble(tmp_path / "triton_models")
    expected = [recommend_in_process(ensemble, users) for users in requests]

    with TritonServer(tmp_path / "triton_models", tmp_path / "triton", serve) as server:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda users: recommend(users, server.grpc_url), requests))
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            (stats,) = client.get_inference_statistics(serve.model_name, client_timeout=30).model_stats
    for users, answer, alone in zip(requests, answers, expected):
        assert answer["item_ids"].shape == (len(users), serve.top_k)
        np.testing.assert_array_equal(answer["item_ids"], alone["item_ids"])
        np.testing.assert_allclose(answer["scores"], alone["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(answer["is_fallback"], alone["is_fallback"])
    assert stats.inference_count == sum(len(users) for users in requests)
    assert stats.execution_count < len(requests), "no two requests were answered together"
