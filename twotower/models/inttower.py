"""IntTower's interaction mechanisms (Li et al., CIKM 2022) as Keras pieces.

IntTower keeps two towers but lets them interact more than a single dot product does:

- Light-SE gates each tower's field embeddings before its MLP (``gating.LightSE``; not
  repeated here);
- the FE-Block ("fine-grained and early feature interaction"): the output of each chosen
  user-tower layer is projected into ``user_heads`` head vectors of ``head_size``, the item
  tower's last output into ``item_heads`` head vectors of the same size, and the score is
  the sum over user layers and user heads of the best-matching item head:
  ``sum_l sum_h max_k <u_{l,h}, v_k>``. Item heads only depend on the item, user heads only
  on the user, so both sides can still be cached; the max over item heads is the only
  per-pair work;
- CIR (contrastive interaction regularisation): an InfoNCE loss that pulls a user's FE
  representation towards its positive item's and away from the other items of the batch.

Differences from the official PyTorch code (github.com/archersama/IntTower), on purpose:

- the paper's figure projects each user layer's *output*; the official ``User_Fe_DNN``
  projects each layer's *input* (the gated embedding input and the first two hidden outputs).
  ``user_heads_from`` chooses (``head_sources``): ``make benchmark-prerank`` uses the official
  code's inputs, the retriever (``model.inttower``) the outputs, the setting its figures were
  measured with (which layers take part is ``fe_layers``);
- at its HEAD the official CIR (``contrast_loss``) takes the 0/1 click label as the index
  of the target column and its last commit removed it from the total loss; an older version
  used ``mean(u.v) - mean(u.v.y)``. ``contrastive_interaction_loss`` is written as the paper
  describes it: for each positive (user, item) row, softmax cross-entropy of that row's
  item against every item of the batch, on L2-normalised representations over a
  temperature.

``model.name=inttower`` (``build``) is IntTower as a retriever of the family: merlin-models
towers over the shared embeddings, field gating (Light-SE unless ``model.gating`` names
another), ReLU MLPs of ``train.tower_layers``; the query tower's ``fe_layers`` outputs and the
item tower's last output projected into heads (each L2-normalised with ``train.l2_normalize``).
A tower's output is its heads flattened: query vectors [n, fe layers * user heads * size], item
vectors [n, item heads * size]; ``HeadLayout`` splits them again. Training is the recipe's
in-batch softmax (negatives, false-negative masking, logQ correction and temperature are
merlin-models' ``ContrastiveOutput``'s) with FE-score logits, plus CIR on the last FE layer's
heads; evaluation ranks the whole catalogue by the exact FE score (``IntTowerRetrievalModel.score``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass

import merlin.models.tf as mm
import numpy as np
import tensorflow as tf
from merlin.models.tf.core.prediction import Prediction
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.utils.tf_utils import rescore_false_negatives
from merlin.schema import Schema, Tags

from twotower.config import HeadSource, IntTowerConfig, ModelConfig, TrainConfig
from twotower.models.base import (
    RetrievalModel,
    TrainingStats,
    check_field_dims,
    compile_model,
    field_inputs,
    share_item_table,
    shared_embeddings,
    tables_for,
)
from twotower.models.gating import field_gate
from twotower.models.losses import contrastive_output
from twotower.models.multi_vector import HeadShape


def fe_score(user_heads: list[tf.Tensor], item_heads: tf.Tensor) -> tf.Tensor:
    """``sum_l sum_h max_k <user_heads[l][:, h], item_heads[:, k]>`` per row: [batch].

    ``user_heads``: one [batch, user heads, size] tensor per user layer taking part;
    ``item_heads``: [batch, item heads, size].
    """
    total = tf.zeros(tf.shape(item_heads)[:1], dtype=item_heads.dtype)
    for heads in user_heads:
        similarities = tf.einsum("bhd,bkd->bhk", heads, item_heads)  # every user head against every item head
        total += tf.reduce_sum(tf.reduce_max(similarities, axis=-1), axis=-1)
    return total


def fe_score_matrix(query_heads: tf.Tensor, item_heads: tf.Tensor) -> tf.Tensor:
    """The FE score of every (query, item) pair: [queries, items].

    ``query_heads`` [queries, query heads, size] (every FE layer's user heads together: the score
    sums over all of them), ``item_heads`` [items, item heads, size]. One query head at a time, so
    the largest intermediate is [queries, items, item heads].
    """
    total = tf.zeros([tf.shape(query_heads)[0], tf.shape(item_heads)[0]], dtype=item_heads.dtype)
    for head in range(query_heads.shape[1]):
        total += tf.reduce_max(tf.einsum("qd,ikd->qik", query_heads[:, head], item_heads), axis=-1)
    return total


@tf.keras.utils.register_keras_serializable(package="twotower")
class HeadProjection(tf.keras.layers.Layer):
    """A linear projection of a layer's output into ``heads`` vectors of ``head_size``: [batch, heads, size]."""

    def __init__(self, heads: int, head_size: int, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_size = heads, head_size
        self.dense = tf.keras.layers.Dense(heads * head_size, name="dense")

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], self.heads, self.head_size])

    def call(self, inputs):
        return tf.reshape(self.dense(inputs), [-1, self.heads, self.head_size])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "head_size": self.head_size}


@tf.keras.utils.register_keras_serializable(package="twotower")
class FEBlock(tf.keras.layers.Layer):
    """Projects ``user_layers`` user-layer values (``head_sources``) and the item tower's last output into heads;
    calling it gives the FE score [batch]. ``heads`` gives the projections themselves (CIR uses them)."""

    def __init__(self, user_layers: int, user_heads: int = 32, item_heads: int = 32, head_size: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.user_layers, self.user_heads, self.item_heads, self.head_size = (
            user_layers,
            user_heads,
            item_heads,
            head_size,
        )
        self.user_projections = [
            HeadProjection(user_heads, head_size, name=f"user_layer_{number}_heads") for number in range(user_layers)
        ]
        self.item_projection = HeadProjection(item_heads, head_size, name="item_heads")

    def heads(self, user_outputs: list[tf.Tensor], item_output: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        """[batch, user heads, size] per user layer, and [batch, item heads, size]."""
        return [project(output) for project, output in zip(self.user_projections, user_outputs)], self.item_projection(
            item_output
        )

    def call(self, inputs):
        user_outputs, item_output = inputs
        return fe_score(*self.heads(list(user_outputs), item_output))

    def get_config(self):
        return {
            **super().get_config(),
            "user_layers": self.user_layers,
            "user_heads": self.user_heads,
            "item_heads": self.item_heads,
            "head_size": self.head_size,
        }


def contrastive_interaction_loss(
    user: tf.Tensor, item: tf.Tensor, positive: tf.Tensor, temperature: float
) -> tf.Tensor:
    """CIR per row [batch]: InfoNCE of the row's own item among the batch's items, for rows
    whose label is positive (0 elsewhere).

    ``user`` and ``item`` are [batch, ...] representations (flattened, then L2-normalised);
    row i's logits are ``cos(u_i, v_j) / temperature`` over every row j of the batch, its
    target j = i: the other rows' items are the negatives.
    """
    batch = tf.shape(user)[0]
    user = tf.math.l2_normalize(tf.reshape(user, [batch, -1]), axis=-1)
    item = tf.math.l2_normalize(tf.reshape(item, [batch, -1]), axis=-1)
    logits = tf.matmul(user, item, transpose_b=True) / temperature
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(batch), logits=logits)
    return per_row * tf.cast(tf.reshape(positive, [-1]) > 0.5, per_row.dtype)


def head_sources(
    tower_input: tf.Tensor, layer_outputs: list[tf.Tensor], layers: list[int], heads_from: HeadSource
) -> list[tf.Tensor]:
    """What the FE-Block projects for each user layer in ``layers``: that layer's output, or
    its input (``layer_inputs``: the tower's input for layer 0, the previous layer's output after)."""
    check_head_source(heads_from)
    values = [tower_input, *layer_outputs[:-1]] if heads_from == "layer_inputs" else layer_outputs
    return [values[index] for index in layers]


def check_head_source(heads_from: str) -> None:
    """Refuse a head source other than HeadSource's, rather than fall back to one silently."""
    if heads_from not in typing.get_args(HeadSource):
        raise ValueError(f"heads_from={heads_from!r}: one of {', '.join(typing.get_args(HeadSource))}")


def check_inttower(config: IntTowerConfig, tower_layers: int, key: str) -> None:
    """Refuse FE layers the tower does not have, and CIR between heads that do not pair up."""
    if not config.fe_layers or any(not 0 <= index < tower_layers for index in config.fe_layers):
        raise ValueError(
            f"{key}.fe_layers={config.fe_layers}: indices of the {tower_layers} tower layers, at least one"
        )
    if config.cir_weight and config.user_heads != config.item_heads:
        raise ValueError(
            f"{key}: CIR compares user and item heads one to one; set user_heads == item_heads or cir_weight=0"
        )


# ------------------------------------------------------------------ model.name=inttower
@dataclass(frozen=True)
class HeadLayout(HeadShape):
    """``HeadShape`` splitting tensors inside the Keras graph (tf.reshape)."""

    @staticmethod
    def _reshape(vectors, shape):
        return tf.reshape(vectors, shape)


@tf.keras.utils.register_keras_serializable(package="twotower")
class HeadsTower(tf.keras.layers.Layer):
    """A tower's MLP (ReLU layers of ``layer_sizes``) whose ``projected`` layers' outputs (or
    inputs: ``heads_from``) are each projected into ``heads`` vectors of ``head_size``
    (L2-normalised if ``normalize``), returned flattened and concatenated in ``projected`` order:
    [batch, len(projected) * heads * head_size]."""

    def __init__(
        self,
        layer_sizes: list[int],
        projected: list[int],
        heads: int,
        head_size: int,
        normalize: bool,
        heads_from: HeadSource = "layer_outputs",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_head_source(heads_from)
        self.layer_sizes, self.projected, self.heads, self.head_size, self.normalize = (
            list(layer_sizes),
            list(projected),
            heads,
            head_size,
            normalize,
        )
        self.heads_from = heads_from
        self.mlp = [
            tf.keras.layers.Dense(units, activation="relu", name=f"layer_{number}")
            for number, units in enumerate(self.layer_sizes)
        ]
        self.projections = [HeadProjection(heads, head_size, name=f"layer_{index}_heads") for index in self.projected]

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], len(self.projected) * self.heads * self.head_size])

    def call(self, inputs):
        hidden, outputs = inputs, []
        for layer in self.mlp:
            hidden = layer(hidden)
            outputs.append(hidden)
        sources = head_sources(inputs, outputs, self.projected, self.heads_from)
        heads = tf.concat([project(source) for project, source in zip(self.projections, sources)], axis=1)
        if self.normalize:
            heads = tf.math.l2_normalize(heads, axis=-1)
        return tf.reshape(heads, [-1, len(self.projected) * self.heads * self.head_size])

    def get_config(self):
        return {
            **super().get_config(),
            "layer_sizes": self.layer_sizes,
            "projected": self.projected,
            "heads": self.heads,
            "head_size": self.head_size,
            "normalize": self.normalize,
            "heads_from": self.heads_from,
        }


class FEPairScore(DotProduct):
    """Each row's own (query, candidate) pair scored by FE: [batch, 1]. It subclasses DotProduct
    because merlin-models reads a DotProduct ``to_call`` as "candidates come from the candidate
    tower" (rather than from an item weight table) and would otherwise put a DotProduct back."""

    def __init__(self, layout: HeadLayout, **kwargs):
        super().__init__(**kwargs)
        self.layout = layout

    def call(self, inputs, **kwargs):
        return fe_score([self.layout.query(inputs[self.query_name])], self.layout.items(inputs[self.item_name]))[
            :, None
        ]


class FEContrastiveOutput(mm.ContrastiveOutput):
    """merlin-models' contrastive output with FE-score logits in place of dot products; the
    negatives, their logQ correction (``post``) and the temperature are its own.

    With L2-normalised heads the FE score sums ``query_heads`` cosines; the logits take their mean
    (the same order) so that ``train.temperature``, set for one cosine, keeps its meaning."""

    def __init__(self, layout: HeadLayout, **kwargs):
        super().__init__(FEPairScore(layout), **kwargs)
        self.layout = layout

    def outputs(self, query_embedding: tf.Tensor, positive, negative) -> Prediction:
        query = self.layout.query(query_embedding)
        positive_scores = fe_score([query], self.layout.items(positive.embedding))[:, None] / self.layout.query_heads
        negative_scores = fe_score_matrix(query, self.layout.items(negative.embedding)) / self.layout.query_heads
        if self.downscore_false_negatives:  # a batch's own positive among its negatives is no negative
            negative_scores, _ = rescore_false_negatives(
                positive.id, negative.id, negative_scores, self.false_negative_score
            )
        logits = tf.cast(tf.concat([positive_scores, negative_scores], axis=-1), tf.float32)
        targets = tf.one_hot(
            tf.zeros(tf.shape(logits)[:1], tf.int32), tf.shape(logits)[1], dtype=logits.dtype
        )  # the positive is column 0
        return Prediction(logits, targets, negative_candidate_ids=negative.id if self.store_negative_ids else None)


class IntTowerModel(mm.RetrievalModelV2):
    """merlin-models' retrieval model plus CIR, computed from the towers' outputs of the same
    forward pass. Every training row of the recipe is a positive pair, so CIR runs over all rows."""

    def __init__(self, *, layout: HeadLayout, inttower: IntTowerConfig, **kwargs):
        super().__init__(**kwargs)
        self.layout, self.inttower = layout, inttower

    def contrastive_interaction(self, query: tf.Tensor, candidate: tf.Tensor) -> tf.Tensor:
        last_layer_heads = self.layout.query(query)[:, -self.layout.user_heads :]
        positives = tf.ones(tf.shape(query)[:1])
        return tf.reduce_mean(
            contrastive_interaction_loss(
                last_layer_heads, self.layout.items(candidate), positives, self.inttower.cir_temperature
            )
        )

    def _call_child(self, child, inputs, context):
        outputs, context = super()._call_child(child, inputs, context)
        if child is self.encoder and context.training and self.inttower.cir_weight:
            self.add_loss(
                self.inttower.cir_weight
                * self.contrastive_interaction(outputs[self._query_name], outputs[self._candidate_name])
            )
        return outputs, context


class IntTowerRetrievalModel(RetrievalModel):
    """Query and item vectors are flattened heads; a pair's score is the FE score, not their dot product."""

    def score(self, query_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
        layout = self.keras.layout
        return fe_score_matrix(layout.query(query_vectors), layout.items(item_vectors)).numpy()

    def pair_scores(self, query_vectors: tf.Tensor, item_vectors: tf.Tensor) -> tf.Tensor:
        layout = self.keras.layout
        return fe_score([layout.query(query_vectors)], layout.items(item_vectors))


def build(schema: Schema, stats: TrainingStats, train: TrainConfig, model: ModelConfig) -> RetrievalModel:
    fe = model.inttower
    check_inttower(fe, len(train.tower_layers), "model.inttower")
    if fe.search_depth < 1:
        raise ValueError(f"model.inttower.search_depth={fe.search_depth}: at least 1 item head per user head")
    gated = model if model.gating != "none" else dataclasses.replace(model, gating="light_se")  # IntTower's own gate
    check_field_dims(train, gated)
    schema = share_item_table(schema)
    embeddings = shared_embeddings(schema, train.embedding_dim)
    layout = HeadLayout(len(fe.fe_layers), fe.user_heads, fe.item_heads, fe.head_size)
    towers = []
    # item heads: the last layer's output, in the paper and the official code alike
    for tag, projected, heads, heads_from in (
        (Tags.USER, fe.fe_layers, fe.user_heads, fe.user_heads_from),
        (Tags.ITEM, [len(train.tower_layers) - 1], fe.item_heads, "layer_outputs"),
    ):
        tower_schema = schema.select_by_tag(tag)
        inputs = field_inputs(tower_schema, tables_for(tower_schema, embeddings), gated)
        towers.append(
            mm.Encoder(
                inputs,
                field_gate(gated),
                HeadsTower(train.tower_layers, projected, heads, fe.head_size, train.l2_normalize, heads_from),
            )
        )
    query, candidate = towers
    output = contrastive_output(
        schema,
        stats.item_counts,
        stats.catalogue_features,
        candidate,
        train,
        model,
        make_output=functools.partial(FEContrastiveOutput, layout),
    )
    keras_model = IntTowerModel(query=query, candidate=candidate, output=output, layout=layout, inttower=fe)
    return compile_model(keras_model, schema, train, model, IntTowerRetrievalModel)
