"""Stage 6: the merlin-systems serving graph and its Triton export.

user_id -> Feast online user features -> saved NVTabular user workflow ->
query tower (SavedModel) -> FAISS top-k -> dataset item ids and scores.

Every operator runs inside Merlin's python-backend executor model, so the
export loads on a Triton server without the TensorFlow backend (the one PyPI
ships). Operators copy what they need into the executor's artifact folder and
keep no absolute path in the pickled graph, so the exported repository can move.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag import Ensemble
from merlin.table import TensorTable

from twotower.data import USER_FEATURES
from twotower.index import load_index, search

log = logging.getLogger(__name__)

FEATURE_REPO_ENV = "TWOTOWER_FEATURE_REPO"  # overrides where the executor finds Feast


def _as_frame(transformable) -> pd.DataFrame:
    return transformable.to_df() if isinstance(transformable, TensorTable) else transformable


class _ArtifactOperator(BaseOperator):
    """An operator backed by one file or folder, copied into the export on save.

    In process it reads ``source``; after export it reads the copy named
    ``artifact_name`` inside the executor's artifact folder.
    """

    artifact_name = ""

    def __init__(self, source: Path):
        super().__init__()
        self.source = str(source)
        self._resource = None

    def _load(self, path: Path):
        raise NotImplementedError

    @property
    def resource(self):
        if self._resource is None:
            self._resource = self._load(Path(self.source))
        return self._resource

    def save_artifacts(self, artifact_path: str) -> None:
        target = Path(artifact_path) / self.artifact_name
        if Path(self.source).is_dir():
            shutil.copytree(self.source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(self.source, target)

    def load_artifacts(self, artifact_path: str) -> None:
        # Merlin's Graph calls this with "" while building, meaning "load in place".
        if artifact_path:
            self.source = str(Path(artifact_path) / self.artifact_name)
        self._resource = self._load(Path(self.source))

    def __getstate__(self) -> dict:
        # The export folder supplies the path again on load.
        return {**self.__dict__, "source": None, "_resource": None}


def load_serving_signature(path: Path):
    """A saved tower's ``serving_default`` signature: plain TensorFlow, no Keras or Merlin
    objects, so the executor does not import merlin.models to run it."""
    import tensorflow as tf

    return tf.saved_model.load(str(path)).signatures["serving_default"]


def call_signature(signature, features: pd.DataFrame) -> np.ndarray:
    """Run a serving signature on encoded scalar feature columns, feeding only its inputs
    (calling it with extra columns fails to match a concrete function)."""
    import tensorflow as tf

    _, input_specs = signature.structured_input_signature
    inputs = {name: tf.constant(features[name].to_numpy(), dtype=spec.dtype) for name, spec in input_specs.items()}
    (vectors,) = signature(**inputs).values()
    return vectors.numpy()


class UserFeatureLookup(BaseOperator):
    """Online user features from Feast for a batch of dataset user ids.

    Rejects an empty batch and ids the feature store does not know, naming them.
    """

    def __init__(self, feature_repo: Path, feature_schema: Schema):
        super().__init__()
        self.feature_repo = str(Path(feature_repo).resolve())
        self.feature_schema = feature_schema
        self._repo_from_artifacts: str | None = None
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from feast import FeatureStore

            self._store = FeatureStore(repo_path=self.feature_repo)
        return self._store

    def save_artifacts(self, artifact_path: str) -> None:
        # Kept relative so a moved project (model repository and outputs together) still resolves.
        self._repo_from_artifacts = os.path.relpath(self.feature_repo, artifact_path)

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
        self._store = None
        _ = self.store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "feature_repo": None, "_store": None}

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return self.feature_schema

    def transform(self, col_selector: ColumnSelector, transformable):
        from twotower.feature_store import online_user_features

        user_ids = np.asarray(_as_frame(transformable)["user_id"]).reshape(-1)
        if len(user_ids) == 0:
            raise ValueError("empty request: 'user_id' has no rows")
        features = online_user_features(self.store, user_ids.tolist())
        unknown = features[USER_FEATURES].isna().any(axis=1).to_numpy()
        if unknown.any():
            raise ValueError(f"unknown user_id(s) not in the feature store: {user_ids[unknown][:20].tolist()}")
        return features.astype({c.name: c.dtype.to_numpy for c in self.feature_schema})


class EncodeUserFeatures(_ArtifactOperator):
    """The saved NVTabular user workflow, run in process (the same one training used)."""

    artifact_name = "user_workflow"

    def _load(self, path: Path):
        from twotower.workflow import load_workflow

        return load_workflow(path.parent, path.name)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return self.resource.output_schema

    def transform(self, col_selector: ColumnSelector, transformable):
        return self.resource._transform_df(_as_frame(transformable))


class PredictQueryTower(_ArtifactOperator):
    """The query tower's SavedModel, called through its serving signature in process."""

    artifact_name = "query_tower"
    output_name = "query_embedding"

    def _load(self, path: Path):
        return load_serving_signature(path)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        (output_spec,) = self.resource.structured_outputs.values()
        return Schema([ColumnSchema(self.output_name, dtype=np.float32, dims=(None, output_spec.shape[-1]))])

    def transform(self, col_selector: ColumnSelector, transformable):
        return TensorTable({self.output_name: call_signature(self.resource, _as_frame(transformable))})


class RetrieveTopK(_ArtifactOperator):
    """FAISS top-k over the item catalogue; outputs dataset item ids and scores, best first."""

    artifact_name = "items.faiss"

    def __init__(self, index_path: Path, top_k: int):
        super().__init__(index_path)
        catalogue_size = self.resource.ntotal
        if top_k > catalogue_size:
            log.warning("top_k=%d exceeds the catalogue of %d items; serving %d", top_k, catalogue_size, catalogue_size)
        self.top_k = min(top_k, catalogue_size)

    def _load(self, path: Path):
        return load_index(path)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return Schema(
            [
                ColumnSchema("item_ids", dtype=np.int64, dims=(None, self.top_k)),
                ColumnSchema("scores", dtype=np.float32, dims=(None, self.top_k)),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        vectors = np.asarray(transformable[PredictQueryTower.output_name].values)
        ids, scores = search(self.resource, vectors, self.top_k)
        return TensorTable({"item_ids": ids.astype(np.int64), "scores": scores.astype(np.float32)})


def build_ensemble(feature_repo: Path, user_workflow_dir: Path, query_tower_dir: Path, index_path: Path, top_k: int) -> Ensemble:
    encode = EncodeUserFeatures(user_workflow_dir)
    graph = (
        ["user_id"]
        >> UserFeatureLookup(feature_repo, encode.resource.input_schema)
        >> encode
        >> PredictQueryTower(query_tower_dir)
        >> RetrieveTopK(index_path, top_k)
    )
    return Ensemble(graph, Schema([ColumnSchema("user_id", dtype=np.int64)]))


def export_ensemble(ensemble: Ensemble, export_dir: Path) -> Path:
    """Write the Triton model repository (replacing an older export)."""
    if export_dir.exists():
        for child in export_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
    export_dir.mkdir(parents=True, exist_ok=True)
    ensemble.export(str(export_dir))
    return export_dir


def load_exported_ensemble(export_dir: Path, model_name: str = "executor_model") -> Ensemble:
    """The exported graph loaded as the Triton executor loads it, to run in process."""
    from merlin.dag import postorder_iter_nodes

    artifact_dir = export_dir / model_name / "1" / "ensemble"
    ensemble = Ensemble.load(str(artifact_dir))
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(artifact_dir))
    return ensemble


def recommend_in_process(ensemble: Ensemble, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime

    output = ensemble.transform(TensorTable({"user_id": np.asarray(user_ids, dtype=np.int64)}), runtime=TritonExecutorRuntime())
    return np.asarray(output["item_ids"].values), np.asarray(output["scores"].values)
