"""``dcn_v2``: DCN-v2 (Wang et al., WWW 2021), the ranking model, as the cascade's pre-ranker.

A ranking model scores a (user, item) pair from both sides' features together. DCN-v2's input
is every field's embedding concatenated; a stack of cross layers
``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (``W_l = U_l V_l^T`` with ``model.dcn.low_rank_dim``)
multiplies user and item fields with each other, then the MLP of ``train.tower_layers`` (ReLU)
and one logit give the score (merlin-models' ``CrossBlock``, as make benchmark-prerank's
``dcn_v2`` row).

The embedding lookups depend on one side only, so the recipe's "towers" here stop there: the
query vector is the user's field embeddings concatenated (history mean-pooled through the item
table), the item vector the item's. Everything after runs once per pair (``PairScorer``), which
is why no vector index can retrieve by this score: ``dcn_v2`` trains and is evaluated over the
whole catalogue like every model of the family (``score`` runs the pair scorer on every pair),
and serves as the pre-ranker over retrieved candidates (``serve.prerank_model=dcn_v2``); the
index stage and the export refuse it as a retriever (``models.check_retriever``).

Training: the recipe's loss (``model.loss``) over each positive and the batch's first
``model.dcn.negatives`` items (merlin-models' in-batch negatives, shared by all rows, so the
logQ correction and false-negative masking apply as for the other models), on batches of
``model.dcn.batch_size`` positives: a row learns from a few negatives here, not from the whole
batch as in the dot-product models' in-batch softmax, so DCN-v2 needs many more, smaller steps.
"""

from __future__ import annotations

import functools

import merlin.models.tf as mm
import numpy as np
import tensorflow as tf
from merlin.models.tf.core.prediction import Prediction
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.utils.tf_utils import rescore_false_negatives
from merlin.schema import Schema, Tags

from twotower.config import DCNConfig, ModelConfig, TrainConfig
from twotower.models.base import (
    RetrievalModel,
    TrainingStats,
    compile_model,
    field_inputs,
    share_item_table,
    shared_embeddings,
    tables_for,
)
from twotower.models.losses import contrastive_output

PAIRS_PER_CALL = 1 << 17  # (query, item) rows per pair-scorer call when scoring a whole catalogue


@tf.keras.utils.register_keras_serializable(package="twotower")
class PairScorer(tf.keras.layers.Layer):
    """Calling it on (query vectors, item vectors) [n, ...] gives each row's pair score [n]: the
    cross network over both sides' concatenated embeddings, the MLP, a logit."""

    def __init__(self, cross_depth: int, low_rank_dim: int, layer_sizes: list[int], **kwargs):
        super().__init__(**kwargs)
        self.cross_depth, self.low_rank_dim, self.layer_sizes = cross_depth, low_rank_dim, list(layer_sizes)
        self.cross = mm.CrossBlock(cross_depth, low_rank_dim=low_rank_dim or None)
        self.mlp = [
            tf.keras.layers.Dense(units, activation="relu", name=f"layer_{number}")
            for number, units in enumerate(self.layer_sizes)
        ]
        self.logit = tf.keras.layers.Dense(1, name="logit")

    def call(self, inputs):
        query, items = inputs
        hidden = self.cross(tf.concat([query, items], axis=-1))
        for layer in self.mlp:
            hidden = layer(hidden)
        return self.logit(hidden)[:, 0]

    def get_config(self):
        return {
            **super().get_config(),
            "cross_depth": self.cross_depth,
            "low_rank_dim": self.low_rank_dim,
            "layer_sizes": self.layer_sizes,
        }


class PairScore(DotProduct):
    """Each row's own (query, candidate) pair by the pair scorer: [batch, 1]. A DotProduct
    subclass because merlin-models reads a DotProduct ``to_call`` as "candidates come from the
    candidate tower" (see inttower.FEPairScore)."""

    def __init__(self, scorer: PairScorer, **kwargs):
        super().__init__(**kwargs)
        self.scorer = scorer

    def call(self, inputs, **kwargs):
        return self.scorer((inputs[self.query_name], inputs[self.item_name]))[:, None]


def scores_against(scorer: PairScorer, query: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
    """The score of every (query row, item row) pair: [queries, items]."""
    queries, count = tf.shape(query)[0], tf.shape(items)[0]
    pairs = (tf.repeat(query, count, axis=0), tf.tile(items, [queries, 1]))
    return tf.reshape(scorer(pairs), [queries, count])


class SampledPairOutput(mm.ContrastiveOutput):
    """merlin-models' contrastive output scoring each positive and the first ``negatives`` of its
    in-batch negatives with the pair scorer (temperature and logQ correction are its own)."""

    def __init__(self, scorer: PairScorer, negatives: int, **kwargs):
        super().__init__(PairScore(scorer), **kwargs)
        self.scorer, self.negatives = scorer, negatives

    def outputs(self, query_embedding: tf.Tensor, positive, negative) -> Prediction:
        negative_ids, negative_embeddings = negative.id[: self.negatives], negative.embedding[: self.negatives]
        positive_scores = self.scorer((query_embedding, positive.embedding))[:, None]
        negative_scores = scores_against(self.scorer, query_embedding, negative_embeddings)
        if self.downscore_false_negatives:  # a row's own positive among the negatives is no negative
            negative_scores, _ = rescore_false_negatives(
                positive.id, negative_ids, negative_scores, self.false_negative_score
            )
        logits = tf.cast(tf.concat([positive_scores, negative_scores], axis=-1), tf.float32)
        targets = tf.one_hot(
            tf.zeros(tf.shape(logits)[:1], tf.int32), tf.shape(logits)[1], dtype=logits.dtype
        )  # the positive is column 0
        return Prediction(logits, targets, negative_candidate_ids=negative_ids if self.store_negative_ids else None)


class DCNRetrievalModel(RetrievalModel):
    """Query and item vectors are field embeddings; a pair's score is the pair scorer's."""

    def __init__(self, keras_model: mm.RetrievalModelV2, schema: Schema, scorer: PairScorer):
        super().__init__(keras_model, schema)
        self.scorer = scorer

    def pair_scores(self, query_vectors: tf.Tensor, item_vectors: tf.Tensor) -> tf.Tensor:
        return self.scorer((query_vectors, item_vectors))

    def pair_scoring_state(self) -> tuple[tf.Module, ...]:
        return (self.scorer,)

    def score(self, query_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
        items = tf.constant(item_vectors)
        step = max(1, PAIRS_PER_CALL // len(item_vectors))
        return np.concatenate(
            [
                scores_against(self.scorer, tf.constant(query_vectors[start : start + step]), items).numpy()
                for start in range(0, len(query_vectors), step)
            ]
        )


def check_dcn(config: DCNConfig, train: TrainConfig, model: ModelConfig) -> None:
    """Refuse settings this model has no use for, rather than ignore them."""
    if model.gating != "none":
        raise ValueError(
            f"model.gating={model.gating}: dcn_v2 has no tower MLP to gate; its cross network weighs the fields"
        )
    if train.mixed_negatives:
        raise ValueError(
            f"train.mixed_negatives={train.mixed_negatives}: "
            "dcn_v2 scores the batch's own items as negatives (model.dcn.negatives)"
        )
    if config.cross_depth < 1 or config.negatives < 1 or config.batch_size < 1 or config.low_rank_dim < 0:
        raise ValueError(
            f"model.dcn: cross_depth, negatives and batch_size at least 1, low_rank_dim at least 0 (got {config})"
        )


def build(schema: Schema, stats: TrainingStats, train: TrainConfig, model: ModelConfig) -> RetrievalModel:
    check_dcn(model.dcn, train, model)
    schema = share_item_table(schema)
    embeddings = shared_embeddings(schema, train.embedding_dim)
    towers = []
    for tag in (Tags.USER, Tags.ITEM):
        tower_schema = schema.select_by_tag(tag)
        towers.append(mm.Encoder(field_inputs(tower_schema, tables_for(tower_schema, embeddings), model)))
    query, candidate = towers
    scorer = PairScorer(model.dcn.cross_depth, model.dcn.low_rank_dim, train.tower_layers, name="pair_scorer")
    output = contrastive_output(
        schema,
        stats.item_counts,
        stats.catalogue_features,
        candidate,
        train,
        model,
        make_output=functools.partial(SampledPairOutput, scorer, model.dcn.negatives),
    )
    keras_model = mm.RetrievalModelV2(query=query, candidate=candidate, output=output)
    retrieval = compile_model(keras_model, schema, train, model, functools.partial(DCNRetrievalModel, scorer=scorer))
    retrieval.batch_size = model.dcn.batch_size
    return retrieval
