"""Feast rows and live events on a real three-node Redis Cluster with a node stopped under the
served graph: what clients see while it is down, and that the answers come back when it returns."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from conftest import small_config
from tritonclient.utils import InferenceServerException

from twotower.benchmarks.support.redis_server import RedisClusterServers
from twotower.config import FeaturesConfig
from twotower.serving.client import recommend
from twotower.serving.triton import TritonServer
from twotower.store.artifacts import load_split

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 10.0
CLUSTER_DOWN_WITHIN_S = 30.0  # the other nodes declare the cluster down after the node timeout (5 s) and gossip


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory, redis_cluster):  # redis_cluster: redis-server and redis-cli are here
    from twotower import pipeline

    config = small_config(tmp_path_factory.mktemp("cluster-faults"))
    shutil.copytree(exported.output_dir, config.output_dir)
    shutil.copytree(exported.export_dir, config.export_dir)
    with RedisClusterServers(config.output_dir / "redis-cluster", persistent=True) as cluster:
        config.features = FeaturesConfig(online_store="redis_cluster", redis_connection=cluster.connection)
        pipeline.run_features(config)
        pipeline.run_export(config)
        serve = config.serve.__class__(**{**config.serve.__dict__, "grpc_port": 0, "http_port": 0, "metrics_port": 0})
        with TritonServer(config.export_dir, config.output_dir / "triton", serve) as server:
            yield config, cluster, server


def _outcomes(users: np.ndarray, url: str) -> list[dict | str]:
    """Each user's answer alone, or the status and one-line message of its refusal."""
    outcomes = []
    for user in users:
        try:
            answer = recommend([int(user)], url, timeout_s=CLIENT_TIMEOUT_S)
            outcomes.append({"item_ids": answer["item_ids"][0].tolist()})
        except InferenceServerException as error:
            outcomes.append(f"{error.status()} {error.message()}")
    return outcomes


def test_a_stopped_node_is_unavailable_in_one_line_and_the_answers_return_with_it(served):
    config, cluster, server = served
    users = load_split(config.splits_dir).test["user_id"].drop_duplicates().to_numpy()[:12]
    healthy = _outcomes(users, server.grpc_url)
    assert all(isinstance(outcome, dict) for outcome in healthy)

    victim = cluster.servers[0]
    victim.stop()
    try:
        # At once: users whose rows live on the stopped node are refused, the others still answered.
        started = time.monotonic()
        during = _outcomes(users, server.grpc_url)
        assert time.monotonic() - started < CLIENT_TIMEOUT_S
        refused = [outcome for outcome in during if isinstance(outcome, str)]
        assert refused and len(refused) < len(users), during
        for outcome in refused:
            assert outcome.startswith("StatusCode.UNAVAILABLE online feature store unavailable") and "\n" not in outcome
        assert [o for o in during if isinstance(o, dict)] == [h for h, o in zip(healthy, during) if isinstance(o, dict)]
        # Once the cluster counts the node as failed, every key is refused, still in one line.
        deadline = time.monotonic() + CLUSTER_DOWN_WITHIN_S
        while not all(isinstance(outcome, str) for outcome in during):
            assert time.monotonic() < deadline, f"the cluster still answered some keys: {during}"
            time.sleep(0.5)
            during = _outcomes(users, server.grpc_url)
        assert all(o.startswith("StatusCode.UNAVAILABLE") and "\n" not in o for o in during)
    finally:
        victim.start()  # its nodes.conf brings it back into the same cluster, its append-only file its keys
    deadline = time.monotonic() + CLUSTER_DOWN_WITHIN_S
    after = _outcomes(users, server.grpc_url)
    while after != healthy:
        assert time.monotonic() < deadline, f"no recovery: {after}"
        time.sleep(0.5)
        after = _outcomes(users, server.grpc_url)
