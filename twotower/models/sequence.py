"""Sequence query towers, ``seq_attention``, ``seq_gru`` and ``seq_hstu`` (the SASRec, GRU4Rec and HSTU line).

The user's ordered history (oldest first, as Feast serves it) is embedded through the
item table the candidate tower uses, then encoded by a small causal transformer
(``seq_attention``: positional embeddings by recency, each position attending only to
itself and earlier ones), by a GRU (``seq_gru``) or by HSTU blocks (``seq_hstu``,
``twotower.models.hstu``), instead of being mean-pooled. The
encoding at the latest position joins the user's other features before the tower's MLP.
The candidate tower is ``two_tower``'s.
"""

from __future__ import annotations

from typing import Literal

import merlin.models.tf as mm
import numpy as np
import pandas as pd
import tensorflow as tf
from merlin.schema import Schema, Tags

from twotower.config import ModelConfig, SequenceConfig, TrainConfig
from twotower.models import SEQUENCE_MODELS
from twotower.models.base import (
    HISTORY,
    RetrievalModel,
    TrainingStats,
    check_field_dims,
    compile_model,
    field_inputs,
    share_item_table,
    shared_embeddings,
    tables_for,
    tower,
)
from twotower.models.hstu import HSTUEncoder
from twotower.models.losses import contrastive_output, feature_tensors
from twotower.models.next_item import NextItemTrainer


def padded(sequences: tf.RaggedTensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A ragged [batch, None, dim] batch as dense [batch, length, dim] (zeros after the end)
    and its [batch, length] mask. One padded position more than the longest history, so a
    batch of empty histories (unseen users at serving) still has a position to read."""
    lengths = sequences.row_lengths()
    dense = tf.pad(sequences.to_tensor(), [[0, 0], [0, 1], [0, 0]])
    return dense, tf.sequence_mask(lengths, tf.shape(dense)[1])


def last_valid(outputs: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Each row's output at its latest valid position; zeros for an empty history."""
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    latest = tf.gather(outputs, tf.maximum(lengths - 1, 0), batch_dims=1)
    return tf.where((lengths > 0)[:, None], latest, tf.zeros_like(latest))


@tf.keras.utils.register_keras_serializable(package="twotower")
class CausalSelfAttention(tf.keras.layers.Layer):
    """Transformer blocks over a history: position embeddings, causal and padding masks,
    multi-head attention and a feed-forward layer, each with residual and layer norm.

    ``positions``: "recency" counts back from each history's latest item (0 = latest), for a
    query encoded at its latest position only; "from_start" counts from the first item, so the
    output at position i depends on items 0..i alone and one pass over a whole sequence gives
    every position the query its own prefix would (next-item training)."""

    def __init__(
        self,
        max_length: int,
        heads: int = 2,
        blocks: int = 1,
        dropout: float = 0.1,
        positions: Literal["recency", "from_start"] = "recency",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_length, self.heads, self.blocks, self.dropout = max_length, heads, blocks, dropout
        self.position_kind = positions

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.positions = tf.keras.layers.Embedding(self.max_length, dim, name=self.position_kind)
        self.attention = [
            tf.keras.layers.MultiHeadAttention(
                self.heads, max(1, dim // self.heads), dropout=self.dropout, name=f"attention_{i}"
            )
            for i in range(self.blocks)
        ]
        self.feed_forward = [
            tf.keras.Sequential(
                [tf.keras.layers.Dense(dim, activation="relu"), tf.keras.layers.Dense(dim)], name=f"feed_forward_{i}"
            )
            for i in range(self.blocks)
        ]
        self.norms = [
            (tf.keras.layers.LayerNormalization(), tf.keras.layers.LayerNormalization()) for _ in range(self.blocks)
        ]
        self.drop = tf.keras.layers.Dropout(self.dropout)
        super().build(input_shape)

    def call(self, sequence: tf.Tensor, mask: tf.Tensor, training=False) -> tf.Tensor:
        """[batch, length, dim] -> [batch, length, dim]; position i sees positions <= i only."""
        length = tf.shape(sequence)[1]
        lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
        if self.position_kind == "recency":
            # 0 for the latest item, so a position means the same for short and long histories.
            position = lengths[:, None] - 1 - tf.range(length)[None, :]
        else:
            position = tf.range(length)[None, :]
        position = tf.clip_by_value(position, 0, self.max_length - 1)
        hidden = self.drop(sequence + self.positions(position), training=training)
        causal = tf.linalg.band_part(tf.ones([length, length], dtype=tf.bool), -1, 0)  # [i, j]: j <= i
        attend = tf.logical_and(causal[None], mask[:, None, :])
        for attention, feed_forward, (norm_attention, norm_output) in zip(
            self.attention, self.feed_forward, self.norms
        ):
            attended = attention(hidden, hidden, attention_mask=attend, training=training)
            hidden = norm_attention(hidden + self.drop(attended, training=training))
            hidden = norm_output(hidden + self.drop(feed_forward(hidden), training=training))
        return hidden * tf.cast(mask, hidden.dtype)[..., None]

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "heads": self.heads,
            "blocks": self.blocks,
            "dropout": self.dropout,
            "positions": self.position_kind,
        }


@tf.keras.utils.register_keras_serializable(package="twotower")
class GRUEncoder(tf.keras.layers.Layer):
    """A GRU over the history; output per position (causal by construction)."""

    def __init__(self, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.dropout = dropout

    def build(self, input_shape):
        self.gru = tf.keras.layers.GRU(int(input_shape[-1]), return_sequences=True, dropout=self.dropout)
        super().build(input_shape)

    def call(self, sequence: tf.Tensor, mask: tf.Tensor, training=False) -> tf.Tensor:
        return self.gru(sequence, mask=mask, training=training) * tf.cast(mask, sequence.dtype)[..., None]

    def get_config(self):
        return {**super().get_config(), "dropout": self.dropout}


class SequenceQueryInputs(tf.keras.layers.Layer):
    """The query tower's input block: the other user features through their tables, and the
    history through the shared item table and ``encoder``, taken at its latest position.

    Returns a dict of field embeddings (``history`` among them) for gating, or their
    concatenation: one row per user, or, while ``every_position`` is set (whole-sequence
    training), one row per position of every history, the user's other fields repeated."""

    every_position = False  # read when a call is traced: set only around training's encode

    def __init__(
        self, schema: Schema, others: mm.Block, item_table, encoder: tf.keras.layers.Layer, concatenate: bool, **kwargs
    ):
        super().__init__(**kwargs)
        self.schema = schema  # the Encoder prepares these columns (history as ragged) for us
        self.is_input = True  # merlin-models feeds a model the columns of its input blocks' schemas
        self.others, self.item_table, self.encoder = others, item_table, encoder
        self.concatenate = concatenate

    def history_outputs(self, history: tf.RaggedTensor, training=False) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-position encodings [batch, length, dim] of encoded item ids, and the mask."""
        if history.shape.rank == 3:
            history = history.merge_dims(-2, -1)
        embedded = tf.ragged.map_flat_values(self.item_table.table, history)
        sequence, mask = padded(embedded)
        return self.encoder(sequence, mask, training=training), mask

    def compute_output_shape(self, input_shape):
        # merlin-models builds blocks from shapes alone; the history field is [batch, table dim].
        fields = dict(self.others.compute_output_shape(input_shape))
        batch = next(iter(fields.values()))[0]
        fields[HISTORY] = tf.TensorShape([batch, self.item_table.dim])
        if self.concatenate:
            return tf.TensorShape([batch, sum(int(shape[-1]) for shape in fields.values())])
        return fields

    def call(self, inputs, training=False):
        fields = self.others(inputs)
        fields = dict(fields) if isinstance(fields, dict) else {"others": fields}
        outputs, mask = self.history_outputs(inputs[HISTORY], training=training)
        if self.every_position:
            positions = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
            fields = {name: tf.repeat(values, positions, axis=0) for name, values in fields.items()}
            fields[HISTORY] = tf.boolean_mask(outputs, mask)  # row-major: user 0's positions first
        else:
            fields[HISTORY] = last_valid(outputs, mask)
        if self.concatenate:
            return tf.concat([fields[name] for name in sorted(fields)], axis=-1)
        return fields


class SequenceRetrievalModel(RetrievalModel):
    """A sequence tower's model, also trainable over whole histories (``next_item_trainer``)."""

    def __init__(self, keras_model: mm.RetrievalModelV2, schema: Schema, query_inputs: SequenceQueryInputs):
        super().__init__(keras_model, schema)
        self.query_inputs = query_inputs

    def next_item_trainer(
        self,
        catalogue_features: pd.DataFrame,
        item_counts: np.ndarray,
        train: TrainConfig,
        loss: str,
        in_batch_negatives: int,
    ) -> NextItemTrainer:
        """A trainer of both towers on batches of (user features with ``history``, next items), both
        ragged per user: every history position predicts its next item. The candidate tower runs over
        the whole catalogue each step; negatives are ``in_batch_negatives`` of the batch's targets
        (logQ-corrected when ``train.logq_correction``) plus ``train.mixed_negatives`` uniform draws."""
        item_id = self.schema.select_by_tag(Tags.ITEM_ID).first.name
        catalogue = feature_tensors(catalogue_features, self.item_schema)
        codes = catalogue_features[item_id].to_numpy()
        rows = len(item_counts)

        def encode(batch, training):
            features, targets = batch
            self.query_inputs.every_position = True
            try:
                flat = self.keras.query_encoder(features, training=training)
            finally:
                self.query_inputs.every_position = False
            lengths = targets.row_lengths()
            queries = tf.RaggedTensor.from_row_lengths(flat, lengths).to_tensor()
            dense_targets = tf.cast(targets.to_tensor(), tf.int32)
            # Code 0 is padding, never an item: past each history's end, and at a position not trained
            # on (a warm start's older positives), so it alone marks the positions to skip.
            return queries, dense_targets, dense_targets > 0

        def item_vectors(training):
            # No static row count in any column, list columns included, as in a real batch (see
            # losses.UniformCatalogueSampler.sample): the tower refuses a count only some columns have
            every_item = tf.compat.v1.placeholder_with_default(tf.range(len(codes)), [None])
            features = {name: tf.gather(values, every_item) for name, values in catalogue.items()}
            vectors = self.keras.candidate_encoder(features, training=training)
            return tf.scatter_nd(codes[:, None], vectors, [rows, tf.shape(vectors)[1]])

        def variables():
            towers = self.keras.query_encoder.trainable_variables + self.keras.candidate_encoder.trainable_variables
            return list({id(v): v for v in towers}.values())  # the shared item table once

        return NextItemTrainer(
            encode,
            item_vectors,
            variables,
            codes,
            item_counts,
            loss=loss,
            uniform_negatives=train.mixed_negatives,
            in_batch_negatives=in_batch_negatives,
            logq_correction=train.logq_correction and loss == "softmax",
            temperature=train.temperature,
            learning_rate=train.learning_rate,
        )


def history_encoder(
    name: str, max_length: int, sequence: SequenceConfig, whole_sequence: bool = False
) -> tf.keras.layers.Layer:
    """The causal encoder of sequence model ``name`` for histories of up to ``max_length`` items;
    ``whole_sequence``: its output at each position is read (next-item training), not only the latest."""
    if name == "seq_attention":
        positions = "from_start" if whole_sequence else "recency"
        return CausalSelfAttention(max_length, sequence.heads, sequence.blocks, sequence.dropout, positions)
    if name == "seq_hstu":
        return HSTUEncoder(max_length, sequence.heads, sequence.blocks, sequence.dropout)
    if name == "seq_gru":
        return GRUEncoder(sequence.dropout)
    raise ValueError(f"{name} is not a sequence model ({', '.join(SEQUENCE_MODELS)})")


def build(schema: Schema, stats: TrainingStats, train: TrainConfig, model: ModelConfig) -> RetrievalModel:
    check_field_dims(train, model)
    if HISTORY not in schema.column_names:
        raise ValueError(f"model.name={model.name} encodes the user's history: set train.history_length > 0")
    if train.embedding_dim is None:
        raise ValueError(f"model.name={model.name} runs the history through one encoder: set train.embedding_dim")
    schema = share_item_table(schema)
    embeddings = shared_embeddings(schema, train.embedding_dim)
    user_schema = schema.select_by_tag(Tags.USER)
    others_schema = user_schema.excluding_by_name([HISTORY])
    others = mm.InputBlockV2(others_schema, categorical=tables_for(others_schema, embeddings), aggregation=None)
    item_table = embeddings.parallel_dict[schema.select_by_tag(Tags.ITEM_ID).first.int_domain.name]
    inputs = SequenceQueryInputs(
        user_schema,
        others,
        item_table,
        history_encoder(
            model.name, train.history_length, model.sequence, whole_sequence=model.sequence.training == "whole_sequence"
        ),
        concatenate=model.gating == "none",
    )
    query = tower(inputs, train, model)
    item_schema = schema.select_by_tag(Tags.ITEM)
    candidate = tower(field_inputs(item_schema, tables_for(item_schema, embeddings), model), train, model)
    output = contrastive_output(schema, stats.item_counts, stats.catalogue_features, candidate, train, model)
    keras_model = mm.TwoTowerModelV2(query, candidate, outputs=output)
    return compile_model(
        keras_model, schema, train, model, kind=lambda keras, schema: SequenceRetrievalModel(keras, schema, inputs)
    )
