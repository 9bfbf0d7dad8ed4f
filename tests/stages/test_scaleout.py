"""Scale-out paths run for real and compared with the default ones.

NVTabular on a local Dask cluster against the single process, Feast's online store
on a real redis-server against SQLite, and Triton's instance count and dynamic
batching written into the export and loaded by a real server.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from conftest import served_user_columns, small_config
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from twotower import pipeline
from twotower.benchmarks.support.redis_server import RedisServer
from twotower.config import FeaturesConfig, ServeConfig
from twotower.serving.export import apply_serving_settings, load_exported_ensemble, recommend_in_process
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
def redis_port(tmp_path_factory):
    """A real redis-server on a free loopback port, without persistence, for this module."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.port


@pytest.fixture(scope="module")
def redis_repo(exported, redis_port, tmp_path_factory):
    """The run's Feast repository deployed again with its online store on Redis."""
    repo = tmp_path_factory.mktemp("redis-feast") / "feature_repo"
    features = FeaturesConfig(online_store="redis", redis_connection=f"127.0.0.1:{redis_port}")
    build_feature_store(*feature_tables(exported), repo, features)
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
def _read_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.unit
def test_default_export_keeps_the_contract_with_one_cpu_instance(exported):
    config = _read_config(exported.export_dir / "executor_model" / "config.pbtxt")
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("user_id", [-1])]
    k = exported.serve.top_k
    assert {t.name: list(t.dims) for t in config.output} == {
        "item_ids": [-1, k],
        "scores": [-1, k],
        "is_fallback": [-1],
    }


@pytest.mark.unit
def test_instance_count_and_dynamic_batching_are_written(exported, tmp_path):
    model_dir = tmp_path / "executor_model"
    model_dir.mkdir()
    shutil.copy2(exported.export_dir / "executor_model" / "config.pbtxt", model_dir)
    serve = ServeConfig(instance_count=3, dynamic_batching=True, max_batch_size=64, max_queue_delay_us=250)
    apply_serving_settings(model_dir, serve)

    config = _read_config(model_dir / "config.pbtxt")
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    (user_id,) = config.input
    assert list(user_id.dims) == [1] and user_id.HasField("reshape") and list(user_id.reshape.shape) == []
    k = exported.serve.top_k
    assert {t.name: list(t.dims) for t in config.output} == {"item_ids": [k], "scores": [k], "is_fallback": [1]}
    assert config.backend == "python" and config.platform == "merlin_executor"

    with pytest.raises(ValueError, match="instance_count"):
        apply_serving_settings(model_dir, ServeConfig(instance_count=0))


@pytest.mark.integration
def test_triton_serves_two_instances_with_dynamic_batching(exported, tmp_path):
    # A copy of the run (outputs and model repository side by side, as the export expects).
    shutil.copytree(exported.output_dir, tmp_path / "artifacts")
    shutil.copytree(exported.export_dir, tmp_path / "triton_models")
    serve = ServeConfig(
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        top_k=exported.serve.top_k,
        instance_count=2,
        dynamic_batching=True,
        max_batch_size=32,
    )
    apply_serving_settings(tmp_path / "triton_models" / serve.model_name, serve)
    users = _test_users(exported)
    expected = recommend_in_process(load_exported_ensemble(tmp_path / "triton_models"), users)

    with TritonServer(tmp_path / "triton_models", tmp_path / "triton", serve) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            served = client.get_model_config(serve.model_name, client_timeout=30).config
            assert served.instance_group[0].count == 2 and served.max_batch_size == 32
            # with dynamic batching on, a request carries user_id as [n, 1]
            request = grpcclient.InferInput("user_id", [len(users), 1], "INT64")
            request.set_data_from_numpy(users.astype(np.int64).reshape(-1, 1))
            result = client.infer(serve.model_name, [request], client_timeout=30)
            flat = grpcclient.InferInput("user_id", [len(users)], "INT64")
            flat.set_data_from_numpy(users.astype(np.int64))
            with pytest.raises(InferenceServerException, match="shape"):
                client.infer(serve.model_name, [flat], client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("item_ids"), expected["item_ids"])
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-5, atol=1e-6)
