"""The retrieval step: FAISS top-k over the catalogue with each user's seen items excluded and a
popularity fallback for unknown users (``RetrieveTopK``), or its multi-vector form for a model
with heads (``RetrieveByHeads``, IntTower).
"""

from __future__ import annotations

import logging
from pathlib import Path

import merlin.dtypes as md
import numpy as np
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from twotower.models.multi_vector import HeadIndex, HeadShape
from twotower.serving.ops.base import ArtifactOperator
from twotower.serving.ops.query_tower import PredictQueryTower
from twotower.store.index import ItemIndex, load_index

log = logging.getLogger(__name__)


class RetrieveTopK(ArtifactOperator):
    """FAISS top-k over the catalogue: dataset item ids and scores, best first.

    With ``seen_items``/``known`` inputs it drops each user's seen items and answers
    unknown users with the most popular items (``is_fallback`` marks those rows).
    """

    artifact_name = "items.faiss"

    def __init__(
        self,
        index_path: Path,
        top_k: int,
        fallback_items: np.ndarray,
        fallback_scores: np.ndarray,
        exclude_seen: bool,
        item_names: np.ndarray | None = None,
        passthrough: Schema | None = None,
    ):
        super().__init__(index_path)
        self.item_names = item_names  # the files' text item id per int id; None: answers carry the int ids
        self.passthrough = passthrough or Schema()  # handed on unchanged (a pre-ranker's query features)
        catalogue_size = self.resource.ntotal
        if top_k > catalogue_size:
            log.warning("top_k=%d exceeds the catalogue of %d items; serving %d", top_k, catalogue_size, catalogue_size)
        self.top_k = min(top_k, catalogue_size)
        self.fallback_items = np.asarray(fallback_items[: self.top_k], dtype=np.int64)
        self.fallback_scores = np.asarray(fallback_scores[: self.top_k], dtype=np.float32)
        self.exclude_seen = exclude_seen

    def _load(self, path: Path):
        import faiss

        # One request's search is tiny: OpenMP threads only add wake-up latency on a busy CPU.
        faiss.omp_set_num_threads(1)
        return ItemIndex(load_index(path))

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return (
            Schema(
                [
                    ColumnSchema(
                        "item_ids", dtype=np.int64 if self.item_names is None else md.string, dims=(None, self.top_k)
                    ),
                    ColumnSchema("scores", dtype=np.float32, dims=(None, self.top_k)),
                    ColumnSchema("is_fallback", dtype=md.boolean),
                ]
            )
            + self.passthrough
        )

    def _search(self, vectors: np.ndarray, seen: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.resource.search(vectors, self.top_k, seen)

    def _seen_lists(self, transformable, n_rows: int) -> list[np.ndarray]:
        if not self.exclude_seen or "seen_items" not in transformable.columns:
            return [np.empty(0, dtype=np.int64)] * n_rows
        column = transformable["seen_items"]
        values, offsets = np.asarray(column.values), np.asarray(column.offsets)
        return [values[offsets[i] : offsets[i + 1]] for i in range(n_rows)]

    def transform(self, col_selector: ColumnSelector, transformable):
        vectors = np.asarray(transformable[PredictQueryTower.output_name].values)
        n_rows = len(vectors)
        known = np.asarray(transformable["known"].values) if "known" in transformable.columns else np.ones(n_rows, bool)
        seen = self._seen_lists(transformable, n_rows)
        item_ids = np.empty((n_rows, self.top_k), dtype=np.int64)
        item_scores = np.empty((n_rows, self.top_k), dtype=np.float32)
        if not known.all():
            item_ids[~known], item_scores[~known] = self.fallback_items, self.fallback_scores
        rows = np.flatnonzero(known)
        if len(rows):
            item_ids[rows], item_scores[rows] = self._search(vectors[rows], [seen[row] for row in rows])
        answer_ids = item_ids if self.item_names is None else self.item_names[item_ids]
        passed = {c: transformable[c] for c in self.passthrough.column_names}
        return TensorTable({"item_ids": answer_ids, "scores": item_scores, "is_fallback": ~known, **passed})


class RetrieveByHeads(RetrieveTopK):
    """``RetrieveTopK`` for a multi-vector model (``model.name=inttower``): the query vector is
    the user's head vectors flattened, the index holds every item head, and each user's union of
    candidates is re-scored by the FE score (``multi_vector.HeadIndex``, ``depth`` rows per head)."""

    def __init__(self, index_path: Path, shape: HeadShape, depth: int, *args, **kwargs):
        self.shape, self.depth = shape, depth  # before the base class loads the index
        super().__init__(index_path, *args, **kwargs)

    def _load(self, path: Path):
        import faiss

        faiss.omp_set_num_threads(1)  # as RetrieveTopK's
        return HeadIndex(load_index(path), self.shape.item_heads)

    def _search(self, vectors: np.ndarray, seen: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.resource.search(self.shape.query(vectors), self.top_k, self.depth, seen)
