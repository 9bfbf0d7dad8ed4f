"""The query tower step: the saved tower's serving signature run in process
(``PredictQueryTower``), so no TensorFlow backend is needed in Triton.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

from twotower.serving.ops.base import ArtifactOperator
from twotower.store.artifacts import FREEZE_MAX_BYTES, ServingSignature, call_signature


class PredictQueryTower(ArtifactOperator):
    """The query tower's SavedModel, called through its serving signature in process.

    ``passthrough`` columns are handed on unchanged, so a later step can use them
    without the graph running the upstream lookup twice.
    """

    artifact_name = "query_tower"
    output_name = "query_embedding"

    def __init__(self, source: Path, passthrough: Schema | None = None):
        super().__init__(source)
        self.passthrough = passthrough or Schema()

    def _load(self, path: Path):
        return ServingSignature(path, FREEZE_MAX_BYTES)

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None
    ) -> Schema:
        return (
            Schema([ColumnSchema(self.output_name, dtype=np.float32, dims=(None, self.resource.output_dim))])
            + self.passthrough
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        vectors = call_signature(self.resource, transformable)
        return TensorTable({self.output_name: vectors, **{c: transformable[c] for c in self.passthrough.column_names}})
