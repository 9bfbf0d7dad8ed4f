"""A rollout under load, shared by refresh-items' and retrain's tests: requests driven at a real
Triton server from several threads while a command rolls out a new version, then every answer
checked against the old version's and the new one's, computed in process."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from twotower.config import RecipeConfig, ServeConfig
from twotower.serving.client import OUTPUTS, send_events, user_id_request
from twotower.serving.export import load_exported_ensemble, recommend_in_process
from twotower.serving.triton import TritonServer, recipe_servers
from twotower.store.events import open_live_store

CLIENT_THREADS = 4
TIMEOUT_S = 30


@dataclass
class Answer:
    sent: float  # time.monotonic() when the request left
    item_ids: np.ndarray


@dataclass
class Traffic:
    """Requests for one batch of users driven at a server from several threads until stopped."""

    url: str
    users: np.ndarray
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def drive(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    result = client.infer(
                        "executor_model",
                        [user_id_request(self.users)],
                        client_timeout=TIMEOUT_S,
                        outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                    )
                    self.answers.append(Answer(sent, result.as_numpy("item_ids")))
                except Exception as error:  # noqa: BLE001 - every failure is counted, whatever it is
                    self.failures.append(f"{type(error).__name__}: {error}")


@dataclass
class EventTraffic:
    """Events of one user, sent one a request until stopped, cycling through ``items``."""

    url: str
    user: int
    items: np.ndarray
    acknowledged: list[int] = field(default_factory=list)  # the items of the events that returned OK
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def drive(self) -> None:
        step = 0
        while not self.stop.is_set():
            item = self.items[step % len(self.items)]
            step += 1
            try:
                send_events([self.user], [int(item)], [1_000_000_000 + step], None, self.url, TIMEOUT_S)
                self.acknowledged.append(int(item))
            except Exception as error:  # noqa: BLE001 - every failure is counted, whatever it is
                self.failures.append(f"{type(error).__name__}: {error}")
            time.sleep(0.25)


@dataclass
class Rollout:
    traffic: Traffic
    events: EventTraffic
    command: subprocess.CompletedProcess
    rolled_out: float  # time.monotonic() when the command returned
    server_url: str
    version_states: dict[str, str]  # the server's model versions afterwards, and their states


def roll_out_under_load(
    export_dir: Path,
    log_dir: Path,
    users: np.ndarray,
    command: list[str],
    timeout_s: float,
    event_user: int,
    event_items: np.ndarray,
) -> Rollout:
    """Serve ``export_dir`` on a new server, drive requests for ``users`` at it and events of
    ``event_user`` (``event_items`` in turn), run ``command`` (which rolls out a new version to that
    server), keep driving for a few seconds more."""
    server = TritonServer(export_dir, log_dir, ServeConfig(grpc_port=0, http_port=0, metrics_port=0, top_k=5))
    server.start()
    try:
        assert recipe_servers(export_dir) == [server.grpc_url]  # what the command will roll out to
        traffic = Traffic(server.grpc_url, users)
        events = EventTraffic(server.grpc_url, event_user, event_items)
        threads = [threading.Thread(target=traffic.drive) for _ in range(CLIENT_THREADS)]
        threads.append(threading.Thread(target=events.drive))
        for thread in threads:
            thread.start()
        time.sleep(2)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        rolled_out = time.monotonic()
        time.sleep(3)
        traffic.stop.set()
        events.stop.set()
        for thread in threads:
            thread.join()
        assert server.process.poll() is None  # the same server process throughout
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            index = client.get_model_repository_index(as_json=True)["models"]
            states = {m["version"]: m["state"] for m in index if m["name"] == "executor_model"}
    finally:
        server.stop()
    return Rollout(traffic, events, completed, rolled_out, server.grpc_url, states)


def check_answers(rollout: Rollout, old_answer: np.ndarray, new_answer: np.ndarray, version: int) -> str:
    """No failed request, every answer wholly the old version's or the new one's, every request
    sent after the rollout answered by the new one, which alone is loaded; a summary line."""
    traffic = rollout.traffic
    assert rollout.command.returncode == 0, rollout.command.stderr[-3000:]
    assert traffic.failures == [], f"{len(traffic.failures)} failed requests, e.g. {traffic.failures[:3]}"
    is_old = [np.array_equal(a.item_ids, old_answer) for a in traffic.answers]
    is_new = [np.array_equal(a.item_ids, new_answer) for a in traffic.answers]
    mixed = [a.item_ids for a, o, n in zip(traffic.answers, is_old, is_new) if not (o or n)]
    assert mixed == [], f"{len(mixed)} answers are neither the old version's nor the new one's, e.g. {mixed[:2]}"
    after = [n for a, n in zip(traffic.answers, is_new) if a.sent > rollout.rolled_out]
    assert sum(is_old) > 0 and len(after) > 0 and all(after)
    assert rollout.version_states[str(version)] == "READY" and rollout.version_states.get(str(version - 1)) != "READY"
    return (
        f"rollout under load: {len(traffic.answers)} requests, {sum(is_old)} old, {sum(is_new)} new, "
        f"{len(after)} sent after the rollout, 0 failed"
    )


def check_events_kept(rollout: Rollout, config: RecipeConfig) -> str:
    """Every event acknowledged during the rollout is in the live store, in the order sent, and
    the new version answers that user from them: personally, none of the items again."""
    events = rollout.events
    assert events.failures == [], f"{len(events.failures)} failed event requests, e.g. {events.failures[:3]}"
    assert len(events.acknowledged) >= 10
    (stored,) = open_live_store(config.events_dir).items_of([str(events.user)]).values()
    assert [int(event.item_id) for event in stored] == events.acknowledged
    answer = recommend_in_process(load_exported_ensemble(config.export_dir), np.array([events.user]))
    assert not answer["is_fallback"].any() and not set(answer["item_ids"][0].tolist()) & set(events.acknowledged)
    return f"events during the rollout: {len(events.acknowledged)} acknowledged, all kept and served"


def served_rows(export_dir: Path, user_ids: np.ndarray) -> dict[str, list]:
    """The encoded ``history`` and the ``seen_items`` the exported graph reads for ``user_ids`` now
    (Feast rows with the live events folded in), one list per user."""
    from merlin.dag import postorder_iter_nodes
    from merlin.table import TensorTable

    from twotower.serving.ops.features import OnlineQueryFeatures

    ensemble = load_exported_ensemble(export_dir)
    (lookup,) = [
        node.op for node in postorder_iter_nodes(ensemble.graph.output_node) if isinstance(node.op, OnlineQueryFeatures)
    ]
    rows = lookup.transform(None, TensorTable({"user_id": np.asarray(user_ids)}))
    return {
        name: [part.tolist() for part in np.split(rows[name].values, rows[name].offsets[1:-1])]
        for name in ("history", "seen_items")
    }
