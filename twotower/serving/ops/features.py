"""The graph's first step: the user's encoded query features and seen items from the run's
Feast online store (``OnlineQueryFeatures``), through the operator that reads a Feast
repository and, once exported, the version's own copy of it (``FeatureRepoOperator``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import merlin.dtypes as md
import numpy as np
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from twotower.serving.errors import ServiceUnavailable
from twotower.serving.events import EVENTS_DIR_ENV, events_dir_of
from twotower.serving.ops.base import ragged_column, request_user_ids
from twotower.store.events import as_text_ids, open_live_store

FEATURE_REPO_ENV = "TWOTOWER_FEATURE_REPO"  # overrides where the executor finds Feast


SERVED_FEATURE_REPO = "feature_repo"  # each exported version's copy of the run's Feast repository


UNKNOWN_CODE = -1  # never a user id of the recipe (they are the files' integers or 1..N)


T = TypeVar("T")


def read_online(read: Callable[[], T]) -> T:
    """``read()``, a read of the online store (Feast's or the live events'); a store that cannot be
    reached is ServiceUnavailable (a one-line UNAVAILABLE to the client), not an internal fault."""
    import redis.exceptions

    try:
        return read()
    except (
        ConnectionError,
        TimeoutError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ClusterDownError,  # a Redis Cluster missing a node refuses every key after a while
    ) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ServiceUnavailable(f"online feature store unavailable: {reason}") from error


class FeatureRepoOperator(BaseOperator):
    """An operator that reads the run's Feast repository.

    The export copies the repository into the version it writes (``feature_store.served_copy``,
    ``<model>/<version>/feature_repo``), and the version reads its copy: a retrain or refresh
    that changes the run's rows changes what is served only with the version built on them.
    The TWOTOWER_FEATURE_REPO environment variable names another repository instead (every
    version then reads that one).
    """

    def __init__(self, feature_repo: Path):
        super().__init__()
        self.feature_repo = str(Path(feature_repo).resolve())
        self._repo_from_artifacts: str | None = None
        self._client = None

    def _connect(self, repo: Path):
        raise NotImplementedError

    @property
    def client(self):
        if self._client is None:
            self._client = self._connect(Path(self.feature_repo))
        return self._client

    def save_artifacts(self, artifact_path: str) -> None:
        from twotower.store.features import served_copy

        # the version's own copy, beside its ensemble/ (the first operator of the graph makes it)
        served = Path(artifact_path).parent / SERVED_FEATURE_REPO
        if not served.exists():
            served_copy(Path(self.feature_repo), served)
        self._repo_from_artifacts = os.path.relpath(served, artifact_path)

    def load_artifacts(self, artifact_path: str) -> None:
        override = os.environ.get(FEATURE_REPO_ENV)
        if override:
            repo = Path(override)
        elif artifact_path:
            repo = Path(artifact_path) / self._repo_from_artifacts
        else:  # while building the graph in process
            repo = Path(self.feature_repo)
        if not (repo / "feature_store.yaml").exists():
            raise FileNotFoundError(f"no Feast repository at {repo.resolve()}; set {FEATURE_REPO_ENV}")
        self.feature_repo = str(repo.resolve())
        self._client = self._connect(repo)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "feature_repo": None, "_client": None}


class OnlineQueryFeatures(FeatureRepoOperator):
    """Encoded query features and seen items for a batch of dataset user ids.

    Unknown users get pad codes, no seen items and ``known = False``: the
    retrieval step answers them with the fallback list.

    On connecting (at load) it refuses an online store materialized from another
    workflow than ``workflow_fingerprint``, the one the query tower was trained on:
    its codes would mean other values.
    """

    def __init__(
        self,
        feature_repo: Path,
        events_dir: Path,
        model_inputs: Schema,
        max_users: int,
        workflow_fingerprint: str,
        user_codes: dict[str, int] | None = None,
        item_codes: dict[str, int] | None = None,
    ):
        super().__init__(feature_repo)
        self.events_dir = str(Path(events_dir).resolve())
        self._events_from_artifacts: str | None = None
        self.model_inputs = model_inputs
        self.max_users = max_users
        self.workflow_fingerprint = workflow_fingerprint
        self.user_codes = user_codes  # text user ids -> the recipe's int ids; None: requests carry the int ids
        self.item_codes = item_codes  # the same for item ids (live events name items as clients do)

    def save_artifacts(self, artifact_path: str) -> None:
        super().save_artifacts(artifact_path)
        # Every version reads the run's one events folder, named relative to the version.
        self._events_from_artifacts = os.path.relpath(self.events_dir, artifact_path)

    def load_artifacts(self, artifact_path: str) -> None:
        if artifact_path or os.environ.get(EVENTS_DIR_ENV):  # else building in process: the run's folder
            self.events_dir = str(events_dir_of(Path(artifact_path), self._events_from_artifacts))
        super().load_artifacts(artifact_path)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "events_dir": None}

    def _connect(self, repo: Path):
        from twotower.serving.ops.live import LiveRows
        from twotower.store.features import QUERY_VIEW, USER_VIEW, OnlineReader, check_materialized_from

        # One store for both views: the check opens its online-store connection and every
        # request reads through it, so requests read the store that was checked (a SQLite file
        # replaced by a later 'features' run is only picked up when the model reloads).
        query = OnlineReader(repo, QUERY_VIEW)
        check_materialized_from(query.store, self.workflow_fingerprint)
        live = LiveRows(repo, open_live_store(Path(self.events_dir)), self.item_codes)
        return query, OnlineReader(query.store, USER_VIEW, features=("seen_items",)), live

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return self.model_inputs + Schema(
            [
                ColumnSchema("seen_items", dtype=np.int64, dims=(None, None)),
                ColumnSchema("known", dtype=md.boolean),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        from twotower.store.features import ENCODED_PREFIX

        user_ids = request_user_ids(transformable, self.max_users)
        keys = as_text_ids(user_ids)  # the request's ids as text: the live events' keys
        if self.user_codes is not None:  # an id the data never had is an unknown user, like an unknown int id
            user_ids = np.array([self.user_codes.get(key, UNKNOWN_CODE) for key in keys], dtype=np.int64)
        query_reader, seen_reader, live = self.client
        encoded = read_online(lambda: query_reader.read(user_ids))
        seen = read_online(lambda: seen_reader.read(user_ids))
        read_online(lambda: live.fold(keys, encoded, seen))  # events since the features were built
        known = np.array([row is not None for row in encoded])
        columns = {}
        for column in self.model_inputs:
            values = [row[ENCODED_PREFIX + column.name] if row else ([] if column.is_list else 0) for row in encoded]
            columns[column.name] = (
                ragged_column(values) if column.is_list else np.asarray(values, dtype=column.dtype.to_numpy)
            )
        columns["seen_items"] = ragged_column([row["seen_items"] if row else [] for row in seen])
        columns["known"] = known
        return TensorTable(columns)
