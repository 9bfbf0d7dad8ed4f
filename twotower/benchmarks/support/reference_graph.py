"""The reference serving graph, as the public NVIDIA example builds it, which only the
serving benchmark uses (``twotower/benchmarks/serving.py``) to measure the recipe's against:

    user_id -> UserFeatureLookup (Feast SDK, raw features) -> EncodeUserFeatures
               (NVTabular per request) -> PredictQueryTower -> RetrieveTopK (IVF32)

It shares the query tower and retrieval operators with the recipe's graph (``twotower/serving/ops/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag import Ensemble
from merlin.table import TensorTable

from twotower.serving.errors import RequestError
from twotower.serving.ops.base import ArtifactOperator, as_frame, request_user_ids
from twotower.serving.ops.features import FeatureRepoOperator
from twotower.serving.ops.query_tower import PredictQueryTower
from twotower.serving.ops.retrieval import RetrieveTopK


class UserFeatureLookup(FeatureRepoOperator):
    """Reference graph: raw online user features through the Feast SDK.

    Rejects an empty batch and ids the feature store does not know, naming them.
    """

    def __init__(self, feature_repo: Path, feature_schema: Schema, max_users: int):
        super().__init__(feature_repo)
        self.feature_schema = feature_schema
        self.max_users = max_users

    def _connect(self, repo: Path):
        from feast import FeatureStore

        return FeatureStore(repo_path=str(repo))

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return self.feature_schema

    def transform(self, col_selector: ColumnSelector, transformable):
        from twotower.store.features import online_user_features

        user_ids = request_user_ids(transformable, self.max_users)
        columns = [c for c in self.feature_schema.column_names if c != "user_id"]
        features = online_user_features(self.client, user_ids.tolist(), columns)
        unknown = features[columns].isna().any(axis=1).to_numpy()
        if unknown.any():
            raise RequestError(f"unknown user_id(s) not in the feature store: {user_ids[unknown][:20].tolist()}")
        scalars = {c.name: c.dtype.to_numpy for c in self.feature_schema if not c.is_list}
        return features.astype(scalars)


class EncodeUserFeatures(ArtifactOperator):
    """Reference graph: the saved NVTabular user workflow, run per request."""

    artifact_name = "user_workflow"

    def _load(self, path: Path):
        from twotower.stages.workflow import load_workflow

        return load_workflow(path.parent, path.name)

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return self.resource.output_schema

    def transform(self, col_selector: ColumnSelector, transformable):
        return TensorTable.from_df(self.resource._transform_df(as_frame(transformable)))


def build_reference_ensemble(
    feature_repo: Path, user_workflow_dir: Path, query_tower_dir: Path, index_path: Path, top_k: int, max_users: int
) -> Ensemble:
    """The public NVIDIA example's graph: SDK lookup, per-request NVTabular, IVF index."""
    encode = EncodeUserFeatures(user_workflow_dir)
    empty = (np.empty(0, np.int64), np.empty(0, np.float32))
    graph = (
        ["user_id"]
        >> UserFeatureLookup(feature_repo, encode.resource.input_schema, max_users)
        >> encode
        >> PredictQueryTower(query_tower_dir)
        >> RetrieveTopK(index_path, top_k, *empty, exclude_seen=False)
    )
    return Ensemble(graph, Schema([ColumnSchema("user_id", dtype=np.int64)]))
