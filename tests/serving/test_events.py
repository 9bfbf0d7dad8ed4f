"""Live events: the store (order, no lost update, on SQLite and Redis), the checks of a batch, how
events fold into a user's rows, and the endpoint through a real Triton server: the next answer
changes, an unknown user is answered personally, a bad batch changes nothing, concurrent events
all land in order and survive a killed server; on SQLite and on Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from conftest import small_config
from rollout import served_rows
from tritonclient.utils import InferenceServerException

from twotower.config import FeaturesConfig
from twotower.serving.client import recommend, send_events
from twotower.serving.errors import RequestError
from twotower.serving.events import check_events
from twotower.serving.export import load_exported_ensemble, recommend_in_process
from twotower.serving.ops.live import LiveRows
from twotower.serving.triton import TritonServer
from twotower.store.artifacts import load_split
from twotower.store.events import EventBatch, EventLog, deploy_live_store, open_live_store, record_events
from twotower.store.features import LIVE_ENCODING

NOW = int(time.time())
INT_IDS = {"user_id": False, "item_id": False}


def _batch(users, items, times, labels=None) -> EventBatch:
    times = [int(t) for t in times]
    return EventBatch([str(u) for u in users], [str(i) for i in items], times, labels or [None] * len(users))


def _concurrent_events_land_in_time_order(events_dir) -> None:
    """8 writers, each with its own connection, 1,000 events of one user with shuffled times."""
    times = np.random.default_rng(0).permutation(1000) + 1_000_000
    chunks = np.array_split(times, 8)

    def write(chunk):
        store = open_live_store(events_dir)
        for start in range(0, len(chunk), 10):
            part = chunk[start : start + 10]
            record_events(events_dir, _batch(["u"] * len(part), part, part), store)
        store.close()

    threads = [threading.Thread(target=write, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (events,) = open_live_store(events_dir).items_of(["u"]).values()
    assert [int(event.item_id) for event in events] == sorted(times.tolist())  # item id = its time here
    assert sorted(EventLog(events_dir).read()["timestamp"]) == sorted(times.tolist())


@pytest.mark.unit
def test_concurrent_events_on_sqlite_all_land_in_time_order(tmp_path):
    deploy_live_store(tmp_path, FeaturesConfig())
    _concurrent_events_land_in_time_order(tmp_path)


@pytest.mark.integration
def test_concurrent_events_on_redis_all_land_in_time_order(tmp_path, redis_port):
    deploy_live_store(tmp_path, FeaturesConfig(online_store="redis", redis_connection=f"127.0.0.1:{redis_port}"))
    _concurrent_events_land_in_time_order(tmp_path)


@pytest.mark.integration
def test_concurrent_events_on_a_redis_cluster_all_land_in_time_order_across_its_nodes(tmp_path, redis_cluster):
    deploy_live_store(tmp_path, FeaturesConfig(online_store="redis_cluster", redis_connection=redis_cluster))
    store = open_live_store(tmp_path)
    store.append(_batch([f"u{i}" for i in range(30)], list(range(30)), [100] * 30), 1)
    nodes = {store.client.get_node_from_key(store._key(f"u{i}")).name for i in range(30)}
    assert len(nodes) == 3  # the users' keys live on every node
    assert store.items_of(["u0", "u29"]) == {"u0": [(1, "0", None)], "u29": [(30, "29", None)]}
    _concurrent_events_land_in_time_order(tmp_path)


@pytest.mark.unit
def test_events_of_the_same_second_keep_their_arrival_order_and_labels(tmp_path):
    deploy_live_store(tmp_path, FeaturesConfig())
    store = open_live_store(tmp_path)
    store.append(_batch(["a", "a", "b"], [5, 3, 9], [100, 100, 50], [4.0, None, 1.0]), 1)
    store.append(_batch(["a"], [7], [99]), 4)
    assert store.items_of(["a", "b", "c"]) == {
        "a": [(4, "7", None), (1, "5", 4.0), (2, "3", None)],
        "b": [(3, "9", 1.0)],
    }


@pytest.mark.unit
def test_the_log_numbers_events_in_arrival_order_and_cuts_a_torn_last_line(tmp_path):
    deploy_live_store(tmp_path, FeaturesConfig())
    store = open_live_store(tmp_path)
    record_events(tmp_path, _batch(["a", "b"], [5, 3], [100, 90]), store)
    with open(tmp_path / "log.jsonl", "a") as log:  # a writer killed mid-line: never acknowledged
        log.write('{"sequence": 3, "user_id": "a", "ite')
    record_events(tmp_path, _batch(["a"], [7], [95]), store)
    logged = EventLog(tmp_path).read()
    assert logged["sequence"].tolist() == [1, 2, 3] and logged["item_id"].tolist() == ["5", "3", "7"]
    assert store.items_of(["a"]) == {"a": [(3, "7", None), (1, "5", None)]}


@pytest.mark.unit
@pytest.mark.parametrize(
    "users, items, times, labels, text, message",
    [
        (None, [1], [NOW], None, INT_IDS, "missing input 'user_id'"),
        ([], [], [], None, INT_IDS, "empty request"),
        (
            [b"u1", b""],
            [b"i", b"j"],
            [NOW, NOW],
            None,
            {"user_id": True, "item_id": True},
            "'user_id' is empty in row 1",
        ),
        ([1, 2], [3, 4], [NOW, 0], None, INT_IDS, "row 1 has 0"),
        ([1], [3], [NOW + 3 * 86_400], None, INT_IDS, "not over a day ahead"),
        ([1, 2], [3, 4], [NOW, NOW], [4.0, float("nan")], INT_IDS, "'label' is not a number in row 1"),
    ],
)
def test_a_bad_batch_is_refused_with_its_first_bad_row(users, items, times, labels, text, message):
    def column(values, dtype):
        return None if values is None else np.array(values, dtype=dtype)

    kind = object if text["user_id"] else np.int64
    with pytest.raises(RequestError, match=message):
        check_events(
            column(users, kind), column(items, kind), column(times, np.int64), column(labels, np.float32), text
        )


@pytest.mark.unit
def test_events_fold_into_history_seen_items_and_unknown_users(tmp_path):
    """History length 3, positives from rating 4: by hand."""
    (tmp_path / LIVE_ENCODING).write_text(
        json.dumps(
            {
                "history_length": 3,
                "min_rating": 4.0,
                "history_items": [10, 11, 12],
                "history_codes": [3, 4, 5],
                "unknown_item_code": 2,
                "unknown_user": {"encoded_user_id": 2, "encoded_age": 2, "encoded_history": []},
                "folded_sequences": [5],
            }
        )
    )
    deploy_live_store(tmp_path, FeaturesConfig())
    store = open_live_store(tmp_path)
    store.append(_batch([1, 1, 1, 7, 1], [12, 10, 99, 11, 11], [10, 20, 30, 5, 1], [5.0, 2.0, None, None, 5.0]), 1)
    encoded = [{"encoded_user_id": 8, "encoded_age": 4, "encoded_history": [4, 3, 3]}, None, None]
    raw = [{"seen_items": [10, 11]}, None, None]
    LiveRows(tmp_path, store, None).fold(["1", "7", "8"], encoded, raw)
    # user 1: item 10 (rating 2) is seen but not a positive; 99 is outside the vocabulary; event 5
    # (item 11) is in the Feast row already (the data stage took it in), so it is not added again
    assert encoded[0] == {"encoded_user_id": 8, "encoded_age": 4, "encoded_history": [3, 5, 2]}
    assert raw[0] == {"seen_items": [10, 11, 12, 10, 99]}
    # user 7: no Feast row, one event: the out-of-vocabulary profile with that history
    assert encoded[1] == {"encoded_user_id": 2, "encoded_age": 2, "encoded_history": [4]}
    assert raw[1] == {"seen_items": [11]}
    assert encoded[2] is None and raw[2] is None  # no events, no row


# ----------------------------------------------------------------------- Triton
@pytest.fixture(scope="module", params=["sqlite", "redis", "redis_cluster"])
def run(request, exported, tmp_path_factory):
    """A copy of the session's run and model repository, whose events no other test sees; with
    ``redis`` (``redis_cluster``), its features and live events on a real redis-server (a real
    three-node Redis Cluster): features and export run again."""
    from twotower import pipeline

    config = small_config(tmp_path_factory.mktemp(f"events-{request.param}"))
    shutil.copytree(exported.output_dir, config.output_dir)
    shutil.copytree(exported.export_dir, config.export_dir)
    if request.param != "sqlite":
        connection = (
            f"127.0.0.1:{request.getfixturevalue('redis_port')}"
            if request.param == "redis"
            else request.getfixturevalue("redis_cluster")
        )
        config.features = FeaturesConfig(online_store=request.param, redis_connection=connection)
        pipeline.run_features(config)
        pipeline.run_export(config)
        assert "type: redis" in (config.events_dir / "live_store.yaml").read_text()
    return config


@pytest.fixture(scope="module")
def server(run):
    serve = run.serve.__class__(**{**run.serve.__dict__, "grpc_port": 0, "http_port": 0, "metrics_port": 0})
    with TritonServer(run.export_dir, run.output_dir / "triton", serve) as running:
        yield running


def _in_process(run, users):
    return recommend_in_process(load_exported_ensemble(run.export_dir), np.asarray(users))


def test_answers_before_any_event_are_those_of_the_sqlite_store(run, server, exported):
    """The same features served from SQLite, one Redis or a Redis Cluster give the same answers."""
    users = load_split(run.splits_dir).test["user_id"].drop_duplicates().to_numpy()[1:6]  # not the next test's
    served = recommend(users.tolist(), server.grpc_url)
    on_sqlite = recommend_in_process(load_exported_ensemble(exported.export_dir), users)
    np.testing.assert_array_equal(served["item_ids"], on_sqlite["item_ids"])
    np.testing.assert_allclose(served["scores"], on_sqlite["scores"], rtol=1e-5)


def test_an_event_shapes_the_next_answer_and_the_history(run, server):
    user = int(load_split(run.splits_dir).test["user_id"].iloc[0])
    before = recommend([user], server.grpc_url)
    watched = int(before["item_ids"][0, 0])
    history_before = served_rows(run.export_dir, [user])["history"][0]

    assert send_events([user], [watched], [NOW], [5.0], server.grpc_url) == 1
    after = recommend([user], server.grpc_url)
    assert watched not in after["item_ids"][0]
    history_after = served_rows(run.export_dir, [user])["history"][0]
    assert history_after[:-1] == history_before[-(len(history_after) - 1) :] and history_after[-1] != 2
    expected = _in_process(run, [user])
    np.testing.assert_array_equal(after["item_ids"], expected["item_ids"])
    np.testing.assert_allclose(after["scores"], expected["scores"], rtol=1e-5)


def test_an_unknown_user_is_answered_personally_after_events(run, server):
    stranger = 10**9
    assert recommend([stranger], server.grpc_url)["is_fallback"].tolist() == [True]
    items = [int(i) for i in recommend([stranger], server.grpc_url)["item_ids"][0, :3]]
    assert send_events([stranger] * 3, items, [NOW - 3, NOW - 2, NOW - 1], None, server.grpc_url) == 3
    after = recommend([stranger], server.grpc_url)
    assert after["is_fallback"].tolist() == [False]
    assert not set(items) & set(after["item_ids"][0].tolist())
    np.testing.assert_array_equal(after["item_ids"], _in_process(run, [stranger])["item_ids"])


@pytest.mark.parametrize(
    "users, items, times, message",
    [
        ([1, 2], [3, 4], [NOW, -5], "row 1 has -5"),
        ([1], [3], [NOW + 10**7], "not over a day ahead"),
    ],
)
def test_a_bad_batch_is_invalid_argument_in_one_line_and_changes_nothing(run, server, users, items, times, message):
    log = EventLog(run.events_dir)
    logged = len(log.read())
    with pytest.raises(InferenceServerException) as refused:
        send_events(users, items, times, None, server.grpc_url)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in refused.value.message() and "\n" not in refused.value.message()
    assert len(log.read()) == logged


def test_text_ids_where_the_run_has_integers_are_refused_by_type(run, server):
    with pytest.raises(InferenceServerException) as refused:
        send_events(["a"], [3], [NOW], None, server.grpc_url)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_concurrent_events_all_land_in_order_and_survive_a_killed_server(run, server):
    user, times = 10**9 + 1, np.random.default_rng(1).permutation(1000) + 1_000_000
    items = load_split(run.splits_dir).train["item_id"].unique()
    item_of = {int(t): int(items[t % len(items)]) for t in times}
    failures = []

    def send(chunk):
        for start in range(0, len(chunk), 25):
            part = chunk[start : start + 25]
            try:
                send_events([user] * len(part), [item_of[int(t)] for t in part], part, None, server.grpc_url)
            except InferenceServerException as error:
                failures.append(error.message())

    threads = [threading.Thread(target=send, args=(chunk,)) for chunk in np.array_split(times, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    (events,) = open_live_store(run.events_dir).items_of([str(user)]).values()
    assert [int(e.item_id) for e in events] == [item_of[t] for t in sorted(times.tolist())]

    os.killpg(server.process.pid, signal.SIGKILL)  # every acknowledged event is in the log already
    server.process.wait()
    logged = EventLog(run.events_dir).read()
    assert sorted(logged[logged["user_id"] == str(user)]["timestamp"]) == sorted(times.tolist())


@pytest.mark.unit
def test_text_ids_go_out_as_sent_whether_bytes_or_str():
    """An answer's text item ids (bytes) can be sent back as events unchanged."""
    from tritonclient.utils import deserialize_bytes_tensor

    from twotower.serving.client import id_input

    request = id_input("item_id", np.array([b"Heat (1995)", "Heat (1995)"], dtype=object))
    assert request.datatype() == "BYTES" and request.shape() == [2, 1]
    assert deserialize_bytes_tensor(request._raw_content).tolist() == [b"Heat (1995)", b"Heat (1995)"]
