"""The cascade's optional second step: a pre-ranker's saved pair scorer re-scores the retrieved
candidates and keeps the best ``top_k`` (``PrerankCandidates``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import merlin.dtypes as md
import numpy as np
import pandas as pd
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from twotower.serving.ops.base import ArtifactOperator
from twotower.store.artifacts import FREEZE_MAX_BYTES, ServingSignature, call_signature, load_item_vectors


class PrerankCandidates(ArtifactOperator):
    """The cascade's second stage: a pre-ranker (another run's model, ``serve.prerank_model``)
    scores the retrieved candidates and keeps the best ``top_k``.

    Its query tower runs on the user's features from the same Feast lookup; the candidates' item
    vectors were computed by its item tower at training (an item tower reads item features only,
    so they are what it would compute from the store's item rows). Its saved pair scorer
    (``RetrievalModel.save_pair_scorer``) scores every (user, candidate) pair of the request in one
    call: the dot product, IntTower's FE score or DCN-v2's cross network, whichever it is. Rows
    answered by the popularity fallback pass through unchanged; seen items were excluded by
    retrieval. Only the pre-ranker's query tower, item vectors and pair scorer are copied into the
    export.
    """

    artifact_name = "prerank"
    parts = ("query_tower", "item_vectors.npz", "pair_scorer")  # of the pre-ranker run's model folder

    def __init__(self, model_dir: Path, top_k: int, item_names: np.ndarray | None = None):
        super().__init__(model_dir)
        self.top_k, self.item_names = top_k, item_names

    def _load(self, path: Path):

        item_ids, vectors = load_item_vectors(path / "item_vectors.npz")
        return (
            ServingSignature(path / "query_tower", FREEZE_MAX_BYTES),
            pd.Index(item_ids),
            vectors,
            ServingSignature(path / "pair_scorer", FREEZE_MAX_BYTES),
        )

    def save_artifacts(self, artifact_path: str) -> None:
        target = Path(artifact_path) / self.artifact_name
        target.mkdir(parents=True, exist_ok=True)
        for part in self.parts:
            source = Path(self.source) / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target / part)

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return Schema(
            [
                ColumnSchema(
                    "item_ids", dtype=np.int64 if self.item_names is None else md.string, dims=(None, self.top_k)
                ),
                ColumnSchema("scores", dtype=np.float32, dims=(None, self.top_k)),
                ColumnSchema("is_fallback", dtype=md.boolean),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        query_signature, catalogue, item_vectors, pair_scorer = self.resource
        candidates = np.asarray(transformable["item_ids"].values)
        retrieval_scores = np.asarray(transformable["scores"].values)
        fallback = np.asarray(transformable["is_fallback"].values)
        item_ids = candidates[:, : self.top_k].copy()  # fallback rows: the popularity list as it came
        item_scores = retrieval_scores[:, : self.top_k].astype(np.float32)
        rows = np.flatnonzero(~fallback)
        if len(rows):
            positions = catalogue.get_indexer(candidates[rows].reshape(-1)).reshape(len(rows), -1)
            if (positions < 0).any():  # the export checks the catalogues match; a mismatch here is a fault
                raise RuntimeError(
                    f"item {candidates[rows][positions < 0][0]} retrieved but not in the pre-ranker's catalogue"
                )
            query_vectors = call_signature(query_signature, transformable)[rows]
            pairs = {
                "query": np.repeat(query_vectors, positions.shape[1], axis=0),
                "items": item_vectors[positions.reshape(-1)],
            }
            scores = pair_scorer(**pairs).reshape(positions.shape)
            best = np.argsort(-scores, axis=1, kind="stable")[:, : self.top_k]
            item_ids[rows] = np.take_along_axis(candidates[rows], best, axis=1)
            item_scores[rows] = np.take_along_axis(scores, best, axis=1)
        answer_ids = item_ids if self.item_names is None else self.item_names[item_ids]
        return TensorTable({"item_ids": answer_ids, "scores": item_scores, "is_fallback": fallback})
