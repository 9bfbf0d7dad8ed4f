"""End to end through a real Triton server started from the nvidia-pytriton wheel."""

import shutil

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from twotower.client import recommend
from twotower.config import ServeConfig
from twotower.ensemble import load_exported_ensemble, recommend_in_process
from twotower.serve import TritonServer

from conftest import free_port

pytestmark = pytest.mark.integration


def _serve_config(model_name="executor_model") -> ServeConfig:
    return ServeConfig(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), model_name=model_name, top_k=5)


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
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


def _test_users(exported, count=4):
    return pd.read_parquet(exported.data_dir / "splits" / "test.parquet")["user_id"].drop_duplicates().head(count).to_numpy()


def test_batch_of_users_follows_the_contract_and_matches_in_process(exported, relocated, server):
    users = _test_users(exported)
    item_ids, scores = recommend(users, server.grpc_url)
    assert item_ids.dtype == np.int64 and scores.dtype == np.float32
    assert item_ids.shape == scores.shape == (len(users), 5)
    catalogue = set(np.load(exported.model_dir / "item_vectors.npz")["item_ids"])
    for row_items, row_scores in zip(item_ids, scores):
        assert len(set(row_items)) == len(row_items)
        assert set(row_items) <= catalogue
        assert (np.diff(row_scores) <= 1e-6).all()

    in_process = load_exported_ensemble(relocated / "triton_models")
    expected_items, expected_scores = recommend_in_process(in_process, users)
    np.testing.assert_array_equal(item_ids, expected_items)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)

    # one user alone gets the same answer as inside the batch
    single_items, _ = recommend(users[1:2], server.grpc_url)
    np.testing.assert_array_equal(single_items[0], item_ids[1])


def test_a_running_server_refuses_a_second_start(server):
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def _infer(client, name, array, datatype):
    request = grpcclient.InferInput(name, list(array.shape), datatype)
    request.set_data_from_numpy(array)
    return client.infer("executor_model", [request])


@pytest.mark.parametrize(
    "name, array, datatype, message",
    [
        ("user_id", np.array([10, -7], dtype=np.int64), "INT64", "unknown user_id"),
        ("user_id", np.array([], dtype=np.int64), "INT64", "empty request"),
        ("user_id", np.array([10.0], dtype=np.float32), "FP32", "FP32"),
        ("not_user_id", np.array([10], dtype=np.int64), "INT64", "user_id"),
    ],
    ids=["unknown-user", "empty-batch", "wrong-dtype", "missing-input"],
)
def test_bad_requests_get_clear_errors_and_server_keeps_serving(exported, server, client, name, array, datatype, message):
    with pytest.raises(InferenceServerException, match=message):
        _infer(client, name, array, datatype)
    assert client.is_server_ready() and client.is_model_ready("executor_model")
    items, _ = recommend(_test_users(exported, 1), server.grpc_url)
    assert items.shape == (1, 5)


def test_failing_start_reports_the_server_log(relocated, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(relocated / "triton_models", broken)
    (broken / "executor_model" / "config.pbtxt").write_text("this is not a model config")
    with pytest.raises(RuntimeError, match="(?s)tritonserver exited.*executor_model"):
        TritonServer(broken, tmp_path / "triton", _serve_config()).start()
