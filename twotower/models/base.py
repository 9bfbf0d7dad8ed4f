"""The interface every model of the family implements, and the tower parts they share.

A builder turns the training schema and statistics into a ``RetrievalModel``: a compiled
merlin-models retrieval model whose ``query_encoder`` and ``candidate_encoder`` are the two
towers. The rest of the recipe calls ``query_vectors``, ``item_vectors`` and the tower
save/load below and never asks which model it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import merlin.io
import merlin.models.tf as mm
import numpy as np
import pandas as pd
import tensorflow as tf
from merlin.schema import ColumnSchema, Schema, Tags

from twotower.config import ModelConfig, TrainConfig
from twotower.models.gating import field_gate
from twotower.models.losses import loss_for

HISTORY = "history"  # the query feature that shares the item id's table


@dataclass
class TrainingStats:
    """What a builder may learn from the training data besides the schema."""

    item_counts: np.ndarray  # training positives per encoded item id (index = code)
    catalogue_features: pd.DataFrame  # encoded features of every retrievable item


def encode(encoder: tf.keras.Model, features: pd.DataFrame, schema: Schema, batch_size: int = 4096) -> np.ndarray:
    """Run a tower over encoded feature rows, in order."""
    dataset = merlin.io.Dataset(features[schema.column_names].reset_index(drop=True), schema=schema)
    loader = mm.Loader(dataset, batch_size=batch_size, shuffle=False)
    return np.concatenate([encoder(batch).numpy() for batch, _ in loader], axis=0)


class RetrievalModel:
    """A two-tower model as the recipe sees it: ``keras`` is what merlin-models fits."""

    batch_size: int | None = None  # positives per training step; None: train.batch_size

    def __init__(self, keras_model: mm.RetrievalModelV2, schema: Schema):
        self.keras = keras_model
        self.schema = schema

    @property
    def query_schema(self) -> Schema:
        return self.schema.select_by_tag(Tags.USER)

    @property
    def item_schema(self) -> Schema:
        return self.schema.select_by_tag(Tags.ITEM)

    def query_vectors(self, features: pd.DataFrame) -> np.ndarray:
        """Query-tower outputs for encoded user rows (USER columns), in order."""
        return encode(self.keras.query_encoder, features, self.query_schema)

    def item_vectors(self, features: pd.DataFrame) -> np.ndarray:
        """Candidate-tower outputs for encoded item rows (ITEM columns), in order."""
        return encode(self.keras.candidate_encoder, features, self.item_schema)

    def score(self, query_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
        """Scores [queries, items] of every pair of rows of ``query_vectors`` and ``item_vectors``
        (this class's outputs): what evaluation ranks by. A dot product unless a model says otherwise."""
        return query_vectors @ item_vectors.T

    def pair_scores(self, query_vectors: tf.Tensor, item_vectors: tf.Tensor) -> tf.Tensor:
        """Row i's score of the pair (``query_vectors[i]``, ``item_vectors[i]``): [rows], the same
        values ``score`` gives (in TensorFlow: the served pre-ranking stage runs it)."""
        return tf.reduce_sum(query_vectors * item_vectors, axis=-1)

    def pair_scoring_state(self) -> tuple[tf.Module, ...]:
        """The layers whose variables ``pair_scores`` reads (none for scores of the vectors alone)."""
        return ()

    def save_pair_scorer(self, path: Path, query_width: int, item_width: int) -> None:
        """``pair_scores`` as a SavedModel whose ``serving_default`` takes ``query`` [n, query_width]
        and ``items`` [n, item_width] and returns ``scores`` [n]: the pre-ranking stage scores each
        user's candidates with it, whatever the model."""
        module = tf.Module()
        module.state = self.pair_scoring_state()

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, query_width], tf.float32, "query"),
                tf.TensorSpec([None, item_width], tf.float32, "items"),
            ]
        )
        def serve(query, items):
            return {"scores": self.pair_scores(query, items)}

        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})

    def save_query_tower(self, path: Path) -> None:
        """The query tower as a SavedModel whose ``serving_default`` the server calls."""
        self.keras.query_encoder.save(str(path), include_optimizer=False)

    def save_item_tower(self, path: Path) -> None:
        self.keras.candidate_encoder.save(str(path), include_optimizer=False)

    def save_weights(self, path: Path) -> None:
        """Every trainable variable of the whole model, in the model's own order (the towers'
        SavedModels leave out what only training uses, and cannot be trained further)."""
        np.savez(path, *(variable.numpy() for variable in self.keras.trainable_variables))

    def load_weights(self, path: Path, features: dict[str, tf.Tensor]) -> None:
        """Start from the weights ``save_weights`` wrote for a model built the same way (same model,
        settings and vocabulary). merlin-models creates variables on the first call, so the model
        is called once on ``features`` (one training batch) first. Non-trainable state stays this
        model's own: the logQ correction's sampling probabilities describe its own batches."""
        self.keras(features, training=False)
        variables = self.keras.trainable_variables
        with np.load(path) as saved:
            values = [saved[f"arr_{position}"] for position in range(len(saved.files))]
        mismatched = len(values) != len(variables) or any(v.shape != value.shape for v, value in zip(variables, values))
        if mismatched:
            raise ValueError(
                f"{path} holds {len(values)} weights of another model or vocabulary than this one "
                f"({len(variables)} weights); "
                "a warm start needs the same model.* and train.* settings and the same workflow"
            )
        for variable, value in zip(variables, values):
            variable.assign(value)

    def parameter_count(self) -> int:
        """Trainable parameters, shared tables counted once."""
        variables = {id(v): v for v in self.keras.trainable_variables}
        return int(sum(np.prod(v.shape) for v in variables.values()))


def with_domain(schema: Schema, column: str, domain: dict) -> Schema:
    """``schema`` with ``column``'s domain (table name, code range) replaced by ``domain``."""
    changed = schema[column].with_properties({**schema[column].properties, "domain": domain})
    return Schema([changed if c.name == column else c for c in schema])


def share_item_table(schema: Schema, column: str = HISTORY) -> Schema:
    """Point ``column``'s domain at the item id's, so both use one embedding table."""
    if column not in schema.column_names:
        return schema
    return with_domain(schema, column, dict(schema.select_by_tag(Tags.ITEM_ID).first.properties["domain"]))


def table_name(column: ColumnSchema) -> str:
    """The embedding table a categorical column looks up: the one named after its domain."""
    return column.int_domain.name or column.name


def shared_embeddings(schema: Schema, dim: int | None) -> mm.ParallelBlock:
    """One Embeddings block over both towers' categorical columns: tables are keyed by
    domain name, so ``history`` and ``item_id`` share one (see ``share_item_table``)."""
    return mm.Embeddings(schema.select_by_tag(Tags.CATEGORICAL), dim=dim)


def tables_for(tower_schema: Schema, embeddings: mm.ParallelBlock) -> mm.ParallelBlock:
    """The tables a tower's categorical columns use, picked by table (domain) name.

    Selecting by tag would drop the shared item table from the query tower: that
    table's own schema is the item id's, tagged ITEM only.
    """
    names = dict.fromkeys(table_name(c) for c in tower_schema.select_by_tag(Tags.CATEGORICAL))
    return mm.ParallelBlock({name: embeddings.parallel_dict[name] for name in names}, schema=tower_schema)


def tower(inputs: tf.keras.layers.Layer, train: TrainConfig, model: ModelConfig, extra: tuple = ()) -> mm.Encoder:
    """``inputs`` (concatenated features, or per-field embeddings when gated), the configured
    field gating, ``extra`` blocks (such as DAT's augmented vector), the MLP, then L2 norm."""
    blocks = [] if model.gating == "none" else [field_gate(model)]
    blocks += [*extra, mm.MLPBlock(train.tower_layers, no_activation_last_layer=True)]
    return mm.Encoder(inputs, *blocks, post=mm.L2Norm() if train.l2_normalize else None)


def field_inputs(schema: Schema, tables: mm.ParallelBlock, model: ModelConfig) -> mm.Block:
    """A tower's input block: concatenated embeddings, or a dict of field embeddings to gate."""
    return mm.InputBlockV2(schema, categorical=tables, aggregation="concat" if model.gating == "none" else None)


def compile_model(
    keras_model: mm.RetrievalModelV2,
    schema: Schema,
    train: TrainConfig,
    model: ModelConfig,
    kind: Callable[..., RetrievalModel] = RetrievalModel,
) -> RetrievalModel:
    keras_model.compile(optimizer=tf.keras.optimizers.Adam(train.learning_rate), loss=loss_for(model.loss), metrics=[])
    return kind(keras_model, schema)


def check_field_dims(train: TrainConfig, model: ModelConfig) -> None:
    if model.gating != "none" and train.embedding_dim is None:
        raise ValueError(f"model.gating={model.gating} weighs fields of one size: set train.embedding_dim")
