"""End to end through a real Triton server started from the nvidia-pytriton wheel."""

import dataclasses
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from twotower.config import ServeConfig
from twotower.serving import triton as serve
from twotower.serving.client import recommend
from twotower.serving.export import load_exported_ensemble, model_versions, recommend_in_process
from twotower.serving.ops.features import SERVED_FEATURE_REPO
from twotower.serving.triton import PortInUse, TritonServer

pytestmark = pytest.mark.integration
TIMEOUT_S = 30


def _serve_config(model_name="executor_model", **ports) -> ServeConfig:
    """Ports 0: the server picks free ones, so two test runs never collide."""
    return ServeConfig(**{"grpc_port": 0, "http_port": 0, "metrics_port": 0, **ports}, model_name=model_name, top_k=5)


@pytest.fixture(scope="module")
def relocated(exported, tmp_path_factory):
    """The run's outputs and model repository copied elsewhere, as a moved project would be."""
    root = tmp_path_factory.mktemp("moved")
    shutil.copytree(exported.output_dir, root / "artifacts")
    shutil.copytree(exported.export_dir, root / "triton_models")
    return root


@pytest.fixture(scope="module")
def server(exported, relocated):
    # The original run folder is hidden while the server loads: nothing may point back into it.
    original = exported.output_dir.parent
    hidden = original.with_name(original.name + "-hidden")
    original.rename(hidden)
    running = TritonServer(relocated / "triton_models", relocated / "triton", _serve_config())
    try:
        running.start()
    finally:
        hidden.rename(original)
    # not `with running:`: __enter__ would start a second server and orphan this one
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


def _test_users(exported, count=4):
    return (
        pd.read_parquet(exported.data_dir / "splits" / "test.parquet")["user_id"]
        .drop_duplicates()
        .head(count)
        .to_numpy()
    )


def test_batch_of_users_follows_the_contract_and_matches_in_process(exported, relocated, server):
    users = _test_users(exported)
    answer = recommend(users, server.grpc_url)
    item_ids, scores = answer["item_ids"], answer["scores"]
    assert item_ids.dtype == np.int64 and scores.dtype == np.float32 and answer["is_fallback"].dtype == bool
    assert item_ids.shape == scores.shape == (len(users), 5)
    assert not answer["is_fallback"].any()
    catalogue = set(np.load(exported.item_vectors_path)["item_ids"])
    for row_items, row_scores in zip(item_ids, scores):
        assert len(set(row_items)) == len(row_items)
        assert set(row_items) <= catalogue
        assert (np.diff(row_scores) <= 1e-6).all()

    expected = recommend_in_process(load_exported_ensemble(relocated / "triton_models"), users)
    np.testing.assert_array_equal(item_ids, expected["item_ids"])
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-5, atol=1e-6)

    # batch order: the reversed batch gets the reversed rows, and one user alone the same row
    reversed_answer = recommend(users[::-1], server.grpc_url)
    np.testing.assert_array_equal(reversed_answer["item_ids"], item_ids[::-1])
    np.testing.assert_array_equal(recommend(users[1:2], server.grpc_url)["item_ids"][0], item_ids[1])


def test_seen_items_are_excluded(exported, server):
    known = pd.concat(
        [pd.read_parquet(exported.data_dir / "splits" / f"{name}.parquet") for name in ("train", "valid")]
    )
    users = _test_users(exported, 10)
    answer = recommend(users, server.grpc_url)
    for user_id, row in zip(users, answer["item_ids"]):
        assert not set(row) & set(known.loc[known.user_id == user_id, "item_id"])


def test_unknown_users_get_the_most_popular_items_flagged(exported, server):
    users = _test_users(exported, 2)
    answer = recommend(np.array([users[0], -7, 999_999_999, users[1]]), server.grpc_url)
    assert answer["is_fallback"].tolist() == [False, True, True, False]
    train = pd.read_parquet(exported.data_dir / "splits" / "train.parquet")
    counts = train["item_id"].value_counts()
    # most popular first (ties may order either way)
    assert set(answer["item_ids"][1]) == set(answer["item_ids"][2])
    assert counts[answer["item_ids"][1][0]] == counts.iloc[0]
    assert (np.diff(answer["scores"][1]) <= 0).all()


def test_a_running_server_refuses_a_second_start(server):
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def _infer(client, name, array, datatype):
    request = grpcclient.InferInput(name, list(array.shape), datatype)
    request.set_data_from_numpy(array)
    return client.infer("executor_model", [request], client_timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    "name, array, datatype, message",
    [
        # Triton's own checks, in one line (an empty batch of [0, 1]: Triton expects at least one row's bytes)
        (
            "user_id",
            np.zeros((0, 1), dtype=np.int64),
            "INT64",
            r"input byte size mismatch for input 'user_id' .* Expected 8, got 0$",
        ),
        ("user_id", np.zeros((2000, 1), dtype=np.int64), "INT64", r"batch-size must be <= 1024 for 'executor_model'$"),
        ("user_id", np.array([[10.0]], dtype=np.float32), "FP32", "FP32"),
        ("user_id", np.array([10, 20], dtype=np.int64), "INT64", r"shape .* Expected \[-1,1\], got \[2\]"),
        ("not_user_id", np.array([[10]], dtype=np.int64), "INT64", "user_id"),
    ],
    ids=["empty-batch", "oversized-batch", "wrong-dtype", "wrong-shape", "missing-input"],
)
def test_bad_requests_are_invalid_argument_in_one_line_and_server_keeps_serving(
    exported, server, client, name, array, datatype, message
):
    with pytest.raises(InferenceServerException) as raised:
        _infer(client, name, array, datatype)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(message, raised.value.message()) and "\n" not in raised.value.message()
    assert "Traceback" not in raised.value.message() and ".py" not in raised.value.message()
    assert client.is_server_ready(client_timeout=TIMEOUT_S) and client.is_model_ready(
        "executor_model", client_timeout=TIMEOUT_S
    )
    assert recommend(_test_users(exported, 1), server.grpc_url)["item_ids"].shape == (1, 5)


def test_a_port_held_by_another_triton_is_refused_naming_it(relocated, server, tmp_path):
    decoy_port = server.ports.grpc
    with pytest.raises(
        PortInUse, match=rf"grpc port {decoy_port} .* in use by pid {server.process.pid} \(tritonserver\)"
    ):
        TritonServer(relocated / "triton_models", tmp_path / "triton", _serve_config(grpc_port=decoy_port)).start()


def test_readiness_never_comes_from_a_server_we_did_not_start(relocated, server, tmp_path, monkeypatch):
    """Even if the free-port check is raced, the decoy answering 'ready' on the port is not taken
    for the new server: the new one fails to bind and the start fails instead of succeeding."""
    monkeypatch.setattr(serve, "check_ports_free", lambda host, ports: None)
    started = TritonServer(relocated / "triton_models", tmp_path / "triton", _serve_config(grpc_port=server.ports.grpc))
    with pytest.raises((PortInUse, RuntimeError)) as raised:
        started.start()
    assert "Address already in use" in str(raised.value) or "does not hold" in str(raised.value)
    assert started.process.poll() is not None  # the failed server was stopped, not left behind


def test_top_k_above_the_catalogue_is_capped(exported, tmp_path):
    from twotower import pipeline

    config = dataclasses.replace(exported, export_dir=tmp_path / "models")
    config.serve = dataclasses.replace(exported.serve, top_k=10_000)
    pipeline.run_export(config)
    answer = recommend_in_process(load_exported_ensemble(config.export_dir), _test_users(exported, 2))
    catalogue_size = len(np.load(exported.item_vectors_path)["item_ids"])
    assert answer["item_ids"].shape == (2, catalogue_size)
    assert all(len(set(row)) == catalogue_size for row in answer["item_ids"])


def test_failing_start_reports_the_server_log(relocated, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(relocated / "triton_models", broken)
    (broken / "executor_model" / "config.pbtxt").write_text("this is not a model config")
    with pytest.raises(RuntimeError, match="(?s)tritonserver exited.*executor_model"):
        TritonServer(broken, tmp_path / "triton", _serve_config()).start()


def test_a_server_fault_is_internal_in_one_line_with_the_traceback_in_the_log_only(exported, relocated, tmp_path):
    import sqlite3

    run = tmp_path / "run"
    shutil.copytree(relocated / "artifacts", run / "artifacts")
    shutil.copytree(relocated / "triton_models", run / "triton_models")
    with TritonServer(run / "triton_models", tmp_path / "triton", _serve_config()) as running:
        # the online store the served version reads (its own copy) breaks under the server
        served = (
            run / "triton_models" / "executor_model" / str(model_versions(run / "triton_models" / "executor_model")[-1])
        )
        with sqlite3.connect(served / SERVED_FEATURE_REPO / "data" / "online_store.db") as store:
            store.execute("DROP TABLE twotower_user_query_features")
        with pytest.raises(InferenceServerException) as raised:
            recommend(_test_users(exported, 1), running.grpc_url)
        assert raised.value.status() == "StatusCode.INTERNAL"
        assert (
            raised.value.message()
            == "internal error in the serving graph (OperationalError); details are in the server log"
        )
        assert "Traceback" in running.log_path.read_text() and "no such table" in running.log_path.read_text()
        with grpcclient.InferenceServerClient(running.grpc_url) as client:
            assert client.is_model_ready("executor_model", client_timeout=TIMEOUT_S)
