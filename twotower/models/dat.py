"""``dat``: the Dual Augmented Two-tower model (Yu et al., DLP-KDD 2021).

Each user id and each item id gets a learned augmented vector (``a_u``, ``a_v``, the size of
the towers' output), appended to the other features of its own tower. The adaptive-mimic
mechanism teaches each augmented vector the other tower's output for positive pairs:
``||a_u - stop_gradient(p_v)||^2`` and ``||a_v - stop_gradient(p_u)||^2``, so that a tower
carries information about what the other side liked. Every training row of the recipe is a
positive pair (negatives only appear inside the output's logits), so the mimic terms run
over the batch rows. The category alignment loss pulls the covariance of the item vectors
of each category in the batch towards that of the largest category, so that sparse
categories' vectors are shaped like the dense one's.

At serving ``a_u`` is looked up from the user id inside the saved query tower like any
other user feature; an unknown user gets the fallback list before the tower runs.
"""

from __future__ import annotations

import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema, Tags

from twotower.config import DATConfig, ModelConfig, TrainConfig
from twotower.models.base import (
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
from twotower.models.losses import contrastive_output


def _flat_ids(ids: tf.Tensor) -> tf.Tensor:
    return tf.reshape(ids, [-1])


@tf.keras.utils.register_keras_serializable(package="twotower")
class AugmentedVector(tf.keras.layers.Layer):
    """A learned vector per id of ``column``, appended to the tower's features."""

    def __init__(self, column: str, cardinality: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.column, self.cardinality, self.dim = column, cardinality, dim
        self.table = tf.keras.layers.Embedding(cardinality, dim, name=f"{column}_augmented")

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        return self.table(_flat_ids(ids))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([*input_shape[:-1], int(input_shape[-1]) + self.dim])

    def call(self, inputs, features):
        return tf.concat([inputs, self.lookup(features[self.column])], axis=-1)

    def get_config(self):
        return {**super().get_config(), "column": self.column, "cardinality": self.cardinality, "dim": self.dim}


def mimic_distances(augmented: tf.Tensor, other_tower: tf.Tensor) -> tf.Tensor:
    """Per row [batch]: ``||augmented - stop_gradient(other_tower)||^2``."""
    return tf.reduce_sum(tf.square(augmented - tf.stop_gradient(other_tower)), axis=-1)


def mimic_loss(augmented: tf.Tensor, other_tower: tf.Tensor) -> tf.Tensor:
    """Mean over positive pairs of ``||augmented - stop_gradient(other_tower)||^2``."""
    return tf.reduce_mean(mimic_distances(augmented, other_tower))


def category_alignment_loss(vectors: tf.Tensor, membership: tf.Tensor) -> tf.Tensor:
    """Sum over categories c (other than the batch's largest, with at least two rows) of
    ``||C(largest) - C(c)||_F^2``, C being the covariance of the item vectors in the category.

    ``vectors`` [batch, dim]; ``membership`` [batch, categories], 1 where a row's item is in a
    category (an item may be in several).
    """
    membership = tf.cast(membership, vectors.dtype)
    counts = tf.reduce_sum(membership, axis=0)  # [C]
    means = tf.matmul(membership, vectors, transpose_a=True) / tf.maximum(counts, 1.0)[:, None]  # [C, D]
    second_moments = tf.einsum("bc,bd,be->cde", membership, vectors, vectors)  # [C, D, D]
    scatter = second_moments - counts[:, None, None] * means[:, :, None] * means[:, None, :]
    covariances = scatter / tf.maximum(counts - 1.0, 1.0)[:, None, None]
    largest = tf.argmax(counts)
    distances = tf.reduce_sum(tf.square(covariances - covariances[largest]), axis=[1, 2])
    counted = tf.logical_and(counts >= 2.0, tf.range(tf.shape(counts)[0], dtype=largest.dtype) != largest)
    return tf.reduce_sum(tf.where(counted, distances, tf.zeros_like(distances)))


def category_membership(categories, cardinality: int) -> tf.Tensor:
    """Multi-hot [batch, cardinality] from a list (ragged) or scalar category column."""
    if isinstance(categories, tf.RaggedTensor):
        if categories.shape.rank == 3:
            categories = categories.merge_dims(-2, -1)
        return tf.reduce_max(tf.ragged.map_flat_values(tf.one_hot, categories, cardinality), axis=1)
    return tf.one_hot(_flat_ids(categories), cardinality)


class DualAugmentedModel(mm.RetrievalModelV2):
    """merlin-models' retrieval model plus DAT's losses, added from the towers' outputs of
    the same forward pass (no second pass through the towers)."""

    def __init__(
        self,
        *,
        user_augment,
        item_augment,
        category_column: str | None,
        category_cardinality: int,
        dat: DATConfig,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.user_augment, self.item_augment = user_augment, item_augment
        self.category_column, self.category_cardinality = category_column, category_cardinality
        self.dat = dat

    def dat_losses(self, features: dict, query: tf.Tensor, candidate: tf.Tensor) -> tf.Tensor:
        total = tf.constant(0.0)
        if self.user_augment is not None:
            a_u = self.user_augment.lookup(features[self.user_augment.column])
            a_v = self.item_augment.lookup(features[self.item_augment.column])
            total += self.dat.user_mimic_weight * mimic_loss(a_u, candidate)
            total += self.dat.item_mimic_weight * mimic_loss(a_v, query)
        if self.category_column is not None and self.dat.alignment_weight:
            membership = category_membership(features[self.category_column], self.category_cardinality)
            total += self.dat.alignment_weight * category_alignment_loss(candidate, membership)
        return total

    def _call_child(self, child, inputs, context):
        outputs, context = super()._call_child(child, inputs, context)
        if child is self.encoder and context.training:
            self.add_loss(self.dat_losses(context.features, outputs[self._query_name], outputs[self._candidate_name]))
        return outputs, context


def build(schema: Schema, stats: TrainingStats, train: TrainConfig, model: ModelConfig) -> RetrievalModel:
    check_field_dims(train, model)
    schema = share_item_table(schema)
    embeddings = shared_embeddings(schema, train.embedding_dim)
    dim = train.tower_layers[-1]
    augments, towers = [], []
    for tag, id_tag in ((Tags.USER, Tags.USER_ID), (Tags.ITEM, Tags.ITEM_ID)):
        tower_schema = schema.select_by_tag(tag)
        id_column = schema.select_by_tag(id_tag).first
        augment = AugmentedVector(id_column.name, id_column.int_domain.max + 1, dim) if model.dat.augmented else None
        augments.append(augment)
        inputs = field_inputs(tower_schema, tables_for(tower_schema, embeddings), model)
        towers.append(tower(inputs, train, model, extra=(augment,) if augment else ()))
    query, candidate = towers
    category = model.dat.category_column
    if category == "auto":  # the first multi-valued item feature: genres on ML-1M, class on ML-100K
        category = next((c.name for c in schema.select_by_tag(Tags.ITEM).remove_by_tag(Tags.ITEM_ID) if c.is_list), "")
    if category and category not in schema.select_by_tag(Tags.ITEM).column_names:
        raise ValueError(
            f"model.dat.category_column={category!r} is not an item feature; "
            f"item features: {schema.select_by_tag(Tags.ITEM).column_names}"
        )
    keras_model = DualAugmentedModel(
        query=query,
        candidate=candidate,
        output=contrastive_output(schema, stats.item_counts, stats.catalogue_features, candidate, train, model),
        user_augment=augments[0],
        item_augment=augments[1],
        category_column=category or None,
        category_cardinality=schema[category].int_domain.max + 1 if category else 0,
        dat=model.dat,
    )
    return compile_model(keras_model, schema, train, model)
