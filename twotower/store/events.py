"""Live events: what users did after the run's features were built, visible to the next request.

A run's ``events/`` folder holds two things, written in this order for every accepted batch:

- ``log.jsonl``, the durable event log: one JSON line per event, appended under an exclusive
  lock and fsynced before the batch is acknowledged, so a killed server loses no acknowledged
  event. The log numbers the events (``sequence``, from 1, in arrival order); the data stage and
  ``twotower retrain`` read it as interactions beside the data set's own;
- the live store, where every served version reads each user's events: a SQLite file
  (``live.db``) beside the log, or the Redis server of the Feast online store, as
  ``live_store.yaml`` says (the features stage writes it from ``features.online_store``).

The live store is append-only: each event keeps its log sequence number and a batch becomes
visible in one transaction (appended while the log's lock is held, so in sequence order), so
concurrent writers never lose each other's events and a reader never sees half a batch. Events
the Feast rows of a version already hold (the data stage took them in) are skipped by that
version's fold, by sequence. It keeps ids as the request spelled them (text), not encoded: each served version
maps them with its own vocabulary, so a rollout needs no rewrite of the events.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

from twotower.config import FeaturesConfig
from twotower.store.atomic import atomic_file

LOG_FILE = "log.jsonl"


SETTINGS_FILE = "live_store.yaml"


SQLITE_FILE = "live.db"


LOG_COLUMNS = ("sequence", "user_id", "item_id", "timestamp", "label")


class LiveEvent(NamedTuple):
    """One event as the live store returns it."""

    sequence: int
    item_id: str
    label: float | None


@dataclass(frozen=True)
class EventBatch:
    """Validated events: ids as text (how the live store keys them), times in integer seconds,
    labels (rating or label) or None where the client sent none."""

    user_ids: list[str]
    item_ids: list[str]
    timestamps: list[int]
    labels: list[float | None]

    def __len__(self) -> int:
        return len(self.user_ids)


def deploy_live_store(events_dir: Path, features: FeaturesConfig) -> None:
    """Write ``live_store.yaml`` for ``features.online_store`` (kept when it already says the same,
    so the events recorded so far stay where servers read them)."""
    events_dir.mkdir(parents=True, exist_ok=True)
    if features.online_store in ("redis", "redis_cluster"):
        # Keys of this run only, whatever else shares the Redis server.
        namespace = hashlib.sha256(str(events_dir.resolve()).encode()).hexdigest()[:12]
        settings = {"type": "redis", "connection_string": features.redis_connection, "namespace": namespace}
        if features.online_store == "redis_cluster":
            settings["cluster"] = True
    else:
        settings = {"type": "sqlite", "path": SQLITE_FILE}
    path = events_dir / SETTINGS_FILE
    if path.exists() and yaml.safe_load(path.read_text()) == settings:
        return
    with atomic_file(path) as staging:
        staging.write_text(yaml.safe_dump(settings, sort_keys=False))


def open_live_store(events_dir: Path) -> SqliteLiveStore | RedisLiveStore:
    path = Path(events_dir) / SETTINGS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no live event store at {Path(events_dir).resolve()}: run the 'features' stage")
    settings = yaml.safe_load(path.read_text())
    if settings["type"] == "redis":
        return RedisLiveStore(settings["connection_string"], settings["namespace"], settings.get("cluster", False))
    return SqliteLiveStore(Path(events_dir) / settings["path"])


class SqliteLiveStore:
    """Events in a SQLite file (write-ahead log: readers never wait for a writer)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._connection: sqlite3.Connection | None = None

    @property
    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            # isolation_level=None: transactions are the explicit BEGIN/COMMIT below. A server's
            # executor instances and the event model each hold their own connection.
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS events (sequence INTEGER PRIMARY KEY, "
                "user_id TEXT NOT NULL, item_id TEXT NOT NULL, timestamp INTEGER NOT NULL, label REAL)"
            )
            connection.execute("CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp, sequence)")
            self._connection = connection
        return self._connection

    def append(self, batch: EventBatch, first_sequence: int) -> None:
        rows = list(
            zip(_sequences(batch, first_sequence), batch.user_ids, batch.item_ids, batch.timestamps, batch.labels)
        )
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                "INSERT INTO events (sequence, user_id, item_id, timestamp, label) VALUES (?, ?, ?, ?, ?)", rows
            )
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def items_of(self, user_ids: list[str]) -> dict[str, list[LiveEvent]]:
        """Each user's events, oldest first (by time, then by arrival); users without events absent."""
        found: dict[str, list[LiveEvent]] = {}
        unique = list(dict.fromkeys(user_ids))
        query = (
            f"SELECT user_id, sequence, item_id, label FROM events WHERE user_id IN ({','.join('?' * len(unique))}) "
            "ORDER BY user_id, timestamp, sequence"
        )
        for user_id, *event in self.connection.execute(query, unique):
            found.setdefault(user_id, []).append(LiveEvent(*event))
        return found

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class RedisLiveStore:
    """Events in Redis: a sorted set per user, scored by time; members lead with the event's
    sequence number, so events of the same second keep their arrival order (the rest of a member is
    the item and label as JSON).

    On a Redis Cluster (``cluster``) the users' keys spread over the nodes' slots, where a MULTI/EXEC
    transaction cannot span them: a batch is written by one pipeline per node, so a request read
    while it is written may see part of it (the event log, written first, holds it whole).
    """

    def __init__(self, connection_string: str, namespace: str, cluster: bool = False):
        from feast.infra.online_stores.redis import RedisOnlineStore

        self.nodes, self.options = RedisOnlineStore._parse_connection_string(connection_string)
        self.namespace = namespace
        self.cluster = cluster
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import redis
            from redis.cluster import ClusterNode, RedisCluster

            timeouts = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
            if self.cluster:
                nodes = [ClusterNode(node["host"], int(node["port"])) for node in self.nodes]
                self._client = RedisCluster(startup_nodes=nodes, **self.options, **timeouts)
            else:
                node = self.nodes[0]
                self._client = redis.Redis(host=node["host"], port=int(node["port"]), **self.options, **timeouts)
        return self._client

    def _key(self, user_id: str) -> str:
        return f"twotower:events:{self.namespace}:{user_id}"

    def append(self, batch: EventBatch, first_sequence: int) -> None:
        # MULTI/EXEC: the batch appears at once (not on a cluster, see the class)
        pipeline = self.client.pipeline() if self.cluster else self.client.pipeline(transaction=True)
        rows = zip(_sequences(batch, first_sequence), batch.user_ids, batch.item_ids, batch.timestamps, batch.labels)
        for sequence, user_id, item_id, timestamp, label in rows:
            pipeline.zadd(self._key(user_id), {f"{sequence:015d}\t{json.dumps([item_id, label])}": timestamp})
        pipeline.execute()

    def items_of(self, user_ids: list[str]) -> dict[str, list[LiveEvent]]:
        unique = list(dict.fromkeys(user_ids))
        pipeline = self.client.pipeline(transaction=False)
        for user_id in unique:
            pipeline.zrange(self._key(user_id), 0, -1)
        found = {}
        for user_id, members in zip(unique, pipeline.execute()):
            if members:
                found[user_id] = [_redis_event(member.decode()) for member in members]
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _sequences(batch: EventBatch, first: int) -> range:
    return range(first, first + len(batch))


def _redis_event(member: str) -> LiveEvent:
    sequence, rest = member.split("\t", 1)
    return LiveEvent(int(sequence), *json.loads(rest))


class EventLog:
    """``log.jsonl``: every accepted event, numbered, appended and fsynced before the batch is acknowledged."""

    def __init__(self, events_dir: Path):
        self.path = Path(events_dir) / LOG_FILE

    def append(self, batch: EventBatch, live_store: SqliteLiveStore | RedisLiveStore | None = None) -> None:
        """Number ``batch`` after the last logged event, log it durably, then (``live_store``) make
        it visible; all under the log's lock, so sequence order is arrival order everywhere."""
        descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # one writer at a time: lines never interleave
            first = _last_sequence(descriptor) + 1
            lines = "".join(
                json.dumps(dict(zip(LOG_COLUMNS, row))) + "\n"
                for row in zip(_sequences(batch, first), batch.user_ids, batch.item_ids, batch.timestamps, batch.labels)
            )
            os.write(descriptor, lines.encode())
            os.fsync(descriptor)
            if live_store is not None:
                live_store.append(batch, first)
        finally:
            os.close(descriptor)

    def read(self) -> pd.DataFrame:
        """Every logged event (ids as text); empty when nothing was logged."""
        if not self.path.exists():
            return pd.DataFrame({name: pd.Series(dtype=object) for name in LOG_COLUMNS})
        with open(self.path) as log:
            rows = [json.loads(line) for line in log if line.endswith("\n")]  # a torn last line was never acknowledged
        return pd.DataFrame(rows, columns=list(LOG_COLUMNS))


def _last_sequence(descriptor: int) -> int:
    """The sequence of the log's last whole line (0 for an empty log). A torn last line, from a
    writer killed mid-write, was never acknowledged: it is cut off, so the next line starts clean."""
    size = os.fstat(descriptor).st_size
    tail, start = b"", size
    while start > 0 and tail.count(b"\n") < 2:  # enough to hold the last whole line
        start = max(0, start - 4096)
        tail = os.pread(descriptor, size - start, start)
    whole = tail[: tail.rfind(b"\n") + 1]
    if len(whole) < len(tail):
        os.ftruncate(descriptor, start + len(whole))
    last_line = whole.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return json.loads(last_line)["sequence"] if last_line else 0


def record_events(events_dir: Path, batch: EventBatch, live_store: SqliteLiveStore | RedisLiveStore) -> None:
    """Log ``batch`` durably, then make it visible in the live store."""
    EventLog(events_dir).append(batch, live_store)


def as_text_ids(values: np.ndarray) -> list[str]:
    """Ids as text, as the live store keys them and text-id runs name users: text as sent (bytes, as
    Triton delivers it, decoded; str as Python callers pass it), integers in decimal."""
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values.reshape(-1).tolist()]
